"""scenarios/setup.sh, the quickstart's set-up of a bare machine: which torch index it picks (a CPU index that
does not answer in time means the default index, quickly) and what it does when Fashion-MNIST is missing."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scenarios" / "setup.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _bash(script: str, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([BASH, "-c", f"set -euo pipefail; source {SETUP}; {script}"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def _startup() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import urllib.request"], check=True, timeout=120)
    return time.perf_counter() - t0  # one interpreter start on this machine now


@pytest.fixture
def stalling_index() -> Iterator[str]:
    """An index that accepts connections and never answers (a firewall that swallows packets looks the same)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/whl/cpu"
    srv.close()


@pytest.fixture
def answering_index(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "whl" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "whl" / "cpu" / "torch" / "index.html").write_text("<a>torch-2.14.1+cpu.whl</a>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/whl/cpu"
    httpd.shutdown()


def _no_gpu_path(tmp_path: Path) -> str:
    """PATH without nvidia-smi (this test is about the CPU-index choice)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())  # the interpreter itself, not a shim
    (bin_dir / "id").symlink_to(shutil.which("id"))
    return str(bin_dir)


def test_a_stalling_cpu_index_falls_back_to_the_default_index_within_the_probe_time(
        tmp_path: Path, stalling_index: str) -> None:
    env = {"PATH": _no_gpu_path(tmp_path), "TORCH_CPU_INDEX": stalling_index, "INDEX_PROBE_S": "2"}
    proc, wall = _bash("pick_torch_index", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "default"
    assert "did not answer within 2s: torch from the default index" in proc.stderr
    assert 2 <= wall < 2 + 3 * _startup() + 3  # the probe's limit, not pip's 90 s of retries


def test_an_answering_cpu_index_is_used(tmp_path: Path, answering_index: str) -> None:
    env = {"PATH": _no_gpu_path(tmp_path), "TORCH_CPU_INDEX": answering_index, "INDEX_PROBE_S": "20"}
    proc, _ = _bash("pick_torch_index", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"
    assert f"{answering_index} answered: the CPU build of torch" in proc.stderr


def test_a_missing_cpu_index_page_means_the_default_index(tmp_path: Path, answering_index: str) -> None:
    env = {"PATH": _no_gpu_path(tmp_path), "TORCH_CPU_INDEX": answering_index + "/nothing-here", "INDEX_PROBE_S": "20"}
    proc, _ = _bash("pick_torch_index", env)
    assert proc.stdout.strip() == "default"  # a 404 is no index


def test_missing_dataset_without_apt_rights_stops_at_once_with_the_command(tmp_path: Path) -> None:
    # PATH without apt-get and sudo: this user cannot install the package
    env = {"PATH": _no_gpu_path(tmp_path), "FMNIST_DIR": str(tmp_path / "fashion-mnist")}
    proc, wall = _bash("ensure_fashion_mnist; echo went-on", env)
    assert proc.returncode == 2
    assert "went-on" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in lines[0]
    assert wall < 10


def test_missing_dataset_is_installed_with_passwordless_sudo(tmp_path: Path) -> None:
    path = _no_gpu_path(tmp_path)
    calls = tmp_path / "calls.log"
    target = tmp_path / "fashion-mnist"
    bin_dir = Path(path)
    # `id -u` says a user, `sudo -n` runs the command, `apt-get install` creates the folder the package would
    (bin_dir / "id").unlink()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "sudo").write_text(f'#!/bin/sh\n[ "$1" = -n ] && shift\necho "sudo $*" >> {calls}\nexec "$@"\n')
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {calls}\n'
                                     f'case "$*" in *install*) mkdir -p {target};; esac\n')
    (bin_dir / "mkdir").symlink_to(shutil.which("mkdir"))
    (bin_dir / "true").symlink_to(shutil.which("true"))
    for f in ("id", "sudo", "apt-get"):
        os.chmod(bin_dir / f, 0o755)
    proc, _ = _bash("ensure_fashion_mnist; echo went-on", {"PATH": path, "FMNIST_DIR": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert "went-on" in proc.stdout and "installing Debian's dataset-fashion-mnist" in proc.stdout
    log = calls.read_text()
    assert "sudo true" in log and "apt-get install -y -qq dataset-fashion-mnist" in log
    assert target.is_dir()


def test_present_dataset_needs_nothing(tmp_path: Path) -> None:
    (tmp_path / "fashion-mnist").mkdir()
    proc, _ = _bash("ensure_fashion_mnist; echo went-on",
                    {"PATH": _no_gpu_path(tmp_path), "FMNIST_DIR": str(tmp_path / "fashion-mnist")})
    assert proc.returncode == 0 and proc.stdout.strip() == "went-on"


def test_quickstart_stops_before_flower_when_the_dataset_is_missing_and_apt_is_not_allowed(tmp_path: Path) -> None:
    # every command of /usr/bin and /bin except apt-get and sudo: a user who may not install packages
    bin_dir = tmp_path / "userbin"
    bin_dir.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for tool in folder.iterdir():
            if tool.name not in ("apt-get", "apt", "sudo") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "VENV": sys.prefix, "FMNIST_DIR": str(tmp_path / "none"),
           "FEDPDD_CACHE": os.environ.get("FEDPDD_CACHE", str(tmp_path / "cache"))}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import yaml, flwr.common.config"], timeout=300, check=True)
    startup = time.perf_counter() - t0  # one interpreter start with the check's imports, on this machine now
    t0 = time.perf_counter()
    proc = subprocess.run([BASH, str(ROOT / "scenarios" / "quickstart.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("quickstart: Fashion-MNIST is missing") and "sudo apt-get install -y dataset-fashion-mnist" in last
    assert "starting a SuperLink" not in proc.stdout
    assert wall < 4 * startup + 15  # the check twice, then the stop: seconds, not a run that fails minutes later
