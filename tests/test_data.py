"""sdlib.data on real CIFAR-10 images: both on-disk forms, the cache, the stratified split, subsets, errors,
normalization and the vectorized crop-and-flip augmentation (checked against torchvision's functional ops)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import sdlib.data as data
from sdlib.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10Splits,
    detect_layout,
    load_cifar10,
    load_splits,
    stratified_split,
)
from sdlib.augment import augment, crop_flip, normalize, sample_crop_flip

def cache_path(root, split):
    """The cache file that serves load_cifar10(root, split) now (ImageFolder), or None."""
    name = data._cache_name(split, data.split_fingerprint(root, split))
    return next((d / name for d in data._cache_dirs(Path(root)) if (d / name).is_file()), None)


MEAN = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _trusted(trusted_pickles):
    """The pickles these tests write are read as the published ones (their MD5s are trusted, see conftest)."""


@pytest.fixture
def tiny_copy(tiny_cifar_root, tmp_path):
    """A private, editable copy of the tiny ImageFolder root (without any cache another test left in it)."""
    dest = tmp_path / "cifar"
    shutil.copytree(tiny_cifar_root, dest, ignore=shutil.ignore_patterns(".sdlib_cache"))
    return dest


@pytest.fixture
def no_decode(monkeypatch):
    """Make any image decoding fail, to prove a result came from the cache or an error came before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(data, "_decode_images", refuse)


def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = data._decode_images

    def counting(paths, progress):
        calls.append(len(paths))
        return real(paths, progress)

    monkeypatch.setattr(data, "_decode_images", counting)
    return calls


# ------------------------------------------------------------------------------------------------ the two forms


def test_tiny_fixture_is_a_real_image_folder(tiny_cifar_root):
    for split, k in (("train", 40), ("test", 10)):
        assert sorted(p.name for p in (tiny_cifar_root / split).iterdir()) == sorted(CIFAR10_CLASSES)
        for cls in CIFAR10_CLASSES:
            names = sorted(p.name for p in (tiny_cifar_root / split / cls).iterdir())
            assert len(names) == k and all(n.endswith(".jpg") for n in names)


def test_imagefolder_matches_reference_decoder_and_torchvision_order(tiny_copy, decode_image_folder):
    import torchvision

    for split in ("train", "test"):
        x, y = load_cifar10(tiny_copy, split)
        ref_x, ref_y, ref_paths = decode_image_folder(tiny_copy / split)
        assert x.dtype == torch.uint8 and x.shape == (len(ref_y), 3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64
        assert np.array_equal(x.numpy(), ref_x) and np.array_equal(y.numpy(), ref_y)
        # Same sample order and labels as torchvision's ImageFolder, whose classes are the sorted folder names.
        folder = torchvision.datasets.ImageFolder(str(tiny_copy / split))
        assert tuple(folder.classes) == CIFAR10_CLASSES
        assert [Path(p) for p, _ in folder.samples] == ref_paths
        assert folder.targets == y.tolist()
        assert detect_layout(tiny_copy, split) == "imagefolder"


def test_pickle_form_loads_the_same_images_as_the_image_folder(tiny_copy, decode_image_folder, write_cifar_pickle,
                                                               tmp_path):
    x_tr, y_tr = load_cifar10(tiny_copy, "train")
    x_te, y_te = load_cifar10(tiny_copy, "test")
    # The published batches are not class-sorted: write them in a shuffled order and undo it after loading.
    perm = np.random.default_rng(7).permutation(len(y_tr))
    proot = write_cifar_pickle(tmp_path / "pickle", x_tr.numpy()[perm], y_tr.numpy()[perm],
                               x_te.numpy(), y_te.numpy())
    assert detect_layout(proot, "train") == "pickle"
    px_tr, py_tr = load_cifar10(proot, "train")
    px_te, py_te = load_cifar10(proot, "test")
    assert px_tr.dtype == torch.uint8 and px_tr.shape == x_tr.shape and px_tr.is_contiguous()
    assert torch.equal(px_tr, x_tr[perm]) and torch.equal(py_tr, y_tr[perm])
    assert torch.equal(px_te, x_te) and torch.equal(py_te, y_te)
    assert not (proot / ".sdlib_cache").exists()  # raw pixels already: nothing to cache
    # root may also be the cifar-10-batches-py folder itself.
    px_te2, _ = load_cifar10(proot / "cifar-10-batches-py", "test")
    assert torch.equal(px_te2, x_te)


def test_pickle_pixel_convention_is_rgb_planes_row_major(tiny_cifar_pickle_root, tiny_cifar_root):
    """b'data' rows are R plane, G plane, B plane, each row-major: check against PIL pixels directly."""
    with open(tiny_cifar_pickle_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    first_test_image = sorted((tiny_cifar_root / "test" / CIFAR10_CLASSES[0]).iterdir())[0]
    with Image.open(first_test_image) as im:
        row = batch["data"][0]
        for r, c in [(0, 0), (0, 31), (5, 17), (31, 0), (31, 31)]:
            assert tuple(row[ch * 1024 + r * 32 + c] for ch in range(3)) == im.getpixel((c, r))
    x, y = load_cifar10(tiny_cifar_pickle_root, "test")
    with Image.open(first_test_image) as im:
        assert np.array_equal(x[0].permute(1, 2, 0).numpy(), np.asarray(im)) and y[0] == 0


def test_load_splits_identical_for_both_forms(tiny_copy, write_cifar_pickle, tmp_path):
    x_tr, y_tr = load_cifar10(tiny_copy, "train")
    x_te, y_te = load_cifar10(tiny_copy, "test")
    proot = write_cifar_pickle(tmp_path / "p", x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy())
    a = load_splits(tiny_copy, n_val=100, split_seed=3)
    b = load_splits(proot, n_val=100, split_seed=3)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "train_idx", "val_idx", "test_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["layout"] == "imagefolder" and b.meta["layout"] == "pickle"


def test_full_cifar10(cifar_jpeg_root, decode_image_folder):
    s = load_splits(cifar_jpeg_root)  # decodes 60k JPEGs once and caches them
    assert s.meta["sizes"] == {"train": 45000, "val": 5000, "test": 10000}
    assert s.meta["source_sizes"] == {"train": 50000, "test": 10000}
    assert s.meta["class_counts"] == {"train": [4500] * 10, "val": [500] * 10, "test": [1000] * 10}
    assert s.x_train.shape == (45000, 3, 32, 32) and s.x_test.dtype == torch.uint8
    assert set(s.train_idx.tolist()).isdisjoint(s.val_idx.tolist())
    assert cache_path(cifar_jpeg_root, "train") is not None and cache_path(cifar_jpeg_root, "test") is not None
    # Spot-check images against one-at-a-time PIL decoding of the file each index names.
    import torchvision

    folder = torchvision.datasets.ImageFolder(str(cifar_jpeg_root / "train"))
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(s.val_idx), 20, replace=False):
        path, target = folder.samples[int(s.val_idx[pos])]
        with Image.open(path) as im:
            assert np.array_equal(s.x_val[pos].permute(1, 2, 0).numpy(), np.asarray(im))
        assert s.y_val[pos] == target
    again = load_splits(cifar_jpeg_root)  # from the cache now
    assert torch.equal(again.x_val, s.x_val) and torch.equal(again.y_train, s.y_train)


# ---------------------------------------------------------------------------------------------------- the cache


def test_cache_is_written_used_and_invalidated(tiny_copy, monkeypatch):
    calls = count_decodes(monkeypatch)
    x1, y1 = load_cifar10(tiny_copy, "train")
    assert calls == [400]
    cached = cache_path(tiny_copy, "train")
    assert cached is not None and cached.parent == tiny_copy / ".sdlib_cache"
    assert cached.name.startswith("train-imagefolder-") and cached.suffix == ".pt"
    assert not list(cached.parent.glob("*.tmp"))  # written atomically, no leftovers

    x2, y2 = load_cifar10(tiny_copy, "train")  # served from the cache
    assert calls == [400] and torch.equal(x1, x2) and torch.equal(y1, y2)

    # Overwrite one cat with a dog image (size and mtime change): the folder is decoded again.
    cat = sorted((tiny_copy / "train" / "cat").iterdir())[0]
    dog = sorted((tiny_copy / "train" / "dog").iterdir())[0]
    shutil.copyfile(dog, cat)
    os.utime(cat, ns=(cat.stat().st_atime_ns, cat.stat().st_mtime_ns + 10**9))
    x3, y3 = load_cifar10(tiny_copy, "train")
    assert calls == [400, 400]
    i_cat, i_dog = 3 * 40, 5 * 40  # first file of each class folder
    assert torch.equal(x3[i_cat], x1[i_dog]) and not torch.equal(x3[i_cat], x1[i_cat])
    assert torch.equal(y3, y1)
    new_cache = cache_path(tiny_copy, "train")
    assert new_cache != cached and not cached.exists()  # the stale cache is gone
    assert [p.name for p in new_cache.parent.glob("train-*.pt")] == [new_cache.name]

    # Adding an image changes the file list: decoded again, one more image.
    shutil.copyfile(dog, tiny_copy / "train" / "dog" / "9999.jpg")
    x4, _ = load_cifar10(tiny_copy, "train")
    assert calls == [400, 400, 401] and x4.shape[0] == 401

    # The test split has its own cache.
    load_cifar10(tiny_copy, "test")
    assert calls[-1] == 100 and cache_path(tiny_copy, "test").name.startswith("test-imagefolder-")


def test_cache_false_and_corrupt_cache(tiny_copy, monkeypatch):
    calls = count_decodes(monkeypatch)
    load_cifar10(tiny_copy, "test", cache=False)
    assert not (tiny_copy / ".sdlib_cache").exists()
    x, _ = load_cifar10(tiny_copy, "test")
    path = cache_path(tiny_copy, "test")
    path.write_bytes(path.read_bytes()[:1000])  # truncated file: decoded again and rewritten
    x2, _ = load_cifar10(tiny_copy, "test")
    assert calls == [100, 100, 100] and torch.equal(x, x2)
    x3, _ = load_cifar10(tiny_copy, "test")
    assert calls == [100, 100, 100] and torch.equal(x, x3)


def test_cache_falls_back_to_user_cache_dir(tiny_copy, tmp_path, monkeypatch):
    # The cache folder inside root cannot be created (a file is in the way), as on a read-only data folder.
    (tiny_copy / ".sdlib_cache").write_text("not a folder")
    monkeypatch.setenv("SDLIB_CACHE_DIR", str(tmp_path / "user_cache"))
    calls = count_decodes(monkeypatch)
    x, _ = load_cifar10(tiny_copy, "test")
    path = cache_path(tiny_copy, "test")
    assert path is not None and (tmp_path / "user_cache") in path.parents
    x2, _ = load_cifar10(tiny_copy, "test")
    assert calls == [100] and torch.equal(x, x2)


# ---------------------------------------------------------------------------------------- split and subsets


def test_stratified_split_proportions_and_determinism():
    rng = np.random.default_rng(0)
    balanced = np.repeat(np.arange(10), 500)
    imbalanced = rng.choice(7, size=1234, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.07, 0.03])
    for labels, n_val in [(balanced, 500), (balanced, 123), (imbalanced, 300), (imbalanced, 1), (imbalanced, 1233)]:
        tr, va = stratified_split(torch.from_numpy(labels), n_val=n_val, seed=5)
        assert tr.dtype == va.dtype == torch.int64 and len(va) == n_val
        assert torch.all(tr[1:] > tr[:-1]) and torch.all(va[1:] > va[:-1])  # sorted, no repeats
        assert np.array_equal(np.sort(np.concatenate([tr.numpy(), va.numpy()])), np.arange(len(labels)))
        classes, counts = np.unique(labels, return_counts=True)
        got = np.bincount(labels[va.numpy()], minlength=len(classes))
        share = n_val * counts / len(labels)
        assert np.all(np.abs(got - share) < 1), (got, share)  # every class within one image of its share
        tr2, va2 = stratified_split(labels.tolist(), n_val=n_val, seed=5)  # list input, same seed
        assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert np.array_equal(np.bincount(balanced[stratified_split(balanced, 500)[1].numpy()]), [50] * 10)
    a = stratified_split(balanced, 500, seed=0)[1]
    b = stratified_split(balanced, 500, seed=1)[1]
    assert not torch.equal(a, b)


def test_stratified_split_is_uniform_within_classes():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])  # n_val=50 takes half of each class
    hits = np.zeros(len(labels))
    n_seeds = 400
    for seed in range(n_seeds):
        hits[stratified_split(labels, n_val=50, seed=seed)[1].numpy()] += 1
    # Each image is in the validation part with probability 1/2: binomial(400, 1/2), sd 10.
    assert np.all(np.abs(hits - n_seeds / 2) < 6 * np.sqrt(n_seeds / 4))


def test_load_splits_full_and_subset(tiny_copy):
    full = load_splits(tiny_copy, n_val=100, split_seed=1)
    assert isinstance(full, CIFAR10Splits)
    assert full.meta["sizes"] == {"train": 300, "val": 100, "test": 100}
    assert full.meta["class_counts"]["val"] == [10] * 10
    x_all, y_all = load_cifar10(tiny_copy, "train")
    assert torch.equal(full.x_train, x_all[full.train_idx]) and torch.equal(full.y_val, y_all[full.val_idx])
    json.dumps(full.meta)  # meta can go into a results file as it is
    assert "train=300" in repr(full) and full.num_classes == 10 and full.classes == CIFAR10_CLASSES

    small = load_splits(tiny_copy, n_val=100, split_seed=1, subset=50)
    assert small.meta["subset"] == 50
    assert small.meta["sizes"] == {"train": 50, "val": 50, "test": 50}
    assert all(small.meta["class_counts"][k] == [5] * 10 for k in ("train", "val", "test"))
    # The split is made on the full set first: subset parts are drawn from the full parts.
    assert set(small.val_idx.tolist()) <= set(full.val_idx.tolist())
    assert set(small.train_idx.tolist()) <= set(full.train_idx.tolist())
    assert torch.equal(small.x_val, x_all[small.val_idx]) and torch.equal(small.y_train, y_all[small.train_idx])
    x_te, y_te = load_cifar10(tiny_copy, "test")
    assert torch.equal(small.x_test, x_te[small.test_idx]) and torch.equal(small.y_test, y_te[small.test_idx])
    again = load_splits(tiny_copy, n_val=100, split_seed=1, subset=50)
    assert torch.equal(again.train_idx, small.train_idx) and torch.equal(again.test_idx, small.test_idx)
    other = load_splits(tiny_copy, n_val=100, split_seed=2, subset=50)
    assert not torch.equal(other.val_idx, small.val_idx)

    # subset larger than a part keeps that part whole; n_val below subset keeps all of validation.
    big = load_splits(tiny_copy, n_val=30, split_seed=1, subset=200)
    assert big.meta["sizes"] == {"train": 200, "val": 30, "test": 100}
    moved = big.to("cpu")
    assert torch.equal(moved.x_train, big.x_train) and moved.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- bad data


def test_missing_data_says_how_to_get_it(tmp_path, tiny_copy, no_decode):
    for root in (tmp_path / "nowhere", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError) as err:
            load_cifar10(root, "train")
        msg = str(err.value)
        assert "download=True" in msg and "torchvision.datasets.CIFAR10" in msg and "tar -xJf" in msg
    shutil.rmtree(tiny_copy / "test")
    with pytest.raises(FileNotFoundError, match="test split"):  # train present, test missing: before decoding
        load_splits(tiny_copy, n_val=10)


def test_download_uses_torchvision_only_when_needed(tiny_cifar_pickle_root, tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10(torchvision.datasets.CIFAR10):  # the network stands aside: "downloads" the tiny copy
        def __init__(self, root, train=True, download=False):
            if download:  # (loading constructs it too, without downloading)
                calls.append((root, train, download))
            super().__init__(root, train=train, download=download)

        def download(self):
            shutil.copytree(tiny_cifar_pickle_root / "cifar-10-batches-py", Path(self.root) / "cifar-10-batches-py",
                            dirs_exist_ok=True)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "fresh"
    x, y = load_cifar10(root, "test", download=True)
    assert calls == [(str(root), True, True)]  # one archive holds both splits: always fetched as train=True
    assert torch.equal(x, load_cifar10(tiny_cifar_pickle_root, "test")[0])
    load_splits(root, n_val=50, download=True)  # already there: no second download
    assert len(calls) == 1
    fresh = tmp_path / "fresh2"
    s = load_splits(fresh, n_val=50, download=True)  # one download serves both splits
    assert calls[1:] == [(str(fresh), True, True)] and s.meta["layout"] == "pickle"
    assert s.meta["sizes"] == {"train": 350, "val": 50, "test": 100}


def test_bad_image_folders(tiny_copy, decode_image_folder):
    train = tiny_copy / "train"
    (train / "zebra").mkdir()
    with pytest.raises(ValueError, match="unknown class folder.*zebra"):
        load_cifar10(tiny_copy, "train")
    (train / "zebra").rmdir()

    (train / ".ipynb_checkpoints").mkdir()  # hidden folders and stray non-image files are ignored
    (train / "cat" / "notes.txt").write_text("x")
    assert load_cifar10(tiny_copy, "train", cache=False)[0].shape[0] == 400

    shutil.move(train / "frog", tiny_copy / "frog_aside")
    with pytest.raises(ValueError, match="missing class folder.*frog"):
        load_cifar10(tiny_copy, "train")
    (train / "frog").mkdir()
    with pytest.raises(ValueError, match="frog.*no images"):
        load_cifar10(tiny_copy, "train")
    (train / "frog").rmdir()
    shutil.move(tiny_copy / "frog_aside", train / "frog")

    test_dir = tiny_copy / "test"
    real = np.asarray(Image.open(sorted((test_dir / "cat").iterdir())[0]))
    cases = {
        "big.png": Image.fromarray(np.zeros((33, 32, 3), np.uint8)),
        "gray.png": Image.fromarray(real[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([real, np.full((32, 32), 255, np.uint8)])),
    }
    for name, im in cases.items():
        bad = test_dir / "dog" / name
        im.save(bad)
        with pytest.raises(ValueError, match=f"{name}.*expected 32x32 RGB"):
            load_cifar10(tiny_copy, "test")
        bad.unlink()
    bad = test_dir / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_cifar10(tiny_copy, "test")
    bad.unlink()
    x, _ = load_cifar10(tiny_copy, "test")  # healthy again
    assert np.array_equal(x.numpy(), decode_image_folder(test_dir)[0])


def test_pickles_other_than_the_published_are_refused_unread(tiny_cifar_pickle_root, tmp_path, monkeypatch):
    """Only files whose MD5 torchvision lists are unpickled (here: those of the tiny copy, trusted); any other file,
    garbage or a well-formed pickle of other data, is refused by name before anything is read."""
    good = tiny_cifar_pickle_root / "cifar-10-batches-py"

    def broken(file, entry=None, raw=None):
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, root / "cifar-10-batches-py")
        target = root / "cifar-10-batches-py" / file
        if raw is not None:
            target.write_bytes(raw)
        elif entry is None:
            target.unlink()
        else:
            with open(target, "wb") as f:
                pickle.dump(entry, f, protocol=2)
        return root

    with open(good / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    monkeypatch.setattr(pickle, "load", None)  # nothing may be unpickled (torchvision calls pickle.load)
    cases = [
        ("data_batch_2", dict(raw=b"garbage"), "data_batch_2' is not the published CIFAR-10 file"),
        ("data_batch_2", dict(entry={**batch, "labels": [10] + batch["labels"][1:]}), "data_batch_2' is not the "
                                                                                        "published"),
        ("batches.meta", dict(entry={b"label_names": [b"a", b"b"]}), "batches.meta' is not the published"),
        ("data_batch_4", dict(), "missing.*data_batch_4"),
    ]
    for file, how, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            load_cifar10(broken(file, **how), "train")
    with pytest.raises(ValueError, match="test_batch' is not the published"):
        load_cifar10(broken("test_batch", raw=b""), "test")


def test_bad_parameters_fail_before_any_decoding(tiny_copy, no_decode):
    bad_calls = [
        (lambda: load_cifar10(tiny_copy, "val"), "split"),
        (lambda: load_cifar10(tiny_copy, "train", download="yes"), "download"),
        (lambda: load_cifar10(tiny_copy, "train", cache=1), "cache"),
        (lambda: load_cifar10(None, "train"), "root"),
        (lambda: load_splits(tiny_copy, n_val=-1), "n_val"),
        (lambda: load_splits(tiny_copy, n_val=2.5), "n_val"),
        (lambda: load_splits(tiny_copy, n_val=400), "n_val"),  # only 400 training images: found by listing
        (lambda: load_splits(tiny_copy, n_val=10, subset=9), "subset"),
        (lambda: load_splits(tiny_copy, n_val=10, subset=True), "subset"),
        (lambda: load_splits(tiny_copy, n_val=10, split_seed=-1), "split_seed"),
        (lambda: load_splits(tiny_copy, n_val=10, device="abacus"), "device"),
        (lambda: stratified_split(np.zeros((4, 2), int), 1), "labels"),
        (lambda: stratified_split(np.array([0.5, 1.0]), 1), "labels"),
        (lambda: stratified_split([], 0), "labels"),
        (lambda: stratified_split([0, 1, -1], 1), "labels"),
        (lambda: stratified_split([0, 1, 1], 3), "n_val"),
        (lambda: stratified_split([0, 1, 1], 1, seed=-2), "seed"),
        (lambda: normalize(torch.zeros(2, 3, 32, 32)), "x_uint8"),
        (lambda: normalize(np.zeros((2, 3, 32, 32), np.uint8)), "x_uint8"),
        (lambda: augment(torch.zeros(3, 32, 32, dtype=torch.uint8)), "x_uint8"),
        (lambda: augment(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)), "x_uint8"),
        (lambda: augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), generator=0), "generator"),
        (lambda: crop_flip(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3), torch.zeros(2),
                           torch.zeros(2)), "top"),
    ]
    for call, name in bad_calls:
        with pytest.raises(ValueError, match=name):
            call()


# ------------------------------------------------------------------------------------ normalization, augmentation


def test_normalize(tiny_cifar_pickle_root):
    x, _ = load_cifar10(tiny_cifar_pickle_root, "test")
    out = normalize(x)
    expected = (x.double() / 255 - MEAN) / STD
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-5)
    cl = normalize(x.to(memory_format=torch.channels_last))
    assert cl.is_contiguous() and torch.equal(cl, out)


def _coordinate_images(batch: int) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = image id + 1 (mod 250): every pixel says where
    it came from, and 0 can only be padding."""
    r = torch.arange(32).view(32, 1).expand(32, 32)
    c = torch.arange(32).view(1, 32).expand(32, 32)
    ids = torch.arange(batch) % 250 + 1
    x = torch.stack([(r + 1).expand(batch, 32, 32), (c + 1).expand(batch, 32, 32),
                     ids.view(batch, 1, 1).expand(batch, 32, 32)], dim=1)
    return x.to(torch.uint8).contiguous()


def test_augment_crops_with_zero_padding_and_flips(monkeypatch):
    batch = 4096
    x = _coordinate_images(batch)
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    pixels = (out.double() * STD + MEAN) * 255  # undo the normalization
    u = pixels.round()
    assert torch.all((pixels - u).abs() < 1e-3)
    u = u.long()
    # Recover each image's crop and flip from the pixel at the centre (always inside the image).
    top = u[:, 0, 16, 16] - 1 - 16 + 4
    col_centre, col_next = u[:, 1, 16, 16], u[:, 1, 16, 17]
    flip = col_next < col_centre
    left = torch.where(flip, col_centre - 1 - (31 - 16), col_centre - 1 - 16) + 4
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    # Rebuild every pixel from (top, left, flip): padded positions must be 0 (i.e. -mean/std after normalize).
    rr = top.view(-1, 1, 1) - 4 + torch.arange(32).view(1, 32, 1)  # source row of output row
    cc_plain = left.view(-1, 1, 1) - 4 + torch.arange(32).view(1, 1, 32)
    cc_flip = left.view(-1, 1, 1) - 4 + (31 - torch.arange(32)).view(1, 1, 32)
    cc = torch.where(flip.view(-1, 1, 1), cc_flip, cc_plain)
    inside = (rr >= 0) & (rr < 32) & (cc >= 0) & (cc < 32)
    ids = (torch.arange(batch) % 250 + 1).view(-1, 1, 1)
    expected = torch.stack([torch.where(inside, rr + 1, 0), torch.where(inside, cc + 1, 0),
                            torch.where(inside, ids, 0)], dim=1)
    assert torch.equal(u, expected)  # includes: order of images (and so labels) unchanged
    border = (-MEAN / STD).expand(batch, 3, 32, 32)
    assert torch.allclose(out.double()[~inside.unsqueeze(1).expand(-1, 3, -1, -1)],
                          border[~inside.unsqueeze(1).expand(-1, 3, -1, -1)], atol=1e-6)
    assert (~inside).any()

    # Offsets uniform on 0..8 in both directions, jointly (81 cells), flips Bernoulli(1/2).
    cells = torch.bincount(top * 9 + left, minlength=81).double().numpy()
    chi2 = ((cells - batch / 81) ** 2 / (batch / 81)).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=80)
    assert cells.min() > 0
    assert abs(flip.double().mean().item() - 0.5) < 6 * np.sqrt(0.25 / batch)
    # Flip independent of the offset: flip rate on the left and right halves of the offsets.
    for mask in (left < 4, left > 4):
        assert abs(flip[mask].double().mean().item() - 0.5) < 6 * np.sqrt(0.25 / mask.sum().item())


def test_augment_matches_torchvision_reference_on_real_images(tiny_cifar_pickle_root):
    from torchvision.transforms.v2 import functional as TF

    x_tr, _ = load_cifar10(tiny_cifar_pickle_root, "train")
    x_te, _ = load_cifar10(tiny_cifar_pickle_root, "test")
    x = torch.cat([x_tr, x_te, x_tr[:12]])  # 512 real images
    assert x.shape[0] == 512
    out = augment(x, generator=torch.Generator().manual_seed(123))

    # Every output is one of the 162 candidates (81 crops x flip) of its own input, built with torchvision.
    # Compared in uint8: first undo the normalization and check that it round-trips exactly.
    u = ((out.double() * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(normalize(u), out)
    padded = TF.pad(x, [4], fill=0)
    matched = torch.zeros(len(x), dtype=torch.bool)
    for top in range(9):
        for left in range(9):
            crop = TF.crop(padded, top, left, 32, 32)
            for cand in (crop, TF.horizontal_flip(crop)):
                matched |= (cand == u).flatten(1).all(1)
    assert matched.all()

    # Same draws, same result: augment = normalize(torchvision crop + flip at sample_crop_flip's parameters).
    top, left, flip = sample_crop_flip(len(x), generator=torch.Generator().manual_seed(123))
    ref = torch.stack([
        (TF.horizontal_flip if f else (lambda im: im))(TF.crop(TF.pad(img, [4], fill=0), int(t), int(l), 32, 32))
        for img, t, l, f in zip(x, top, left, flip)
    ])
    assert torch.equal(crop_flip(x, top, left, flip), ref)
    assert torch.equal(out, normalize(ref))
    # Centre offset (4, 4) with a flip is the plain mirror image; without, the image itself.
    centre = torch.full((len(x),), 4)
    mirrored = crop_flip(x, centre, centre, torch.ones(len(x), dtype=torch.bool))
    assert torch.equal(mirrored, x.flip(-1))
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(len(x), dtype=torch.bool)), x)
    # Top-left corner crop: 4 rows and 4 columns of padding, i.e. -mean/std after normalization.
    corner = normalize(crop_flip(x, torch.zeros(len(x)), torch.zeros(len(x)), torch.zeros(len(x), dtype=torch.bool)))
    border = (-MEAN / STD).float().view(1, 3, 1)
    assert torch.allclose(corner[:, :, :4, :].flatten(2), border, atol=1e-6)
    assert torch.allclose(corner[:, :, :, :4].flatten(2), border, atol=1e-6)
    assert torch.equal(corner[:, :, 4:, 4:], normalize(x)[:, :, :28, :28])


def test_augment_reproducibility_and_memory_formats(tiny_cifar_pickle_root):
    x, _ = load_cifar10(tiny_cifar_pickle_root, "test")
    a = augment(x, generator=torch.Generator().manual_seed(5))
    b = augment(x, generator=torch.Generator().manual_seed(5))
    c = augment(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = augment(x)
    torch.manual_seed(11)
    assert torch.equal(d, augment(x))  # generator=None draws from torch's global RNG
    cl = augment(x.to(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(5))
    assert cl.is_contiguous() and torch.equal(cl, a)
    assert augment(x[:0]).shape == (0, 3, 32, 32)
    assert augment(x[:1]).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ downloading


def test_download_that_never_answers_times_out_with_a_named_error(tmp_path, monkeypatch):
    """Old: torchvision without a timeout hung forever behind a proxy that never answers."""
    import socket
    import time

    import torchvision

    from sdlib.data import DownloadError, download_cifar10

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    try:
        start = time.monotonic()
        with pytest.raises(DownloadError) as caught:
            download_cifar10(tmp_path / "cifar10", timeout_s=1.0)
        assert time.monotonic() - start < 30
    finally:
        silent.close()
    message = str(caught.value)
    assert url in message and "no answer within the timeout of 1 s" in message
    assert "Offline" in message and "cifar-10-python.tar.gz" in message and "SDLIB_DOWNLOAD_TIMEOUT" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no urllib traceback
    assert isinstance(caught.value, FileNotFoundError)  # the data are still missing


def test_download_offline_names_the_url_and_what_to_do(tmp_path, monkeypatch):
    """Old: offline, a 30-frame URLError traceback."""
    import socket

    import torchvision

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused, as offline
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    monkeypatch.setenv("SDLIB_DOWNLOAD_TIMEOUT", "5")
    with pytest.raises(FileNotFoundError, match=rf"downloading CIFAR-10 from {url} into .* failed: .*refused.*"
                                                r"Offline, or behind a proxy: fetch"):
        load_splits(tmp_path / "cifar10", download=True)
    monkeypatch.setenv("SDLIB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SDLIB_DOWNLOAD_TIMEOUT must be a number of seconds, got 'soon'"):
        load_splits(tmp_path / "cifar10", download=True)


def test_progress_false_silences_the_decoding_bar(tiny_copy, capfd):
    """Old: --no-progress left the image-decoding bar on (load_splits always decided by itself)."""
    load_splits(tiny_copy, n_val=10, cache=False, progress=False)
    assert "decoding CIFAR-10 images" not in capfd.readouterr().err
    load_splits(tiny_copy, n_val=10, cache=False, progress=True)
    assert "decoding CIFAR-10 images" in capfd.readouterr().err


def test_fingerprints_follow_content_not_path(tiny_copy, tmp_path):
    from sdlib.data import data_fingerprint, split_fingerprint

    fingerprint = data_fingerprint(tiny_copy)
    assert len(fingerprint) == 16 and data_fingerprint(tmp_path / "nothing") is None
    copy = tmp_path / "copy"
    shutil.copytree(tiny_copy, copy)
    assert data_fingerprint(copy) == fingerprint  # the same files elsewhere
    image = sorted((copy / "test" / "frog").iterdir())[0]
    image.rename(copy / "test" / "cat" / ("z" + image.name))  # one test image changes its class
    assert split_fingerprint(copy, "train") == split_fingerprint(tiny_copy, "train")
    assert split_fingerprint(copy, "test") != split_fingerprint(tiny_copy, "test")
    assert data_fingerprint(copy) != fingerprint
    assert load_splits(copy, n_val=10).meta["fingerprint"] == data_fingerprint(copy)
