"""common.threads: one thread policy for the server and every client actor."""

from __future__ import annotations

import pytest
import torch

from common.threads import apply_thread_policy, client_threads, cpu_cores, server_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_defaults_one_thread_per_client_half_the_cores_for_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDPDD_THREADS", raising=False)
    monkeypatch.delenv("FEDPDD_CLIENT_THREADS", raising=False)
    assert client_threads() == 1
    assert server_threads() == max(1, cpu_cores() // 2)
    monkeypatch.setattr("common.threads.cpu_cores", lambda: 16)
    assert server_threads() == 8
    monkeypatch.setattr("common.threads.cpu_cores", lambda: 2)
    assert server_threads() == 1


def test_apply_sets_torch_threads_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPDD_CLIENT_THREADS", "1")
    torch.set_num_threads(2)
    assert apply_thread_policy("client") == 1 == torch.get_num_threads()
    monkeypatch.setenv("FEDPDD_THREADS", "2")
    assert apply_thread_policy("server") == 2 == torch.get_num_threads()
    monkeypatch.setenv("FEDPDD_THREADS", "0")  # 0: leave torch's setting alone
    torch.set_num_threads(1)
    assert apply_thread_policy("server") == 1


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPDD_THREADS", "two")
    with pytest.raises(ValueError, match="FEDPDD_THREADS='two'"):
        apply_thread_policy("server")
    monkeypatch.setenv("FEDPDD_CLIENT_THREADS", "-1")
    with pytest.raises(ValueError, match="FEDPDD_CLIENT_THREADS='-1'"):
        client_threads()
    with pytest.raises(ValueError, match="role"):
        apply_thread_policy("superlink")  # not a role ('worker' is one: a sweep worker process)


def test_a_sweep_worker_takes_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("FEDPDD_THREADS", "2")  # the server's setting does not reach a worker
    try:
        assert apply_thread_policy("worker") == 1
    finally:
        torch.set_num_threads(before)
