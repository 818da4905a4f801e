"""Readers of the standard image-classification files, from a local folder (nothing is downloaded):
MNIST-style IDX files (MNIST, Fashion-MNIST) and CIFAR-10's python pickle batches.

Each reader returns ``X [N, C, H, W]`` uint8 pixels and ``y [N]`` int64 labels for the training
and the test part. A missing file raises :class:`FileNotFoundError`, a malformed one
:class:`ValueError`; both name the file and what was expected, for the caller to wrap into its own
config error.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MNIST_FILES", "CIFAR10_FILES", "find_file", "read_cifar10", "read_cifar10_batch", "read_idx",
           "read_mnist"]

# the IDX element types (the third byte of the magic number) and their big-endian numpy dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
"""The four IDX files of MNIST and of Fashion-MNIST (same names), each may be gzipped (``.gz``)."""

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
"""CIFAR-10's python batches (``cifar-10-python.tar.gz``, extracted: ``cifar-10-batches-py/``)."""


def find_file(directory: str | Path, name: str) -> Path:
    """``directory/name``, else its gzipped ``name.gz``, else the dotted variant some mirrors use
    (``train-images.idx3-ubyte``); :class:`FileNotFoundError` naming ``name`` when none exists."""
    directory = Path(directory).expanduser()
    dotted = name.replace("-idx", ".idx")
    for candidate in dict.fromkeys((name, name + ".gz", dotted, dotted + ".gz")):
        path = directory / candidate
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} (or {name}.gz) is not in {str(directory)!r}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off .gz: EOFError
        raise ValueError(f"{path}: cannot be read ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (plain or gzipped), in its native shape and element type.

    Format: 2 zero bytes, a type byte (``0x08`` uint8, ..., ``0x0E`` float64), a byte with the
    number of dimensions ``k``, ``k`` big-endian uint32 sizes, then the elements, big-endian,
    row-major. A wrong magic number or a size that does not match the header raises :class:`ValueError`.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected "
                         "0000 then a type byte 08-0e and the number of dimensions)")
    k = raw[3]
    header = 4 + 4 * k
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {k} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=k, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header (shape {dims}, {dtype.name}) needs "
                         f"{expected}: the file is {'truncated' if len(raw) < expected else 'too long'}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(directory: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    X_path, y_path = find_file(directory, images), find_file(directory, labels)
    X, y = read_idx(X_path), read_idx(y_path)
    if X.ndim != 3 or X.dtype != np.uint8:
        raise ValueError(f"{X_path}: expected uint8 images [N, H, W], got {X.dtype} {X.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise ValueError(f"{y_path}: expected uint8 labels [N], got {y.dtype} {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"{X_path} holds {len(X)} images but {y_path} {len(y)} labels")
    return X[:, None], y.astype(np.int64)


def read_mnist(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST from the four IDX files of :data:`MNIST_FILES` in ``directory``:
    ``X_train [60000, 1, 28, 28]`` uint8, ``y_train [60000]`` int64, ``X_test [10000, 1, 28, 28]``,
    ``y_test [10000]`` (any sizes the files hold; train and test images must have the same size)."""
    directory = Path(directory).expanduser()
    f = MNIST_FILES
    Xtr, ytr = _idx_pair(directory, f["train_images"], f["train_labels"])
    Xte, yte = _idx_pair(directory, f["test_images"], f["test_labels"])
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise ValueError(f"{directory}: train images are {Xtr.shape[2:]} but test images {Xte.shape[2:]}")
    return Xtr, ytr, Xte, yte


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and scalars only: a pickle is code, and these files come
    from outside; anything else (a function, a class) is refused instead of run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``X [n, 3, 32, 32]`` uint8 and ``y [n]`` int64 (the pickle's
    ``b"data"`` ``[n, 3072]``, channel-major, and ``b"labels"``), read with ``encoding="bytes"``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels', "
                         f"got {keys})")
    X, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if X.dtype != np.uint8 or X.ndim != 2 or X.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [n, 3072], got {X.dtype} {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{path}: {len(X)} images but b'labels' has shape {y.shape}")
    return X.reshape(-1, 3, 32, 32), y.astype(np.int64)


def read_cifar10(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 from the batches of :data:`CIFAR10_FILES` in ``directory`` or in its
    ``cifar-10-batches-py/``: ``X_train [50000, 3, 32, 32]`` uint8, ``y_train [50000]`` int64,
    ``X_test [10000, 3, 32, 32]``, ``y_test [10000]``."""
    directory = Path(directory).expanduser()
    nested = directory / "cifar-10-batches-py"
    if not (directory / CIFAR10_FILES[0]).is_file() and nested.is_dir():
        directory = nested
    missing = [name for name in CIFAR10_FILES if not (directory / name).is_file()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise FileNotFoundError(f"{', '.join(missing)} {verb} not in {str(directory)!r}")
    train = [read_cifar10_batch(directory / name) for name in CIFAR10_FILES[:-1]]
    Xte, yte = read_cifar10_batch(directory / CIFAR10_FILES[-1])
    return np.concatenate([X for X, _ in train]), np.concatenate([y for _, y in train]), Xte, yte
