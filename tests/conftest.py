"""Shared fixtures: real CIFAR-10 images for the data, training and notebook tests.

The images come from the project's shared tarball (the real CIFAR-10 as 32x32 JPEGs in an ImageFolder
layout), found at ``$SDLIB_CIFAR_TARBALL`` or ``<repo>/../shared/data/cifar10-jpeg.tar.xz``. Without it the
tests that need images are skipped with a message saying where it was looked for (CI has it).

Fixtures
--------
cifar_tarball            (session) Path of the tarball, or skip.
cifar_jpeg_root          (session) the whole tarball unpacked once: root/train/<class>/*.jpg (5000 per class),
                         root/test/<class>/*.jpg (1000 per class). Read-only by convention: copy before editing.
tiny_cifar_root          (session) a small real-image ImageFolder copy, fast to build (one streaming pass over the
                         tarball, ~2 s): per class the first TINY_TRAIN_PER_CLASS=40 training and
                         TINY_TEST_PER_CLASS=10 test files in sorted file-name order (400 train, 100 test images).
                         Read-only by convention: copy it (shutil.copytree) before editing.
tiny_cifar_pickle_root   (session) the same 500 images in torchvision's standard form
                         root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; the training images
                         in a seeded shuffled order (as the real batches are not class-sorted), the test images in
                         ImageFolder order.
write_cifar_pickle       a function write_cifar_pickle(root, train_images, train_labels, test_images, test_labels,
                         str_keys=False) -> root, writing that standard form from uint8 (N, 3, 32, 32) arrays.
decode_image_folder      a function decode_image_folder(split_dir) -> (images uint8 (N, 3, 32, 32), labels int64 (N,),
                         paths): a plain PIL reference reader, independent of sdlib.data.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TINY_TRAIN_PER_CLASS = 40
TINY_TEST_PER_CLASS = 10
TINY_PICKLE_SEED = 0


def cifar_tarball_path() -> Path:
    env = os.environ.get("SDLIB_CIFAR_TARBALL")
    return Path(env) if env else REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.fixture(scope="session")
def cifar_tarball() -> Path:
    path = cifar_tarball_path()
    if not path.is_file():
        pytest.skip(
            f"CIFAR-10 JPEG tarball not found at {path}: set SDLIB_CIFAR_TARBALL to cifar10-jpeg.tar.xz or place "
            f"it at <repo>/../shared/data/cifar10-jpeg.tar.xz"
        )
    return path


def _extract_all(tarball: Path, dest: Path) -> None:
    tar = shutil.which("tar")
    if tar is not None:  # GNU tar: ~2 s for the 60,000 files, Python's tarfile ~9 s
        done = subprocess.run([tar, "-xJf", str(tarball), "-C", str(dest)], capture_output=True)
        if done.returncode == 0:
            return
    with tarfile.open(tarball, "r:xz") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(dest)


def _scratch_dir(tmp_path_factory, name: str, need_bytes: int) -> Path:
    """A fresh folder on RAM-backed /dev/shm when it has room, else under pytest's tmp dir.

    Creating 60,000 small files on a shared virtual disk took 20-60 s here (kernel time in the file system,
    under load from other jobs) against 2-4 s on tmpfs.
    """
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * need_bytes:
            return Path(tempfile.mkdtemp(prefix=f"sdlib-{name}-", dir=shm))
    except OSError:
        pass
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def cifar_jpeg_root(cifar_tarball, tmp_path_factory):
    # ~250 MB of files (4 KB blocks) + ~185 MB of decode cache once a test loads it.
    root = _scratch_dir(tmp_path_factory, "cifar10_jpeg", need_bytes=500 * 2**20)
    _extract_all(cifar_tarball, root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            pytest.fail(f"{cifar_tarball} did not unpack to train/ and test/ folders under {root}")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 60k files + decode cache (RAM on tmpfs): always remove


def _build_tiny_root(tarball: Path, dest: Path, per_class: dict[str, int]) -> None:
    """One streaming pass over the tarball, keeping per (split, class) the smallest file names."""
    kept: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(tarball, "r|xz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if parts and parts[0] == ".":
                parts = parts[1:]
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class or parts[1] not in CLASSES:
                continue
            key, fname, k = (parts[0], parts[1]), parts[2], per_class[parts[0]]
            bucket = kept.setdefault(key, [])
            if len(bucket) < k or fname < bucket[-1][0]:
                data = tf.extractfile(member).read()
                bisect.insort(bucket, (fname, data))
                del bucket[k:]
    for split, k in per_class.items():
        for cls in CLASSES:
            bucket = kept.get((split, cls), [])
            if len(bucket) != k:
                raise RuntimeError(f"tarball has {len(bucket)} files under {split}/{cls}, need {k}")
            folder = dest / split / cls
            folder.mkdir(parents=True)
            for fname, data in bucket:
                (folder / fname).write_bytes(data)


@pytest.fixture(scope="session")
def tiny_cifar_root(cifar_tarball, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10_tiny")
    _build_tiny_root(cifar_tarball, root, {"train": TINY_TRAIN_PER_CLASS, "test": TINY_TEST_PER_CLASS})
    return root


def decode_image_folder_reference(split_dir) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Reference reader: class folders in CLASSES order, sorted file names, PIL decode, one image at a time."""
    from PIL import Image

    split_dir = Path(split_dir)
    images, labels, paths = [], [], []
    for label, cls in enumerate(CLASSES):
        for path in sorted((split_dir / cls).iterdir()):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
            labels.append(label)
            paths.append(path)
    return np.stack(images), np.asarray(labels, dtype=np.int64), paths


def write_cifar_pickle_form(root, train_images, train_labels, test_images, test_labels) -> Path:
    """Write root/cifar-10-batches-py/ in the format of the published CIFAR-10 python pickles.

    Each batch is a dict {'batch_label', 'labels': list of int, 'data': uint8 (n, 3072) (the R, G, B planes of
    each image, each plane row-major), 'filenames'}; the training images are cut into data_batch_1..5 in order;
    batches.meta holds 'label_names'. The keys are str, as the published Python 2 pickles read with
    encoding="latin1" (how torchvision reads them).
    """
    def key(k: str):
        return k

    def batch(images, labels, name):
        images = np.asarray(images, dtype=np.uint8)
        assert images.ndim == 4 and images.shape[1:] == (3, 32, 32)
        return {
            key("batch_label"): name.encode(),
            key("labels"): [int(v) for v in labels],
            key("data"): np.ascontiguousarray(images.reshape(len(images), 3 * 32 * 32)),
            key("filenames"): [f"{name}_{i:05d}.png".encode() for i in range(len(images))],
        }

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    entries = {f"data_batch_{i + 1}": batch(np.asarray(train_images)[c], np.asarray(train_labels)[c],
                                            f"training batch {i + 1} of 5") for i, c in enumerate(chunks)}
    entries["test_batch"] = batch(test_images, test_labels, "testing batch 1 of 1")
    entries["batches.meta"] = {
        key("num_cases_per_batch"): max(len(c) for c in chunks),
        key("label_names"): [c.encode() for c in CLASSES],
        key("num_vis"): 3072,
    }
    for name, entry in entries.items():
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        WRITTEN_PICKLE_MD5S.add(hashlib.md5((folder / name).read_bytes()).hexdigest())
    return Path(root)


# The MD5s of the pickle files written by write_cifar_pickle_form: sdlib.data reads only files whose MD5 torchvision
# lists (the published CIFAR-10 batches); the fixture `trusted_pickles` makes it take these as published too.
WRITTEN_PICKLE_MD5S: set[str] = set()


@pytest.fixture
def trusted_pickles(monkeypatch):
    """torchvision's integrity check (which sdlib.data and torchvision.datasets.CIFAR10 call) taking the MD5s of the
    pickles this session wrote as published ones, as though the real CIFAR-10 files had been downloaded."""
    from torchvision.datasets import cifar

    published = cifar.check_integrity

    def check_integrity(path, md5=None):
        written = os.path.isfile(path) and hashlib.md5(Path(path).read_bytes()).hexdigest() in WRITTEN_PICKLE_MD5S
        return published(path, md5) or written

    monkeypatch.setattr(cifar, "check_integrity", check_integrity)


@pytest.fixture
def write_cifar_pickle():
    return write_cifar_pickle_form


@pytest.fixture
def decode_image_folder():
    return decode_image_folder_reference


@pytest.fixture(scope="session")
def tiny_cifar_pickle_root(tiny_cifar_root, tmp_path_factory) -> Path:
    x_tr, y_tr, _ = decode_image_folder_reference(tiny_cifar_root / "train")
    x_te, y_te, _ = decode_image_folder_reference(tiny_cifar_root / "test")
    perm = np.random.default_rng(TINY_PICKLE_SEED).permutation(len(y_tr))
    root = tmp_path_factory.mktemp("cifar10_tiny_pickle")
    return write_cifar_pickle_form(root, x_tr[perm], y_tr[perm], x_te, y_te)


@pytest.fixture(scope="session")
def book(tmp_path_factory):
    """The book built once per session in a clean copy of the repository: (copy root, build log).
    Shared by tests/test_book.py and tests/test_browser.py (see tests/book_build.py)."""
    from book_build import build_book

    return build_book(tmp_path_factory.mktemp("clean_clone"))
