"""Fashion-MNIST (Zalando's 28x28 grey clothing images, 10 classes) read from Debian's
dataset-fashion-mnist: 60,000 train and 10,000 test images in the original gzip-compressed IDX files.

The Debian package is found installed (/usr/share/datasets/fashion-mnist) or unpacked in the cache
(`apt-get download dataset-fashion-mnist` and `dpkg-deb -x` into $SECATEURS_CACHE/debian/
dataset-fashion-mnist/), the same two places secateurs.data.reviews looks for its package.

IDX is a big-endian format: a 4-byte magic (two zero bytes, a type code, the number of dimensions),
one uint32 per dimension, then the data in C order. Images are magic 2051 (unsigned bytes, 3 dims),
labels magic 2049 (unsigned bytes, 1 dim).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import torch

from secateurs.errors import FormatError, SecateursError
from secateurs.io import cache_dir

PACKAGE = "dataset-fashion-mnist"
DATA_DIR = Path("usr/share/datasets/fashion-mnist")
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
IMAGE_SIDE = 28
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def fashion_mnist_dir() -> Path:
    """The directory holding the four IDX files: the installed package first, then the cache."""
    candidates = [root / DATA_DIR for root in (Path("/"), cache_dir() / "debian" / PACKAGE)]
    for directory in candidates:
        if (directory / "train-images-idx3-ubyte.gz").is_file():
            return directory
    raise SecateursError(f"Fashion-MNIST needs Debian's {PACKAGE}: `apt-get download {PACKAGE}` and `dpkg-deb -x` "
                         f"it into {cache_dir() / 'debian' / PACKAGE} (looked in {' and '.join(map(str, candidates))})")


def read_idx(path: Path, magic: int, dims: int) -> torch.Tensor:
    """The uint8 array of one gzip IDX file, checked against the expected magic and number of
    dimensions and its data length against the header; FormatError (one line, naming the file and
    the Debian package) when it is missing, truncated or not that kind of file."""
    path = Path(path)

    def bad(reason: str) -> FormatError:
        return FormatError(f"{path}: {reason} (expected a gzip IDX file of Debian's {PACKAGE})")

    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise bad("file not found") from None
    except (OSError, EOFError, zlib.error) as exc:  # not gzip, or a gzip stream cut short
        raise bad(f"unreadable gzip data ({exc})") from None
    header_bytes = 4 + 4 * dims
    if len(raw) < 4:
        raise bad(f"only {len(raw)} bytes, too short for an IDX header")
    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        raise bad(f"magic number {found_magic}, expected {magic}")
    if len(raw) < header_bytes:
        raise bad(f"header cut short at {len(raw)} bytes")
    shape = struct.unpack(f">{dims}I", raw[4:header_bytes])
    expected = 1
    for size in shape:
        expected *= size
    if len(raw) - header_bytes != expected:
        raise bad(f"{len(raw) - header_bytes} data bytes, the header's shape {tuple(shape)} needs {expected}")
    # bytearray: torch.frombuffer wants a writable buffer, and the copy is what we keep anyway.
    return torch.frombuffer(bytearray(raw[header_bytes:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str, directory: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of "train" (60,000) or "test" (10,000);
    `directory` overrides where the IDX files are looked for."""
    if split not in SPLIT_PREFIXES:
        raise SecateursError(f"Fashion-MNIST split must be one of {', '.join(SPLIT_PREFIXES)}, got {split!r}")
    directory = fashion_mnist_dir() if directory is None else Path(directory)
    prefix = SPLIT_PREFIXES[split]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, IMAGE_MAGIC, 3)
    labels = read_idx(labels_path, LABEL_MAGIC, 1).long()
    if tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise FormatError(f"{images_path}: images are {tuple(images.shape[1:])}, expected 28x28 "
                          f"(expected a gzip IDX file of Debian's {PACKAGE})")
    if len(images) != len(labels):
        raise FormatError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name} "
                          f"(expected a gzip IDX file of Debian's {PACKAGE})")
    if int(labels.max()) >= len(CLASS_NAMES):
        raise FormatError(f"{labels_path}: label {int(labels.max())} out of range 0-9 "
                          f"(expected a gzip IDX file of Debian's {PACKAGE})")
    return images, labels
