import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# pytest-xdist already runs one process per core; more intra-op threads per process only contend
# (the lab's own workers run single-threaded for the same reason)
torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An idx file written from the format's description (big-endian dims after a 4-byte magic)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                          *array.shape)
    raw = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def separable(n: int, shape=(8, 8), classes: int = 3, seed: int = 0):
    """Images whose class sets the mean brightness of one quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
    for c in range(classes):
        x[y == c, : shape[0] // 2, c * 2:(c + 1) * 2] += 150
    return x, y.astype(np.uint8)


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    d = tmp_path / "idx"
    d.mkdir()
    x, y = separable(400)
    write_idx(d / "train-images-idx3-ubyte", x[:300], compress=True)
    write_idx(d / "train-labels-idx1-ubyte", y[:300], compress=True)
    write_idx(d / "t10k-images-idx3-ubyte", x[300:])
    write_idx(d / "t10k-labels-idx1-ubyte", y[300:])
    return d


@pytest.fixture
def npz_file(tmp_path) -> Path:
    x, y = separable(400, seed=1)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return path


def lab(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchnorm", "lab", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)
