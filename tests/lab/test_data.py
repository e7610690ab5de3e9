import re

import numpy as np
import pytest

from batchnorm.lab import data
from conftest import separable, write_idx


def _standardized(train, test):
    mean, std = train.astype(np.float64).mean(), train.astype(np.float64).std()
    return (train - mean) / std, (test - mean) / std


def test_idx_directory_gzipped_and_plain(idx_dir):
    x, y = separable(400)
    d = data.load(str(idx_dir))
    want_train, want_test = _standardized(x[:300], x[300:])
    assert d.x_train.shape == (300, 1, 8, 8) and d.x_test.shape == (100, 1, 8, 8)
    np.testing.assert_allclose(d.x_train[:, 0], want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.x_test[:, 0], want_test, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.y_train, y[:300])
    assert d.classes == 3


def test_npz(npz_file):
    x, y = separable(400, seed=1)
    d = data.load(str(npz_file))
    want_train, _ = _standardized(x[:300], x[300:])
    np.testing.assert_allclose(d.x_train[:, 0], want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.y_test, y[300:])


def test_cifar10_binary_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(5, -1)], axis=1)
    records[:3].tofile(tmp_path / "data_batch_1.bin")
    records[3:4].tofile(tmp_path / "data_batch_2.bin")
    records[4:].tofile(tmp_path / "test_batch.bin")
    d = data.load(str(tmp_path))
    want, _ = _standardized(images[:4], images[4:])
    np.testing.assert_allclose(d.x_train, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.y_train, labels[:4])
    assert d.shape == (3, 32, 32)


def test_digits_split_is_stratified_and_fixed():
    a, b = data.load("digits"), data.load("digits")
    assert len(a.y_train) + len(a.y_test) == 1797 and len(a.y_test) == 450
    per_class = np.bincount(np.concatenate([a.y_train, a.y_test]))
    assert np.abs(np.bincount(a.y_test) - 0.25 * per_class).max() <= 1
    assert a.fingerprint() == b.fingerprint()


def test_mnist1d_matches_the_published_sizes():
    d = data.load("mnist1d")
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.classes == 10
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-4


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x64ab"),
     "idx header says shape (100,)"),
    (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx"),
     "not an idx file"),
    (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken"),
     "not a valid gzip file"),
    (lambda d: (d / "t10k-images-idx3-ubyte").unlink(), "expected an idx file t10k-images"),
])
def test_malformed_idx_names_the_file(idx_dir, corrupt, message):
    corrupt(idx_dir)
    with pytest.raises(data.DataError, match=re.escape(message)) as e:
        data.load(str(idx_dir))
    assert str(idx_dir) in str(e.value)


def test_idx_labels_and_images_must_agree(idx_dir):
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(data.DataError, match="test inputs and labels differ in length"):
        data.load(str(idx_dir))


def test_npz_never_unpickles(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros((1, 4)), y_test=np.zeros(1))
    with pytest.raises(data.DataError, match="objects.npz: can't read without unpickling"):
        data.load(str(path))


@pytest.mark.parametrize("write, message", [
    (lambda p: np.savez(p, x_train=np.zeros((4, 5))), "missing \\['x_test', 'y_test', 'y_train'\\]"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz file"),
    (lambda p: np.savez(p, x_train=np.zeros((4, 5)), y_train=np.array([0, 1, -1, 0]),
                        x_test=np.zeros((2, 5)), y_test=np.array([0, 1])),
     "labels must be non-negative integers"),
])
def test_malformed_npz(tmp_path, write, message):
    path = tmp_path / "bad.npz"
    write(path)
    with pytest.raises(data.DataError, match=message) as e:
        data.load(str(path))
    assert str(path) in str(e.value)


def test_unknown_spec():
    with pytest.raises(data.DataError, match="--data: expected mnist1d, digits, or an existing "
                                             "path, got 'nope.npz'"):
        data.load("nope.npz")


def test_cifar_truncated_record(tmp_path):
    np.zeros(3073 * 2 + 5, np.uint8).tofile(tmp_path / "data_batch_1.bin")
    np.zeros(3073, np.uint8).tofile(tmp_path / "test_batch.bin")
    with pytest.raises(data.DataError, match="data_batch_1.bin: expected CIFAR-10 binary records"):
        data.load(str(tmp_path))
