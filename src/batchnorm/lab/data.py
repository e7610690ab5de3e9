"""Data sets for the lab: MNIST-1D (built locally), sklearn's digits, and user files by path.

Every loader returns a `Dataset` of float32 inputs standardized with the training set's mean and
standard deviation, int64 labels in 0..classes-1, and the per-example shape: (1, L) for sequences
(the 1d CNN reads them), (C, H, W) for images (the 2d CNN). User files are parsed by hand or with
`np.load(allow_pickle=False)`: no pickle is ever loaded, so a file can't run code.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data set that can't be loaded; the message names the file and what was wrong."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, *shape) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """A hash of the arrays: the run cache must not mix results from different data."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.y_train), "test": len(self.y_test),
                "shape": list(self.shape), "classes": self.classes,
                "fingerprint": self.fingerprint()}


def load(spec: str) -> Dataset:
    """`mnist1d`, `digits`, or a path: an idx directory, a CIFAR-10 binary directory, an `.npz`."""
    if spec == "mnist1d":
        return _mnist1d()
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data: expected mnist1d, digits, or an existing path, got {spec!r} "
                        f"(no such file or directory)")
    if path.is_dir():
        if sorted(path.glob("data_batch_*.bin")):
            return _cifar10_binary(path)
        return _idx_dir(path)
    if path.suffix == ".npz":
        return _npz(path)
    raise DataError(f"{path}: expected a directory of idx files, a directory of CIFAR-10 binary "
                    f"batches, or an .npz file, got a file with suffix {path.suffix!r}")


def _finish(name, x_train, y_train, x_test, y_test, source) -> Dataset:
    """Checks labels and shapes and standardizes with the training set's statistics."""
    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(f"{source}: {part} inputs and labels differ in length "
                            f"({len(x)} inputs, {len(y)} labels)")
        if len(x) == 0:
            raise DataError(f"{source}: the {part} split is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{source}: {part} labels must be non-negative integers, got dtype "
                            f"{y.dtype} with minimum {y.min()}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{source}: train examples have shape {x_train.shape[1:]} but test "
                        f"examples {x_test.shape[1:]}")
    x_train = x_train.astype(np.float64)
    x_test = x_test.astype(np.float64)
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise DataError(f"{source}: inputs contain NaN or infinite values")
    mean, std = x_train.mean(), x_train.std()
    std = std if std > 0 else 1.0
    classes = int(max(y_train.max(), y_test.max())) + 1
    if classes < 2:
        raise DataError(f"{source}: expected at least 2 classes, got {classes}")
    return Dataset(name, ((x_train - mean) / std).astype(np.float32), y_train.astype(np.int64),
                   ((x_test - mean) / std).astype(np.float32), y_test.astype(np.int64), classes)


def _as_examples(x: np.ndarray, source) -> np.ndarray:
    """(N, L) -> (N, 1, L) sequences; (N, H, W) -> (N, 1, H, W); (N, C, H, W) kept."""
    if x.ndim == 2 or x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x
    raise DataError(f"{source}: expected inputs of shape (N, L), (N, H, W) or (N, C, H, W), got "
                    f"{x.shape}")


def _mnist1d() -> Dataset:
    # make_dataset builds the data from templates and a fixed seed (42): 4000 train / 1000 test,
    # length 40 (Greydanus 2020); get_dataset would download a pickle instead.
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return _finish("mnist1d", d["x"][:, None], d["y"], d["x_test"][:, None], d["y_test"],
                   "mnist1d")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.25,
                                              stratify=d.target, random_state=0)
    return _finish("digits", x_tr[:, None], y_tr, x_te[:, None], y_te, "digits")


def _npz(path: Path) -> Dataset:
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would try to unpickle anything not a zip
            raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise DataError(f"{path}: expected arrays x_train, y_train, x_test, y_test, "
                                f"missing {sorted(missing)} (has {sorted(f.files)})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except ValueError as e:  # object arrays would need pickle, which allow_pickle=False refuses
        raise DataError(f"{path}: can't read without unpickling: {e}") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError: not a usable npz
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return _finish(path.name, _as_examples(arrays["x_train"], path), arrays["y_train"],
                   _as_examples(arrays["x_test"], path), arrays["y_test"], path)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an idx file (expected magic 00 00 <type> <ndim>, got "
                        f"{raw[:4].hex(' ') or 'an empty file'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header for {ndim} dimensions is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: idx header says shape {dims} ({expected} bytes of data), but the "
                        f"file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _idx_dir(path: Path) -> Dataset:
    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                     stem.replace("-idx", ".idx") + ".gz"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: expected an idx file {stem}[.gz] (MNIST layout: "
                        f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        f"t10k-labels-idx1-ubyte), not found")

    files = [find(s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    x_tr, y_tr, x_te, y_te = (_read_idx(f) for f in files)
    for f, y in ((files[1], y_tr), (files[3], y_te)):
        if y.ndim != 1:
            raise DataError(f"{f}: expected 1-D labels, got shape {y.shape}")
    return _finish(path.name, _as_examples(x_tr, files[0]), y_tr, _as_examples(x_te, files[2]),
                   y_te, path)


def _cifar10_binary(path: Path) -> Dataset:
    # Each record: 1 label byte, then 3072 bytes of a 32x32 image in channel-major (R, G, B) order.
    def read(files):
        xs, ys = [], []
        for f in files:
            raw = np.fromfile(f, np.uint8)
            if raw.size == 0 or raw.size % 3073:
                raise DataError(f"{f}: expected CIFAR-10 binary records of 3073 bytes, got "
                                f"{raw.size} bytes ({raw.size % 3073} left over)")
            rec = raw.reshape(-1, 3073)
            if rec[:, 0].max() > 9:
                raise DataError(f"{f}: labels must be 0..9, found {rec[:, 0].max()}")
            ys.append(rec[:, 0])
            xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
        return np.concatenate(xs), np.concatenate(ys)

    test = path / "test_batch.bin"
    if not test.is_file():
        raise DataError(f"{path}: has data_batch_*.bin but no test_batch.bin")
    x_tr, y_tr = read(sorted(path.glob("data_batch_*.bin")))
    x_te, y_te = read([test])
    return _finish(path.name, x_tr, y_tr, x_te, y_te, path)
