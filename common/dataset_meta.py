"""The datasets' static descriptions (names, classes, shapes, normalization) and their lookup,
without torch: the scenario schema (common/scenario.py) and ``python -m server.check`` use them
before any tensor work. Loading the data is common/datasets.py (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "DatasetError", "DatasetMeta", "get_meta"]


class DatasetError(ValueError):
    """A dataset name is unknown, or its files are missing or malformed."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetMeta:
    """Static description of a dataset (no data)."""

    name: str
    class_names: tuple[str, ...]
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return (self.channels, self.height, self.width)


_DIGITS = tuple(str(d) for d in range(10))
_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
assert len(_CIFAR100_CLASSES) == 100

DATASETS: dict[str, DatasetMeta] = {
    meta.name: meta
    for meta in (
        DatasetMeta(
            name="cifar10",
            class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
            channels=3, height=32, width=32,
            mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        ),
        DatasetMeta(
            name="fashion-mnist",
            class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            channels=1, height=28, width=28,
            mean=(0.2861,), std=(0.3530,),
        ),
        DatasetMeta(
            name="mnist", class_names=_DIGITS, channels=1, height=28, width=28,
            mean=(0.1307,), std=(0.3081,),
        ),
        DatasetMeta(
            name="cifar100", class_names=_CIFAR100_CLASSES, channels=3, height=32, width=32,
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        ),
        DatasetMeta(
            name="svhn", class_names=_DIGITS, channels=3, height=32, width=32,
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        ),
    )
}

_ALIASES = {
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar-100": "cifar100", "cifar_100": "cifar100",
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
}


def get_meta(name: str) -> DatasetMeta:
    """Metadata of dataset ``name`` (no loading). Unknown name -> :class:`DatasetError`."""
    if not isinstance(name, str):
        raise DatasetError(f"data.dataset: expected a dataset name string, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DatasetError(f"data.dataset: unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[key]
