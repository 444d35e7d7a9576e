"""CIFAR-10 in memory as uint8 tensors (N, 3, 32, 32): loading, a stratified validation split, symmetric label
noise (the augmentation of a batch is :mod:`sdlib.augment`).

Two forms are read: torchvision's download ``root/cifar-10-batches-py/`` (:mod:`sdlib.download`: fetched and read
through ``torchvision.datasets.CIFAR10`` after an MD5 check) and an ImageFolder layout ``root/{train,test}/<class>/*.jpg``
(decoded once, cached with ``torch.save`` under the files' content fingerprint). The ImageFolder listing is written
out here in ``torchvision.datasets.ImageFolder``'s order because the fingerprint, part of every config_hash, must be
computable without torch (the book's environment has none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdlib.checks import boolean, check, integer, number, optional
from sdlib.download import (PICKLE_DIRNAME, PICKLE_META_FILE, PICKLE_TEST_FILES, PICKLE_TRAIN_FILES,  # noqa: F401
                            DownloadError, check_root, download_cifar10, pickle_dir, read_pickles)
from sdlib.records import write_atomically

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_TRAIN_IMAGES = 50_000  # before the validation split

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")  # lower-cased; other files are ignored
CACHE_DIRNAME = ".sdlib_cache"
_CACHE_FORMAT = 2  # 2: torch.save of the tensors (1: .npz); bump when the cache changes meaning


# torch is imported by the loaders' first call (_require_torch): the data's fingerprint (config_hash) and the label
# noise of the kernel chapters need none, and importing it takes a theory notebook's kernel about 1.6 s.
torch = None


def _require_torch(what: str) -> None:
    global torch
    if torch is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - exercised by test_protocols in a subprocess
            raise ImportError(f"sdlib.data.{what} needs PyTorch: pip install -e '.[cifar]'") from None


def _check_root(root: Any, split: Any = "train") -> Path:
    root = check_root(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return root


def _check_flags(download, cache, progress) -> None:
    """load_cifar10's and load_splits' flags: True or False (progress: None too, the default bar)."""
    check("download", download, boolean()), check("cache", cache, boolean())
    check("progress", progress, optional(boolean()))


def how_to_get_data(root: str | os.PathLike, split: str = "train") -> str:
    """The message of a missing CIFAR-10 under ``root``: the forms read, and how to get either."""
    root = _check_root(root, split)
    return (f"CIFAR-10 ({split} split) not found under {str(root)!r}. Expected either torchvision's standard form "
            f"{str(root / PICKLE_DIRNAME)!r} (data_batch_1..5, test_batch, batches.meta) or an ImageFolder layout "
            f"{str(root / split)!r}/<class>/*.jpg. To get it: call with download=True (fetches the standard form "
            f"through torchvision), or run torchvision.datasets.CIFAR10({str(root)!r}, download=True) yourself, "
            f"or unpack the ImageFolder tarball: mkdir -p {root} && tar -xJf cifar10-jpeg.tar.xz -C {root}")


def detect_layout(root: str | os.PathLike, split: str = "train") -> str | None:
    """``"pickle"``, ``"imagefolder"`` or None: the form of ``split`` under ``root`` (the pickles win where both
    are present: theirs are the original pixels)."""
    root = _check_root(root, split)
    return "pickle" if pickle_dir(root) else "imagefolder" if (root / split).is_dir() else None


def _refuse_linked_loops(dirpath: str, dirnames: list[str], split_dir: Path) -> None:
    """A folder link inside a class folder is followed (images may live on another disk), unless it points back
    into the split's folder (another class's images) or at a folder that contains it (a loop): refused by name."""
    here, split = os.path.realpath(dirpath), os.path.realpath(split_dir)
    inside = lambda folder, parent: folder == parent or folder.startswith(parent.rstrip(os.sep) + os.sep)
    for name in dirnames:
        link = os.path.join(dirpath, name)
        target = os.path.realpath(link)
        if os.path.islink(link) and (inside(here, target) or inside(target, split)):
            raise ValueError(f"{link!r} is a symbolic link to {target!r}, "
                             + ("a folder that contains it: it would list the same images again and again"
                                if inside(here, target) else f"inside {str(split_dir)!r}: its images would be "
                                "listed twice, under two classes") + f". Remove the link (rm {link!r})")


def _list_image_folder(split_dir: Path) -> list[tuple[str, str, int]]:
    """(path, path relative to ``split_dir``, label) of every image, in ``torchvision.datasets.ImageFolder``'s
    order (classes alphabetically, ``sorted(os.walk(...))``, sorted file names), hidden files and folders left out."""
    folders = {e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")}
    for problem, names in (("unknown", sorted(folders - set(CIFAR10_CLASSES))),
                           ("missing", [c for c in CIFAR10_CLASSES if c not in folders])):
        if names:
            raise ValueError(f"{problem} class folder(s) {names} in {str(split_dir)!r}; expected exactly one folder "
                             f"per CIFAR-10 class {list(CIFAR10_CLASSES)}")
    files = []
    for label, name in enumerate(CIFAR10_CLASSES):
        before = len(files)
        for dirpath, dirnames, filenames in sorted(os.walk(split_dir / name, followlinks=True)):
            if any(part.startswith(".") for part in Path(dirpath).relative_to(split_dir / name).parts):
                continue
            _refuse_linked_loops(dirpath, [d for d in dirnames if not d.startswith(".")], split_dir)
            # the folder's two prefixes once, not per file: per-file relpath/join was most of the listing's time
            full, rel = os.path.join(dirpath, ""), os.path.join(os.path.relpath(dirpath, split_dir), "")
            files += [(full + f, rel + f, label)
                      for f in sorted(filenames) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if len(files) == before:
            raise ValueError(f"class folder {str(split_dir / name)!r} holds no images; expected files ending in "
                             f"{IMAGE_EXTENSIONS}")
    return files


def _source_files(root: Path, split: str) -> tuple[str, list[tuple[str, str, int]]] | None:
    """(layout, (path, name, label) per file) of a split, or None where it is absent; label -1 for the pickles,
    which hold their own."""
    layout = detect_layout(root, split)
    if layout == "pickle":
        pdir = pickle_dir(root)
        names = (PICKLE_META_FILE, *(PICKLE_TRAIN_FILES if split == "train" else PICKLE_TEST_FILES))
        return layout, [(str(pdir / name), name, -1) for name in names if (pdir / name).is_file()]
    return None if layout is None else (layout, _list_image_folder(root / split))


# Content hashes, remembered per process under the files' stat records: any write changes a file's ctime (which
# no user call can set back, unlike the mtime), a copy its inode; either way the files are hashed again.
_CONTENT_HASHES: dict[tuple, str] = {}


def _content_hash(kind: str, files: Sequence[tuple[str, str, int]]) -> str:
    """sha256 over ``kind`` and, per file in order, its name, its label and the sha256 of its bytes (about 0.7 s
    for the 60,000 JPEGs of CIFAR-10, once per process)."""
    stats = [(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, label)
             for path, rel, label in files for st in (os.stat(path),)]
    key = (kind, hashlib.sha256(repr(stats).encode()).hexdigest())
    if key not in _CONTENT_HASHES:
        h = hashlib.sha256(f"sdlib-cifar10-content v1 {kind}\n".encode())
        for path, rel, label in files:
            with open(path, "rb") as handle:
                h.update(f"{rel}\0{label}\0{hashlib.sha256(handle.read()).hexdigest()}\n".encode())
        _CONTENT_HASHES[key] = h.hexdigest()
    return _CONTENT_HASHES[key]


def split_fingerprint(root: str | os.PathLike, split: str = "train") -> str | None:
    """sha256 hex of one split's content (every image's bytes with its class, or the pickle files); None where the
    split is absent. Another copy of the same files gives the same fingerprint; any changed byte another."""
    found = _source_files(_check_root(root, split), split)
    return None if found is None else _content_hash(f"{split}-{found[0]}", found[1])


def data_fingerprint(root: str | os.PathLike) -> str | None:
    """The identity of the CIFAR-10 copy under ``root``: 16 hex digits from its two :func:`split_fingerprint`, or
    None when either split is absent. Part of ``TrainConfig.config_hash`` (a moved copy keeps its results)."""
    train, test = (split_fingerprint(root, split) for split in SPLITS)
    return None if train is None or test is None else _combine(train, test)


def _combine(train: str, test: str) -> str:
    return hashlib.sha256(f"sdlib-cifar10-data v1 {train} {test}".encode()).hexdigest()[:16]


def _decode_images(paths: Sequence[str], progress: bool) -> np.ndarray:
    """uint8 (N, 32, 32, 3) from image files, each checked to be 32x32 RGB. Serial on purpose: a 32x32 JPEG decodes
    in ~0.1 ms, mostly GIL-holding work inside Pillow; a thread pool measured 1.5x slower."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="decoding CIFAR-10 images", unit="img", mininterval=1.0,
                                  disable=not progress)):
        try:
            with Image.open(path) as im:
                if im.size != (32, 32) or im.mode != "RGB":
                    raise ValueError(f"image {path!r} is {im.size[0]}x{im.size[1]} {im.mode}; expected 32x32 RGB "
                                     "(CIFAR-10)")
                out[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image {path!r} could not be decoded ({exc}); expected a 32x32 RGB image") from None
    return out


def _cache_name(split: str, content: str) -> str:
    """A split's cache file: its content fingerprint and the decoder (another libjpeg may decode the same JPEG to
    slightly different pixels)."""
    from PIL import __version__ as pillow, features

    key = f"sdlib-cifar10-cache v{_CACHE_FORMAT} {split} pillow={pillow} libjpeg={features.version('jpg')} {content}"
    return f"{split}-imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def _cache_dirs(root: Path) -> list[Path]:
    """Inside the data root, else (read-only data) a per-root folder of $SDLIB_CACHE_DIR or ~/.cache/sdlib."""
    base = os.environ.get("SDLIB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sdlib")
    return [root / CACHE_DIRNAME,
            Path(base) / "cifar10" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]]


def _read_cache(path: Path, labels: np.ndarray):
    try:
        hit = torch.load(path, weights_only=True)
        images, cached = hit["images"], hit["labels"]
    except Exception:  # missing, truncated or foreign file: decode again and overwrite it
        return None
    ok = images.dtype == torch.uint8 and images.shape == (len(labels), 3, 32, 32)
    return (images, cached) if ok and np.array_equal(cached.numpy(), labels) else None


def _write_cache(dirs: list[Path], name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    for d in dirs:
        try:
            write_atomically(d / name, lambda f: torch.save({"images": images, "labels": labels}, f), binary=True)
        except OSError:
            continue  # e.g. a read-only data root: the next folder
        # A changed folder leaves its old cache behind under another fingerprint: drop it, and what a decode killed
        # while saving left (an hour old: another process may be saving its own right now).
        for old in d.glob(name.split("-imagefolder-")[0] + "-imagefolder-*"):
            with contextlib.suppress(OSError):  # another process may be removing it too
                if old.name != name and (old.suffix != ".tmp" or time.time() - old.stat().st_mtime > 3600):
                    old.unlink()
        return
    warnings.warn(f"could not write a CIFAR-10 cache in any of {[str(d) for d in dirs]}; images will be decoded "
                  f"again next time", RuntimeWarning, stacklevel=3)


@dataclass
class _Source:  # a located split, listed and fingerprinted, not decoded yet (sizes are checked before that work)
    root: Path
    split: str
    layout: str
    files: list  # (path, name, label) as _source_files gives them
    labels: np.ndarray
    fingerprint: str
    images: np.ndarray | None = None  # pickle: already read


def _locate(root: Path, split: str, download: bool) -> _Source:
    if detect_layout(root, split) is None and download:
        download_cifar10(root)
    found = _source_files(root, split)
    if found is None:
        raise FileNotFoundError(how_to_get_data(root, split))
    layout, files = found
    fingerprint = _content_hash(f"{split}-{layout}", files)
    if layout == "pickle":
        images, labels = read_pickles(pickle_dir(root), split)
        return _Source(root, split, layout, files, labels, fingerprint, images)
    return _Source(root, split, layout, files, np.array([f[2] for f in files], dtype=np.int64), fingerprint)


def _materialize(src: _Source, cache: bool, progress: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    if src.layout == "pickle":  # raw pixels already, read in well under a second: nothing to cache
        return torch.from_numpy(src.images), torch.from_numpy(src.labels)
    name, dirs = _cache_name(src.split, src.fingerprint), _cache_dirs(src.root)
    for d in dirs if cache else []:
        hit = _read_cache(d / name, src.labels)
        if hit is not None:
            return hit
    show = len(src.labels) >= 5000 if progress is None else progress
    images = torch.from_numpy(np.ascontiguousarray(_decode_images([f[0] for f in src.files], show)
                                                   .transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(src.labels)
    if cache:
        _write_cache(dirs, name, images, labels)
    return images, labels


def load_cifar10(root: str | os.PathLike, split: str = "train", download: bool = False, cache: bool = True,
                 progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (``"train"``, ``"test"``) of the CIFAR-10 under ``root``: uint8 images (N, 3, 32, 32) and int64
    labels, on the CPU, in the pickles' or ImageFolder's order. ``download``: fetch it where absent. ``cache``
    (ImageFolder): decode once into ``root/.sdlib_cache`` (read-only root: ``$SDLIB_CACHE_DIR`` or ``~/.cache/sdlib``)
    under the content fingerprint and the Pillow/libjpeg versions. ``progress``: the decoding bar (None: from 5,000
    images). FileNotFoundError where neither form is present (saying how to get it); ValueError naming a bad
    parameter, class folder, image or pickle."""
    _require_torch("load_cifar10")
    root = _check_root(root, split)
    _check_flags(download, cache, progress)
    return _materialize(_locate(root, split, download), cache, progress)


def _stratified_choice(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``k`` entries of ``labels``: per class ``floor(k * n_c / N)``, the ``k - sum`` left over
    one each to the classes with the largest remainders (ties broken by the rng), a uniform subset inside each class.
    (scikit-learn's train_test_split(stratify=...) draws other images from the same seed: kept as it is.)"""
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    quota, remainder = k * counts // n, k * counts % n
    left = k - int(quota.sum())
    if left:
        quota[np.lexsort((rng.permutation(len(classes)), -remainder))[:left]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_split(labels: Any, n_val: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``0..N-1`` split into sorted int64 tensors (train_idx, val_idx), ``len(val_idx) == n_val``, every
    class within one image of its share ``n_val * n_c / N``. The same labels, n_val and seed give the same split."""
    _require_torch("stratified_split")
    arr, _ = _check_labels(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    n_val, seed = check("n_val", n_val, integer(0)), check("seed", seed, integer(0))
    if n_val >= arr.shape[0]:
        raise ValueError(f"n_val must be smaller than the number of labels ({arr.shape[0]}), got {n_val}")
    val = _stratified_choice(arr, n_val, np.random.default_rng(seed))
    mask = np.ones(arr.shape[0], dtype=bool)
    mask[val] = False
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64)), torch.from_numpy(val.astype(np.int64))


@dataclass(repr=False)
class CIFAR10Splits:
    """``x_*`` uint8 (N, 3, 32, 32), ``y_*`` int64 on one device; ``*_idx`` the CPU positions of each part in the
    split it came from; ``meta`` JSON-serializable (see :func:`load_splits`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: dict
    train_idx: torch.Tensor | None = None
    val_idx: torch.Tensor | None = None
    test_idx: torch.Tensor | None = None
    classes = CIFAR10_CLASSES
    num_classes = len(CIFAR10_CLASSES)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> "CIFAR10Splits":
        """A copy with the images and labels on ``device`` (the index tensors stay on the CPU)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return dataclasses.replace(self, **moved, meta=dict(self.meta))

    def __repr__(self) -> str:
        s = self.meta.get("sizes", {})
        return (f"CIFAR10Splits(train={s.get('train')}, val={s.get('val')}, test={s.get('test')}, "
                f"layout={self.meta.get('layout')!r}, device={str(self.device)!r})")


def load_splits(root: str | os.PathLike, n_val: int = 5000, split_seed: int = 0, subset: int | None = None,
                device: str | torch.device = "cpu", download: bool = False, cache: bool = True,
                progress: bool | None = None) -> CIFAR10Splits:
    """CIFAR-10 with a stratified validation split of ``n_val`` images held out of the training set (seeded by
    ``split_seed``), on ``device``; root, download, cache, progress as in :func:`load_cifar10`. ``subset`` (an int
    >= 10, smoke runs) cuts each part, after the split, to a stratified seeded subset of at most ``subset`` images.
    ``meta``: root, layout, n_val, split_seed, subset, sizes, source_sizes, class_counts, classes, fingerprint
    (:func:`data_fingerprint`), split_fingerprints, mean, std."""
    _require_torch("load_splits")
    root = _check_root(root)
    n_val, split_seed = int(check("n_val", n_val, integer(0))), int(check("split_seed", split_seed, integer(0)))
    subset = None if subset is None else int(check("subset", subset, integer(len(CIFAR10_CLASSES))))
    _check_flags(download, cache, progress)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from None

    if download and (detect_layout(root, "train") is None or detect_layout(root, "test") is None):
        download_cifar10(root)  # before locating either split, so that both come from the same form
    train_src, test_src = _locate(root, "train", False), _locate(root, "test", False)
    if n_val >= len(train_src.labels):
        raise ValueError(f"n_val must be smaller than the {len(train_src.labels)} training images under {str(root)!r}, "
                         f"got {n_val}")
    train_idx, val_idx = (i.numpy() for i in stratified_split(train_src.labels, n_val, split_seed))
    test_idx = np.arange(len(test_src.labels), dtype=np.int64)
    if subset is not None:
        def cut(idx: np.ndarray, labels: np.ndarray, k: int, stream: int) -> np.ndarray:
            rng = np.random.default_rng([split_seed, stream])  # one independent stream per part
            return idx if k >= len(idx) else idx[_stratified_choice(labels[idx], k, rng)]

        train_idx = cut(train_idx, train_src.labels, subset, 1)
        val_idx = cut(val_idx, train_src.labels, min(n_val, subset), 2)
        test_idx = cut(test_idx, test_src.labels, subset, 3)

    (x_tr, y_tr), (x_te, y_te) = (_materialize(src, cache, progress) for src in (train_src, test_src))
    t_train, t_val, t_test = (torch.from_numpy(i) for i in (train_idx, val_idx, test_idx))
    parts = {"train": (x_tr[t_train], y_tr[t_train]), "val": (x_tr[t_val], y_tr[t_val]),
             "test": (x_te, y_te) if subset is None else (x_te[t_test], y_te[t_test])}
    meta = {
        "root": str(root.resolve()), "layout": train_src.layout, "n_val": n_val, "split_seed": split_seed,
        "subset": subset, "sizes": {k: int(v[1].shape[0]) for k, v in parts.items()},
        "source_sizes": {"train": len(train_src.labels), "test": len(test_src.labels)},
        "class_counts": {k: np.bincount(v[1].numpy(), minlength=10).tolist() for k, v in parts.items()},
        "classes": list(CIFAR10_CLASSES), "fingerprint": _combine(train_src.fingerprint, test_src.fingerprint),
        "split_fingerprints": {"train": train_src.fingerprint, "test": test_src.fingerprint},
        "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
    }
    (xa, ya), (xv, yv), (xt, yt) = ((x.to(device), y.to(device)) for x, y in parts.values())
    return CIFAR10Splits(xa, ya, xv, yv, xt, yt, meta, train_idx=t_train, val_idx=t_val, test_idx=t_test)


def _check_labels(labels, n_classes=None) -> tuple[np.ndarray, int | None]:
    """(labels as int64, n_classes) checked: a non-empty 1-D array of class indices, in 0..n_classes - 1 where
    ``n_classes`` is given (an integer >= 2), else non-negative."""
    n_classes = None if n_classes is None else int(check("n_classes", n_classes, integer(2)))
    try:
        labels = np.asarray(labels)
    except Exception:
        raise ValueError("labels must be a 1-D sequence of non-negative integers") from None
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {labels.dtype}")
    if labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes):
        expected = "be non-negative class indices" if n_classes is None else \
            f"lie in 0..{n_classes - 1} (n_classes={n_classes})"
        raise ValueError(f"labels must {expected}, got values from {labels.min()} to {labels.max()}")
    return labels.astype(np.int64), n_classes


def symmetric_label_noise(labels, rate: float, n_classes: int, seed: int = 0) -> np.ndarray:
    """A copy of (n,) ``labels`` with exactly ``round(rate * n)`` of them, a uniform random subset, each changed to a
    uniformly drawn *other* class; ``rate`` in [0, 1), ``seed`` for numpy's default_rng."""
    labels, n_classes = _check_labels(labels, n_classes)
    check("rate", rate, number(0, 1, high_open=True))
    rng = np.random.default_rng(check("seed", seed, integer(0)))
    n_flip = int(round(rate * labels.size))
    flip = rng.choice(labels.size, size=n_flip, replace=False)
    noisy = labels.copy()
    # A shift of 1..n_classes - 1 (mod n_classes) is a uniform draw among the other classes.
    noisy[flip] = (labels[flip] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    return noisy
