"""The image-file readers (metaopt.images) and the distill recipe's MNIST / Fashion-MNIST / CIFAR-10
datasets, on tiny IDX files and CIFAR pickles written here (no real data needed)."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from metaopt.images import find_file, read_cifar10, read_idx, read_mnist
from metaopt.models import AlexCifarNet, LeNet
from metaopt.run.config import ConfigError, from_dict

MNIST = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(a: np.ndarray) -> bytes:
    """``a`` (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian uint32 dims, the bytes."""
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_mnist(folder, n_train=40, n_test=20, gz=False, size=28, seed=0):
    """Tiny MNIST-like IDX files; pixel (0, 0) of image i is its label, for checking the order."""
    rng = np.random.RandomState(seed)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        X = rng.randint(0, 256, (n, size, size)).astype(np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        X[:, 0, 0] = y
        out[part] = (X, y)
        for kind, a in (("images", X), ("labels", y)):
            name = MNIST[f"{part}_{kind}"]
            raw = idx_bytes(a)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return out


def write_cifar(folder, n=12, protocol=2, seed=0):
    """Tiny CIFAR-10 python batches (``n`` images each) as the official archive holds them."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, n)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=protocol)
    return batches


# -- metaopt.images ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_read_back_plain_and_gzipped(tmp_path, gz):
    ref = write_mnist(tmp_path, gz=gz)
    Xtr, ytr, Xte, yte = read_mnist(tmp_path)
    assert Xtr.shape == (40, 1, 28, 28) and Xte.shape == (20, 1, 28, 28)
    assert Xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert np.array_equal(Xtr[:, 0], ref["train"][0]) and np.array_equal(ytr, ref["train"][1])
    assert np.array_equal(Xte[:, 0], ref["test"][0]) and np.array_equal(yte, ref["test"][1])


def test_idx_reads_other_types_and_the_dotted_names(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "a.idx").write_bytes(struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 3) + a.tobytes())
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.int32 and np.array_equal(out, a)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(b"")  # a mirror's spelling
    assert find_file(tmp_path, "train-images-idx3-ubyte").name == "train-images.idx3-ubyte"


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x08" + raw[3:4] + raw[4:], None),  # intact, control
    (lambda raw: b"\x12\x34" + raw[2:], "not an IDX file"),  # wrong magic
    (lambda raw: raw[:4] + raw[4:-7], "truncated"),  # cut short
    (lambda raw: raw + b"\x00", "too long"),
    (lambda raw: raw[:6], "truncated IDX header"),
])
def test_idx_errors_name_the_file_and_the_problem(tmp_path, damage, message):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    if message is None:
        assert read_idx(path).shape == (2, 3, 3)
        return
    with pytest.raises(ValueError, match=message) as e:
        read_idx(path)
    assert "x-idx3-ubyte" in str(e.value)


def test_truncated_gzip_and_mismatched_counts_are_errors(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        read_mnist(tmp_path)
    write_mnist(tmp_path, gz=True, n_test=30)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
    with pytest.raises(ValueError, match="holds 30 images but .* 7 labels"):
        read_mnist(tmp_path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches_read_back_in_folder_or_subfolder(tmp_path, protocol):
    ref = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    Xtr, ytr, Xte, yte = read_cifar10(tmp_path)  # finds the subfolder
    assert Xtr.shape == (60, 3, 32, 32) and Xte.shape == (12, 3, 32, 32) and Xtr.dtype == np.uint8
    assert np.array_equal(Xtr[12:24].reshape(12, -1), ref["data_batch_2"][0])
    assert ytr.dtype == np.int64 and list(yte) == ref["test_batch"][1]
    assert read_cifar10(tmp_path / "cifar-10-batches-py")[0].shape == (60, 3, 32, 32)


def test_cifar10_errors(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is not in"):
        read_cifar10(tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:500])
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
        read_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 \[n, 3072\]"):
        read_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:  # a pickle that would run code is refused, not run
        pickle.dump({b"data": print}, f)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        read_cifar10(tmp_path)


# -- the distill recipe's datasets ---------------------------------------------------------------


def test_distill_mnist_is_standardised_flat_images(tmp_path):
    from metaopt.recipes.distill.data import load

    ref = write_mnist(tmp_path, gz=True)
    data = load("mnist", str(tmp_path))
    assert data.image == (1, 28, 28) and data.classes == 10 and data.outputs == 10
    assert data.X.shape == (40, 784) and data.X_test.shape == (20, 784) and data.X.dtype == torch.float32
    assert data.y.dtype == torch.int64 and torch.equal(data.y, torch.from_numpy(ref["train"][1]).long())
    pixels = torch.from_numpy(ref["train"][0]).float().reshape(40, -1) / 255
    torch.testing.assert_close(data.X, (pixels - 0.1307) / 0.3081)  # [0, 1], then mean/std
    small = load("fashion", str(tmp_path), train_size=15, test_size=5)
    assert small.X.shape == (15, 784) and small.X_test.shape == (5, 784)
    # subsampled rows are rows of the full set (pixel (0, 0) encodes the label)
    assert torch.equal(((small.X[:, 0] * 0.3530 + 0.2860) * 255).round().long(), small.y)


def test_distill_cifar10_keeps_channels(tmp_path):
    from metaopt.recipes.distill.data import load

    ref = write_cifar(tmp_path)
    data = load("cifar10", str(tmp_path))
    assert data.image == (3, 32, 32) and data.X.shape == (60, 3072) and data.X_test.shape == (12, 3072)
    img = data.X_test[0].reshape(3, 32, 32)
    raw = torch.from_numpy(ref["test_batch"][0][0]).float().reshape(3, 32, 32) / 255
    torch.testing.assert_close(img[1], (raw[1] - 0.4822) / 0.2435)  # the green channel


@pytest.mark.parametrize("setup, name, message", [
    (lambda d: None, "mnist", r"distill.data_dir = '.*missing' is not a directory: distill.dataset = 'mnist' "
                              r"reads train-images-idx3-ubyte, .* get them from http://yann.lecun.com"),
    (lambda d: d.mkdir(), "fashion", r"train-images-idx3-ubyte \(or train-images-idx3-ubyte.gz\) is not in"
                                     r".*fashion-mnist"),
    (lambda d: (d.mkdir(), write_mnist(d), (d / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x07\x01")),
     "mnist", "not an IDX file"),
    (lambda d: (d.mkdir(), write_mnist(d, size=8)), "cifar10", r"data_batch_1, .* are not in .*cifar-10-python"),
])
def test_distill_data_errors_are_one_line_and_say_where_to_get_the_files(tmp_path, setup, name, message):
    from metaopt.recipes.distill.data import load

    folder = tmp_path / "missing"
    setup(folder)
    with pytest.raises(ConfigError, match=message) as e:
        load(name, str(folder))
    assert "\n" not in str(e.value) and "distill.data_dir" in str(e.value)


def test_distill_config_needs_a_known_dataset_and_a_data_dir():
    from metaopt.recipes.distill import Config

    with pytest.raises(ConfigError, match=r"distill.dataset = 'imagenet' is not allowed; use one of .*'cifar10'"):
        from_dict(Config, {"distill": {"dataset": "imagenet"}})
    with pytest.raises(ConfigError, match=r"distill.dataset = 'cifar10' needs distill.data_dir: .*data_batch_1"):
        from_dict(Config, {"distill": {"dataset": "cifar10"}})
    with pytest.raises(ConfigError, match="distill.train_size = -1 must be >= 0"):
        from_dict(Config, {"distill": {"dataset": "mnist", "data_dir": "x", "train_size": -1}})
    cfg = from_dict(Config, {"distill": {"dataset": "mnist", "data_dir": "x", "archs": ["lenet"], "rows": ["lenet"]}})
    assert cfg.distill.data_dir == "x"


# -- Wang et al.'s architectures -------------------------------------------------------------------


def test_lenet_and_alexnet_take_both_image_sizes():
    for image in ((1, 28, 28), (3, 32, 32)):
        for cls in (LeNet, AlexCifarNet):
            net = cls(image, 10)
            assert net(torch.randn(2, 5, int(np.prod(image)))).shape == (2, 5, 10)
    assert sum(p.numel() for p in LeNet((1, 28, 28), 10).parameters()) == 61706
    assert sum(p.numel() for p in AlexCifarNet((3, 32, 32), 10).parameters()) == 1756426  # 4096 features
    with pytest.raises(ValueError, match="too small"):
        LeNet((1, 8, 8), 10)


def test_lenet_distillation_hypergradient_runs_batched(tmp_path):
    """One hypergradient through a few inner steps of two LeNet members on tiny MNIST files."""
    from metaopt import hypergradient, optim
    from metaopt.recipes.distill import Distillation
    from metaopt.recipes.distill.archs import build
    from metaopt.recipes.distill.data import load

    write_mnist(tmp_path, n_train=30, n_test=10)
    data = load("mnist", str(tmp_path))
    obj = Distillation(data, {"lenet": build("lenet", data)}, {"lenet": ["lenet"] * 2}, restarts=1,
                       steps_per_epoch=2, epochs=1, per_class=1, batch=8, dtype=torch.float64)
    hyper = obj.init_hyper(torch.Generator().manual_seed(0), lr=0.01)
    res = hypergradient(obj, optim.sgd(), hyper, obj.steps, method="full", generator=torch.Generator().manual_seed(1))
    assert res.grads["x"].shape == (1, 2, 10, 784) and torch.isfinite(res.grads["x"]).all()
    assert res.grads["x"].abs().sum() > 0 and torch.isfinite(res.grads["lr"]).all()


def test_colour_distilled_images_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from metaopt.recipes.distill import Distillation
    from metaopt.recipes.distill.archs import build
    from metaopt.recipes.distill.data import load
    from metaopt.recipes.distill.plots import image_grid

    write_cifar(tmp_path / "data", n=2)
    data = load("cifar10", str(tmp_path / "data"))
    obj = Distillation(data, {"convnet": build("convnet", data)}, {"convnet": ["convnet"]}, steps_per_epoch=2,
                       epochs=1, per_class=1, batch=4)
    path = image_grid(obj, obj.init_hyper(torch.Generator().manual_seed(0)), tmp_path)
    assert path.name == "distilled_images.png" and path.stat().st_size > 1000
