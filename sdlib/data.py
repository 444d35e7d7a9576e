"""CIFAR-10 for the deep-network half: loading, a stratified validation split, normalization and augmentation.

Everything is held in memory as uint8 tensors of shape ``(N, 3, 32, 32)`` (the whole of CIFAR-10 is 184 MB),
so a training step indexes a batch out of one tensor and augments it on the same device in a few vectorized
tensor operations: no per-image Python, no DataLoader workers.

Two on-disk forms are read:

- ``"pickle"``: torchvision's standard download, ``root/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` (the python pickles published with CIFAR-10). ``download=True`` fetches it with
  ``torchvision.datasets.CIFAR10``.
- ``"imagefolder"``: ``root/train/<class>/*.jpg|png`` and ``root/test/<class>/*``, e.g. the JPEG copy of
  CIFAR-10 in the project's shared data. Images are decoded once with Pillow and cached as ``.npz``.

Labels follow :data:`CIFAR10_CLASSES` (the standard order, which is also the alphabetical order of the
folder names, so it agrees with ``torchvision.datasets.ImageFolder``).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # the data's fingerprint (config_hash) needs no torch, and the book's environment has none
    import torch
except ImportError:  # pragma: no cover - exercised by test_protocols in a subprocess
    torch = None

from sdlib.records import write_atomically

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10Splits",
    "augment",
    "crop_flip",
    "data_fingerprint",
    "detect_layout",
    "download_cifar10",
    "load_cifar10",
    "load_splits",
    "normalize",
    "split_fingerprint",
    "sample_crop_flip",
    "stratified_split",
    "symmetric_label_noise",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

IMAGE_SIZE = 32
SPLITS = ("train", "test")
PICKLE_DIRNAME = "cifar-10-batches-py"
PICKLE_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST_FILES = ("test_batch",)
PICKLE_META_FILE = "batches.meta"
# Extensions read from a class folder (lower-cased); anything else there (e.g. Thumbs.db) is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CACHE_DIRNAME = ".sdlib_cache"
# Bump when the cache content changes meaning; it is part of every fingerprint.
_CACHE_FORMAT = 1
# Decoding shows a progress bar from this many images on (progress=None).
_PROGRESS_MIN_IMAGES = 5000



def _require_torch(what: str) -> None:
    if torch is None:
        raise ImportError(f"sdlib.data.{what} needs PyTorch: pip install -e '.[cifar]'")

def _how_to_get_data(root: Path, split: str) -> str:
    return (
        f"CIFAR-10 ({split} split) not found under {str(root)!r}. Expected either torchvision's standard form "
        f"{str(root / PICKLE_DIRNAME)!r} (data_batch_1..5, test_batch, batches.meta) or an ImageFolder layout "
        f"{str(root / split)!r}/<class>/*.jpg. To get it: call with download=True (fetches the standard form "
        f"through torchvision), or run torchvision.datasets.CIFAR10({str(root)!r}, download=True) yourself, "
        f"or unpack the ImageFolder tarball: mkdir -p {root} && tar -xJf cifar10-jpeg.tar.xz -C {root}"
    )


def how_to_get_data(root: str | os.PathLike) -> str:
    """The message of a missing CIFAR-10 under ``root``: the forms read, and how to get either."""
    return _how_to_get_data(_check_root(root), "train")


# --------------------------------------------------------------------------------------------- parameter checks


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _check_root(root: Any) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    if str(root) == "":
        raise ValueError("root must be a non-empty path")
    return Path(root).expanduser()


# ----------------------------------------------------------------------------------------------- layout discovery


def _pickle_dir(root: Path) -> Path | None:
    """The folder holding the pickles: root/cifar-10-batches-py, or root itself if it is that folder."""
    if (root / PICKLE_DIRNAME).is_dir():
        return root / PICKLE_DIRNAME
    if (root / PICKLE_META_FILE).is_file() and (root / PICKLE_TRAIN_FILES[0]).is_file():
        return root
    return None


def detect_layout(root: str | os.PathLike, split: str = "train") -> str | None:
    """Which form of CIFAR-10 ``root`` holds for ``split``: ``"pickle"``, ``"imagefolder"`` or None.

    The pickle form wins when both are present (its pixels are the original ones).
    """
    root = _check_root(root)
    split = _check_split(split)
    if _pickle_dir(root) is not None:
        return "pickle"
    if (root / split).is_dir():
        return "imagefolder"
    return None


def _refuse_linked_loops(dirpath: str, dirnames: list[str], split_dir: Path) -> None:
    """A folder symlink inside a class folder is followed (images may live on another disk), unless it points
    back into the split's folder (another class's images, labelled with this class) or at a folder that contains
    it (a loop: ``ln -s .. train/cat/loop`` would list every image 40 times, all labelled cat): refused by name."""
    here = os.path.realpath(dirpath)
    split = os.path.realpath(split_dir)
    for name in dirnames:
        link = os.path.join(dirpath, name)
        if name.startswith(".") or not os.path.islink(link):
            continue
        target = os.path.realpath(link)
        inside = lambda folder, parent: folder == parent or folder.startswith(parent.rstrip(os.sep) + os.sep)
        if inside(here, target) or inside(target, split):
            raise ValueError(f"{link!r} is a symbolic link to {target!r}, "
                             + ("a folder that contains it: it would list the same images again and again"
                                if inside(here, target) else f"inside {str(split_dir)!r}: its images would be "
                                "listed twice, under two classes")
                             + f". Remove the link (rm {link!r})")


def _list_image_folder(split_dir: Path) -> tuple[list[str], np.ndarray, list[tuple]]:
    """Files of ``split_dir/<class>/`` in ImageFolder order, their labels, and (relpath, size, mtime_ns,
    ctime_ns, inode) records (the key under which a content fingerprint is remembered, see :func:`_content_hash`).

    Order: classes in :data:`CIFAR10_CLASSES` order, inside a class ``sorted(os.walk(...))`` and sorted file
    names, exactly as ``torchvision.datasets.ImageFolder`` orders its samples. Hidden files and folders
    (".*", e.g. .ipynb_checkpoints) are skipped.
    """
    entries = [e for e in os.scandir(split_dir) if not e.name.startswith(".")]
    folders = {e.name for e in entries if e.is_dir()}
    unknown = sorted(folders - set(CIFAR10_CLASSES))
    if unknown:
        raise ValueError(
            f"unknown class folder(s) {unknown} in {str(split_dir)!r}; expected exactly the CIFAR-10 class "
            f"folders {list(CIFAR10_CLASSES)}"
        )
    missing = [c for c in CIFAR10_CLASSES if c not in folders]
    if missing:
        raise ValueError(
            f"missing class folder(s) {missing} in {str(split_dir)!r}; expected one folder per CIFAR-10 class "
            f"{list(CIFAR10_CLASSES)}"
        )
    paths: list[str] = []
    labels: list[int] = []
    records: list[tuple] = []
    for label, name in enumerate(CIFAR10_CLASSES):
        class_dir = split_dir / name
        n_before = len(paths)
        for dirpath, dirnames, filenames in sorted(os.walk(class_dir, followlinks=True)):
            if any(part.startswith(".") for part in Path(dirpath).relative_to(class_dir).parts):
                continue
            _refuse_linked_loops(dirpath, dirnames, split_dir)
            for fname in sorted(filenames):
                if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, fname)
                st = os.stat(path)
                paths.append(path)
                labels.append(label)
                records.append((os.path.relpath(path, split_dir), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                st.st_ino))
        if len(paths) == n_before:
            raise ValueError(
                f"class folder {str(class_dir)!r} holds no images; expected files ending in {IMAGE_EXTENSIONS}"
            )
    return paths, np.asarray(labels, dtype=np.int64), records


class _DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the CIFAR-10 python batches hold: dicts, lists, strings, bytes, numbers
    and numpy arrays. Any other global a pickle names (``os.system``, ``builtins.eval``, a class whose
    ``__reduce__`` runs code) is refused before it is called, so a batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds (only "
                                         f"numpy arrays, lists, dicts and strings are unpickled: a pickle can run "
                                         f"code, so this file is refused unread)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    # latin1 is how torchvision reads the python-2 pickles of CIFAR-10 (numpy arrays inside need it). A pickle can
    # run code when loaded: the restricted unpickler admits only the arrays, lists, dicts and strings of the
    # published files (whose MD5s torchvision checks on download), so a planted batches.meta runs nothing.
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from None


def _str_keys(entry: Any, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{str(path)!r} must hold a dict (as the CIFAR-10 pickles do), got {type(entry).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _read_pickle_meta(pickle_dir: Path) -> None:
    path = pickle_dir / PICKLE_META_FILE
    meta = _str_keys(_unpickle(path), path)
    if "label_names" not in meta:
        raise ValueError(f"{str(path)!r} has no 'label_names' entry (keys: {sorted(map(str, meta))})")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta["label_names"])
    if names != CIFAR10_CLASSES:
        raise ValueError(f"{str(path)!r} lists label_names {list(names)}; expected {list(CIFAR10_CLASSES)}")


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _str_keys(_unpickle(path), path)
    missing = [k for k in ("data", "labels") if k not in entry]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks key(s) {missing}; expected a dict with b'data' (N, 3072) uint8 and b'labels' "
            f"(N ints), found keys {sorted(map(str, entry))}"
        )
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{str(path)!r}: b'data' must be a uint8 array of shape (N, 3072); got {desc}")
    try:
        labels = np.asarray(entry["labels"])
    except Exception as exc:  # ragged or odd objects
        raise ValueError(f"{str(path)!r}: b'labels' is not a list of ints ({exc})") from None
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{str(path)!r}: b'labels' must be {data.shape[0]} integers (one per row of b'data'); "
            f"got {labels.dtype} array of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{str(path)!r}: b'labels' must lie in 0..9, got range {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# -------------------------------------------------------------------------------------------- decoding and cache


def _decode_images(paths: Sequence[str], progress: bool) -> np.ndarray:
    """Decode image files into uint8 (N, 32, 32, 3), checking that each is a 32x32 RGB image.

    Serial on purpose: a 32x32 JPEG decodes in ~0.1 ms, mostly Python-level work inside Pillow that holds the
    GIL, and a thread pool measured 1.5x *slower* than this loop (60k images: ~6 s, once, then cached).
    """
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    bar = tqdm(paths, desc="decoding CIFAR-10 images", unit="img", mininterval=1.0, disable=not progress)
    for i, path in enumerate(bar):
        try:
            with Image.open(path) as im:
                if im.size != (IMAGE_SIZE, IMAGE_SIZE) or im.mode != "RGB":
                    raise ValueError(
                        f"image {path!r} is {im.size[0]}x{im.size[1]} {im.mode}; expected 32x32 RGB (CIFAR-10)"
                    )
                out[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image {path!r} could not be decoded ({exc}); expected a 32x32 RGB image") from None
    return out


# Content fingerprints, remembered per process under the files' stat records: any write of a file changes its
# ctime (which no user call can set back, unlike the mtime), a copy changes its inode; either way the files are
# hashed again.
_CONTENT_HASHES: dict[tuple, str] = {}


def _content_hash(kind: str, files: Sequence[tuple[str, str, int]], records: Sequence[tuple] | None = None) -> str:
    """sha256 over ``kind`` and, per file in order, its relative name, its label and the sha256 of its bytes.

    files : (path, relative name, label) per file (label -1 where the file holds its own labels: pickles).
    records : the files' (relpath, size, mtime_ns, ctime_ns, inode) if already listed (else they are stat'ed).
    About 0.7 s for the 60,000 JPEGs of CIFAR-10 (235 MB) on tmpfs, 0.3 s for the pickles."""
    if records is None:
        records = [(rel, *(lambda st: (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))(os.stat(path)))
                   for path, rel, _ in files]
    stats = [(*record, label) for record, (_, _, label) in zip(records, files)]
    key = (kind, hashlib.sha256(repr(stats).encode()).hexdigest())
    if key not in _CONTENT_HASHES:
        h = hashlib.sha256(f"sdlib-cifar10-content v1 {kind}\n".encode())
        for path, rel, label in files:
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            h.update(f"{rel}\0{label}\0{digest}\n".encode())
        _CONTENT_HASHES[key] = h.hexdigest()
    return _CONTENT_HASHES[key]


def _source_files(root: Path, split: str) -> tuple[str, list[tuple[str, str, int]], list | None] | None:
    """(layout, files and records for :func:`_content_hash`) of a split, or None where the split is absent."""
    layout = detect_layout(root, split)
    if layout is None:
        return None
    if layout == "pickle":
        pdir = _pickle_dir(root)
        names = (PICKLE_META_FILE, *(PICKLE_TRAIN_FILES if split == "train" else PICKLE_TEST_FILES))
        return layout, [(str(pdir / name), name, -1) for name in names if (pdir / name).is_file()], None
    paths, labels, records = _list_image_folder(root / split)
    split_dir = root / split
    return layout, [(p, os.path.relpath(p, split_dir), int(y)) for p, y in zip(paths, labels)], records


def split_fingerprint(root: str | os.PathLike, split: str = "train") -> str | None:
    """A content fingerprint (sha256 hex) of one split's images and labels under ``root``: the bytes of every
    image file with its class (ImageFolder), or of the pickle files; None where the split is absent.
    Another copy of the same files gives the same fingerprint; any changed byte gives another."""
    root = _check_root(root)
    split = _check_split(split)
    found = _source_files(root, split)
    return None if found is None else _content_hash(f"{split}-{found[0]}", found[1], found[2])


def data_fingerprint(root: str | os.PathLike) -> str | None:
    """The identity of the CIFAR-10 copy under ``root``: 16 hex digits from the content fingerprints of its
    train and test splits (:func:`split_fingerprint`), or None when either split is absent.

    Part of :meth:`sdlib.config.TrainConfig.config_hash` (not the path: a moved copy keeps its results, other
    images never reuse them). The validation split and subsets are functions of the training split and of
    ``n_val`` / ``split_seed`` / ``subset``, which the hash holds too. Cost: reading and hashing every file once
    per process (about 1 s for the JPEG copy); later calls only stat the files."""
    train, test = (split_fingerprint(root, split) for split in SPLITS)
    return None if train is None or test is None else _combine(train, test)


def _combine(train: str, test: str) -> str:
    return hashlib.sha256(f"sdlib-cifar10-data v1 {train} {test}".encode()).hexdigest()[:16]


def _cache_name(split: str, content: str) -> str:
    """The decode cache file of a split: its content fingerprint and the decoder (another libjpeg may decode the
    same JPEG to slightly different pixels)."""
    from PIL import __version__ as pil_version
    from PIL import features

    h = hashlib.sha256(f"sdlib-cifar10-cache v{_CACHE_FORMAT} {split} pillow={pil_version} "
                       f"libjpeg={features.version('jpg')} {content}".encode())
    return f"{split}-imagefolder-{h.hexdigest()[:20]}.npz"


def _user_cache_dir(root: Path) -> Path:
    base = os.environ.get("SDLIB_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sdlib")
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(base) / "cifar10" / key


def _cache_dirs(root: Path) -> list[Path]:
    """Where a cache may live, in order: inside the data root, else a per-root folder of the user cache."""
    return [root / CACHE_DIRNAME, _user_cache_dir(root)]


def cache_path(root: str | os.PathLike, split: str = "train") -> Path | None:
    """The cache file that currently serves ``load_cifar10(root, split)`` (ImageFolder layout), or None."""
    root = _check_root(root)
    split = _check_split(split)
    if detect_layout(root, split) != "imagefolder":
        return None
    name = _cache_name(split, split_fingerprint(root, split))
    for d in _cache_dirs(root):
        if (d / name).is_file():
            return d / name
    return None


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except Exception:  # truncated or foreign file: decode again and overwrite it
        return None
    if images.dtype != np.uint8 or images.shape != (n, 3, IMAGE_SIZE, IMAGE_SIZE):
        return None
    if labels.dtype != np.int64 or labels.shape != (n,):
        return None
    return images, labels


def _write_cache(dirs: list[Path], name: str, stale_prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    for d in dirs:
        try:
            write_atomically(d / name, lambda f: np.savez(f, images=images, labels=labels), binary=True)
        except OSError:
            continue  # e.g. a read-only data root: try the next cache folder
        # A changed folder leaves its old cache behind under another fingerprint; drop it, and what a decode
        # killed while saving left (an hour old: another process may be saving its own right now).
        stale = [old for old in d.glob(stale_prefix + "*.npz") if old.name != name]
        stale += [tmp for tmp in d.glob(stale_prefix + "*.npz.*.tmp") if _older_than(tmp, 3600.0)]
        for old in stale:
            try:
                old.unlink()
            except OSError:
                pass
        return
    warnings.warn(f"could not write a CIFAR-10 cache in any of {[str(d) for d in dirs]}; images will be decoded "
                  f"again next time", RuntimeWarning, stacklevel=3)


def _older_than(path: Path, seconds: float) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------ loading


@dataclass
class _Source:
    """A located, validated split, not decoded yet (so callers can check sizes before the heavy work)."""

    root: Path
    split: str
    layout: str
    n: int
    labels: np.ndarray
    paths: list[str] = field(default_factory=list)  # imagefolder
    records: list[tuple] = field(default_factory=list)  # imagefolder
    images: np.ndarray | None = None  # pickle: already read, (N, 3, 32, 32)
    fingerprint: str | None = None  # split_fingerprint: the content of its files


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision's, when it does not say
DOWNLOAD_TIMEOUT_S = 60.0  # seconds without an answer before a download gives up ($SDLIB_DOWNLOAD_TIMEOUT)


class DownloadError(FileNotFoundError):
    """Fetching CIFAR-10 failed or timed out; the message names the URL, the timeout and what to do offline.
    A FileNotFoundError: the data are still missing."""


def download_cifar10(root: str | os.PathLike, timeout_s: float | None = None) -> None:
    """Fetch torchvision's standard form of CIFAR-10 (both splits) into ``root/cifar-10-batches-py``.

    timeout_s : seconds a connection may stay silent (connect or read) before the download gives up; default
    ``$SDLIB_DOWNLOAD_TIMEOUT`` or 60. torchvision itself sets none, so a proxy that never answers would hang.
    Raises :class:`DownloadError` (no traceback of urllib's internals) naming the URL, the timeout and how
    to get the data without a network."""
    import socket

    import torchvision

    root = _check_root(root)
    if timeout_s is None:
        text = os.environ.get("SDLIB_DOWNLOAD_TIMEOUT", str(DOWNLOAD_TIMEOUT_S))
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"SDLIB_DOWNLOAD_TIMEOUT must be a number of seconds, got {text!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    dataset = torchvision.datasets.CIFAR10
    url = getattr(dataset, "url", CIFAR10_URL)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib (which torchvision uses) applies it to every socket it opens
    try:
        dataset(str(root), train=True, download=True)
    except Exception as error:  # URLError, socket.timeout, HTTPError, a failed checksum (RuntimeError), ...
        reason = getattr(error, "reason", None) or error
        timed_out = isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason)
        raise DownloadError(
            f"downloading CIFAR-10 from {url} into {str(root)!r} failed"
            f"{f' (no answer within the timeout of {timeout_s:g} s)' if timed_out else ''}: "
            f"{type(reason).__name__}: {reason}. Offline, or behind a proxy: fetch {url} elsewhere and put "
            f"{url.rsplit('/', 1)[-1]} into {str(root)!r} (the next run unpacks it without the network), or "
            f"unpack the ImageFolder copy: mkdir -p {root} && tar -xJf cifar10-jpeg.tar.xz -C {root}; a slow "
            f"connection: set SDLIB_DOWNLOAD_TIMEOUT (seconds)") from None
    finally:
        socket.setdefaulttimeout(previous)


def _download(root: Path, split: str) -> None:
    # Fetches and unpacks the whole archive (both splits) into root/cifar-10-batches-py.
    download_cifar10(root)


def _locate(root: Path, split: str, download: bool) -> _Source:
    layout = detect_layout(root, split)
    if layout is None and download:
        _download(root, split)
        layout = detect_layout(root, split)
    if layout is None:
        raise FileNotFoundError(_how_to_get_data(root, split))
    if layout == "pickle":
        pdir = _pickle_dir(root)
        files = PICKLE_TRAIN_FILES if split == "train" else PICKLE_TEST_FILES
        missing = [f for f in (PICKLE_META_FILE, *files) if not (pdir / f).is_file()]
        if missing:
            raise ValueError(
                f"incomplete CIFAR-10 pickle folder {str(pdir)!r}: missing {missing}; expected "
                f"{[PICKLE_META_FILE, *PICKLE_TRAIN_FILES, *PICKLE_TEST_FILES]} (re-download with download=True)"
            )
        _read_pickle_meta(pdir)
        parts = [_read_pickle_batch(pdir / f) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        content = _content_hash(f"{split}-pickle", [(str(pdir / f), f, -1) for f in (PICKLE_META_FILE, *files)])
        return _Source(root, split, layout, len(labels), labels, images=images, fingerprint=content)
    paths, labels, records = _list_image_folder(root / split)
    split_dir = root / split
    content = _content_hash(f"{split}-imagefolder",
                            [(p, os.path.relpath(p, split_dir), int(y)) for p, y in zip(paths, labels)], records)
    return _Source(root, split, layout, len(labels), labels, paths=paths, records=records, fingerprint=content)


def _materialize(src: _Source, cache: bool, progress: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    if src.layout == "pickle":
        # The pickles already hold raw pixels and read in well under a second: nothing to cache.
        return torch.from_numpy(np.ascontiguousarray(src.images)), torch.from_numpy(src.labels)
    prefix = f"{src.split}-imagefolder-"
    name = _cache_name(src.split, src.fingerprint)
    dirs = _cache_dirs(src.root)
    if cache:
        for d in dirs:
            hit = _read_cache(d / name, src.n) if (d / name).is_file() else None
            if hit is not None and np.array_equal(hit[1], src.labels):
                return torch.from_numpy(hit[0]), torch.from_numpy(hit[1])
    show = src.n >= _PROGRESS_MIN_IMAGES if progress is None else progress
    images = np.ascontiguousarray(_decode_images(src.paths, show).transpose(0, 3, 1, 2))
    if cache:
        _write_cache(dirs, name, prefix, images, src.labels)
    return torch.from_numpy(images), torch.from_numpy(src.labels)


def load_cifar10(
    root: str | os.PathLike,
    split: str = "train",
    download: bool = False,
    cache: bool = True,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of CIFAR-10 into memory.

    Parameters
    ----------
    root : folder holding either torchvision's standard form ``root/cifar-10-batches-py/`` (``data_batch_1..5``,
        ``test_batch``, ``batches.meta``; ``root`` may also be that folder itself) or an ImageFolder layout
        ``root/train/<class>/*.jpg|png`` and ``root/test/<class>/*``. If both are present the pickles are used.
    split : ``"train"`` (50,000 images) or ``"test"`` (10,000).
    download : if neither form is present, fetch the standard form with
        ``torchvision.datasets.CIFAR10(root, train=..., download=True)``.
    cache : ImageFolder only: decode once and keep the result in
        ``root/.sdlib_cache/<split>-imagefolder-<fingerprint>.npz`` (written atomically). The fingerprint hashes
        the content of every file with its class (:func:`split_fingerprint`) and the Pillow/libjpeg versions,
        so a changed folder is decoded again (and its stale cache removed), even where a file was rewritten with
        its old size and mtime. If ``root`` is not writable the cache goes to
        ``$SDLIB_CACHE_DIR`` or ``$XDG_CACHE_HOME/sdlib`` (default ``~/.cache/sdlib``), one folder per root.
    progress : progress bar while decoding; None shows it for 5,000 images or more.

    Returns
    -------
    images : uint8 tensor (N, 3, 32, 32), contiguous, on the CPU.
    labels : int64 tensor (N,), indices into :data:`CIFAR10_CLASSES`.
        Order: the pickles' order, or for ImageFolder class by class in sorted file-name order (as
        ``torchvision.datasets.ImageFolder``).

    Raises
    ------
    FileNotFoundError : neither form is present (the message says how to get the data).
    ValueError : bad parameters; an unknown, missing or empty class folder; an image that is not 32x32 RGB or
        cannot be decoded; a malformed or incomplete pickle folder (the message names the file or folder).
    """
    _require_torch('load_cifar10')
    root = _check_root(root)
    split = _check_split(split)
    download = _check_bool("download", download)
    cache = _check_bool("cache", cache)
    if progress is not None:
        progress = _check_bool("progress", progress)
    return _materialize(_locate(root, split, download), cache, progress)


# ---------------------------------------------------------------------------------------------------- splitting


def _labels_array(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    try:
        arr = np.asarray(labels)
    except Exception:
        raise ValueError("labels must be a 1-D sequence of non-negative integers") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got minimum {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _stratified_choice(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``k`` entries of ``labels``, sorted, with per-class counts proportional to the class sizes.

    Per class ``floor(k * n_c / N)``; the ``k - sum`` left over go one each to the classes with the largest
    remainders ``k * n_c mod N`` (ties broken by the rng). Inside each class a uniform random subset.
    """
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts // n
    remainder = k * counts % n
    left = k - int(quota.sum())
    if left:
        order = np.lexsort((rng.permutation(len(classes)), -remainder))
        quota[order[:left]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_split(labels: Any, n_val: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions ``0..N-1`` into a training part and a stratified validation part of ``n_val``.

    Parameters
    ----------
    labels : (N,) integer class indices (tensor, array or list).
    n_val : size of the validation part, ``0 <= n_val < N``.
    seed : non-negative int; the same labels, n_val and seed give the same split.

    Returns
    -------
    train_idx, val_idx : int64 tensors, sorted, disjoint, together ``0..N-1``; ``len(val_idx) == n_val``.
        Per class the validation part takes ``n_val * n_c / N`` images rounded by largest remainder, so every
        class gets its proportional share to within one image (balanced CIFAR-10, n_val=5000: 500 per class).
    """
    _require_torch('stratified_split')
    arr = _labels_array(labels)
    n_val = _check_int("n_val", n_val, minimum=0)
    seed = _check_int("seed", seed, minimum=0)
    if n_val >= arr.shape[0]:
        raise ValueError(f"n_val must be smaller than the number of labels ({arr.shape[0]}), got {n_val}")
    val = _stratified_choice(arr, n_val, np.random.default_rng(seed))
    mask = np.ones(arr.shape[0], dtype=bool)
    mask[val] = False
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64)), torch.from_numpy(val.astype(np.int64))


@dataclass(repr=False)
class CIFAR10Splits:
    """CIFAR-10 held in memory: train / validation / test.

    ``x_*``: uint8 (N, 3, 32, 32) and ``y_*``: int64 (N,), all on one device. ``*_idx``: int64 CPU tensors,
    the positions of each part in the split it was taken from (train and val in the training set, test in the
    test set), so any result can be traced back to images. ``meta``: a JSON-serializable description (root,
    layout, n_val, split_seed, subset, sizes, class counts, class names, normalization).
    """

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

    @property
    def classes(self) -> tuple[str, ...]:
        return CIFAR10_CLASSES

    @property
    def num_classes(self) -> int:
        return len(CIFAR10_CLASSES)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> "CIFAR10Splits":
        """A copy with the image and label tensors on ``device`` (index tensors stay on the CPU)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return CIFAR10Splits(**moved, meta=dict(self.meta), train_idx=self.train_idx, val_idx=self.val_idx,
                             test_idx=self.test_idx)

    def __repr__(self) -> str:
        s = self.meta.get("sizes", {})
        return (f"CIFAR10Splits(train={s.get('train')}, val={s.get('val')}, test={s.get('test')}, "
                f"layout={self.meta.get('layout')!r}, device={str(self.device)!r})")


def load_splits(
    root: str | os.PathLike,
    n_val: int = 5000,
    split_seed: int = 0,
    subset: int | None = None,
    device: str | torch.device = "cpu",
    download: bool = False,
    cache: bool = True,
    progress: bool | None = None,
) -> CIFAR10Splits:
    """Load CIFAR-10 with a stratified validation split held out of the training set.

    The validation part is what model selection and the estimate alpha-hat use; the test set only reports.

    Parameters
    ----------
    root, download, cache, progress : as in :func:`load_cifar10` (progress: the image-decoding bar; False
        silences it, None shows it from 5,000 images on).
    n_val : validation images drawn from the training set, ``0 <= n_val < N_train`` (stratified, see
        :func:`stratified_split`).
    split_seed : seed of the split and of the subsets.
    subset : None for everything, or an int >= 10 (one per class) for smoke runs. The split is always made on
        the full training set first, so validation images never depend on ``subset``; then each part is cut to
        a stratified, seeded subset: train to ``min(subset, N_train - n_val)``, validation to
        ``min(n_val, subset)``, test to ``min(subset, N_test)``. A smaller subset is not nested in a larger one.
    device : where the image and label tensors are put.

    Returns
    -------
    CIFAR10Splits with ``meta = {"root", "layout", "n_val", "split_seed", "subset", "sizes": {"train", "val",
    "test"}, "source_sizes": {"train", "test"}, "class_counts": {part: [10 ints]}, "classes",
    "fingerprint" (:func:`data_fingerprint`), "split_fingerprints" ({"train", "test"}), "mean", "std"}``.
    """
    _require_torch('load_splits')
    root = _check_root(root)
    n_val = _check_int("n_val", n_val, minimum=0)
    split_seed = _check_int("split_seed", split_seed, minimum=0)
    if subset is not None:
        subset = _check_int("subset", subset, minimum=len(CIFAR10_CLASSES))
    download = _check_bool("download", download)
    cache = _check_bool("cache", cache)
    if progress is not None:
        progress = _check_bool("progress", progress)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from None

    if download and (detect_layout(root, "train") is None or detect_layout(root, "test") is None):
        _download(root, "train")  # before locating either split, so that both come from the same form
    train_src = _locate(root, "train", False)
    test_src = _locate(root, "test", False)
    if n_val >= train_src.n:
        raise ValueError(f"n_val must be smaller than the {train_src.n} training images under {str(root)!r}, "
                         f"got {n_val}")

    train_idx, val_idx = stratified_split(train_src.labels, n_val, split_seed)
    train_idx, val_idx = train_idx.numpy(), val_idx.numpy()
    test_idx = np.arange(test_src.n, dtype=np.int64)
    if subset is not None:
        def cut(idx: np.ndarray, labels: np.ndarray, k: int, stream: int) -> np.ndarray:
            if k >= len(idx):
                return idx
            rng = np.random.default_rng([split_seed, stream])  # one independent stream per part
            return idx[_stratified_choice(labels[idx], k, rng)]

        train_idx = cut(train_idx, train_src.labels, subset, 1)
        val_idx = cut(val_idx, train_src.labels, min(n_val, subset), 2)
        test_idx = cut(test_idx, test_src.labels, subset, 3)

    x_tr_all, y_tr_all = _materialize(train_src, cache, progress)
    x_te_all, y_te_all = _materialize(test_src, cache, progress)
    t_train, t_val, t_test = (torch.from_numpy(i) for i in (train_idx, val_idx, test_idx))
    parts = {
        "train": (x_tr_all[t_train], y_tr_all[t_train]),
        "val": (x_tr_all[t_val], y_tr_all[t_val]),
        "test": (x_te_all if subset is None else x_te_all[t_test], y_te_all if subset is None else y_te_all[t_test]),
    }
    meta = {
        "root": str(root.resolve()),
        "layout": train_src.layout,
        "n_val": n_val,
        "split_seed": split_seed,
        "subset": subset,
        "sizes": {k: int(v[1].shape[0]) for k, v in parts.items()},
        "source_sizes": {"train": train_src.n, "test": test_src.n},
        "class_counts": {k: np.bincount(v[1].numpy(), minlength=10).tolist() for k, v in parts.items()},
        "classes": list(CIFAR10_CLASSES),
        "fingerprint": _combine(train_src.fingerprint, test_src.fingerprint),
        "split_fingerprints": {"train": train_src.fingerprint, "test": test_src.fingerprint},
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
    }
    return CIFAR10Splits(
        x_train=parts["train"][0].to(device), y_train=parts["train"][1].to(device),
        x_val=parts["val"][0].to(device), y_val=parts["val"][1].to(device),
        x_test=parts["test"][0].to(device), y_test=parts["test"][1].to(device),
        meta=meta, train_idx=t_train, val_idx=t_val, test_idx=t_test,
    )


# ----------------------------------------------------------------------------------- normalization, augmentation


def _check_images(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be a uint8 tensor of shape (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


_NORM_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # (x/255 - mean)/std as one multiply-add; kept per device so no host-to-device copy per batch.
    key = str(device)
    if key not in _NORM_CACHE:
        std = torch.tensor(CIFAR10_STD, dtype=torch.float64)
        mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, 3, 1, 1).to(device)
        shift = (mean / std).to(torch.float32).view(1, 3, 1, 1).to(device)
        _NORM_CACHE[key] = (scale, shift)
    return _NORM_CACHE[key]


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W), ``(x/255 - CIFAR10_MEAN) / CIFAR10_STD`` per channel.

    Returns a new contiguous (NCHW) tensor on ``x_uint8``'s device.
    """
    _require_torch('normalize')
    x = _check_images("x_uint8", x_uint8)
    scale, shift = _norm_constants(x.device)
    out = x.to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(scale).sub_(shift)


def _check_generator(generator: Any, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    g = generator.device
    same = g.type == device.type and (g.index is None or device.index is None or g.index == device.index)
    if not same:
        raise ValueError(f"generator must live on the images' device {device}, got a generator on {g}")
    return generator


def sample_crop_flip(
    batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu", padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the random parameters of :func:`augment` for ``batch`` images.

    Returns ``top``, ``left``: int64 (B,) uniform on ``0..2*padding`` (the crop's corner in the padded image,
    as ``RandomCrop(32, padding=4)``), and ``flip``: bool (B,), True with probability 1/2. Drawn in that order
    from ``generator`` (which must be on ``device``).
    """
    _require_torch('sample_crop_flip')
    batch = _check_int("batch", batch, minimum=0)
    padding = _check_int("padding", padding, minimum=0)
    device = torch.device(device)
    generator = _check_generator(generator, device)
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return top, left, flip


def crop_flip(
    x_uint8: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Deterministic core of :func:`augment`, on uint8: zero-pad by ``padding``, crop ``H x W`` at
    ``(top[b], left[b])``, mirror left-right where ``flip[b]``. One gather over the whole batch.

    x_uint8 : (B, 3, H, W) uint8; top, left : (B,) ints in ``0..2*padding``; flip : (B,) bool.
    Returns uint8 (B, 3, H, W), contiguous, equal to ``hflip(crop(pad(x, padding), top, left, H, W))`` image by
    image (torchvision's RandomCrop followed by RandomHorizontalFlip).
    """
    _require_torch('crop_flip')
    x = _check_images("x_uint8", x_uint8)
    padding = _check_int("padding", padding, minimum=0)
    b, c, h, w = x.shape
    for name, t in (("top", top), ("left", left), ("flip", flip)):
        if not isinstance(t, torch.Tensor) or t.shape != (b,):
            raise ValueError(f"{name} must be a tensor of shape ({b},), got {getattr(t, 'shape', type(t))}")
    top, left, flip = top.to(x.device, torch.int64), left.to(x.device, torch.int64), flip.to(x.device, torch.bool)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # zeros, still uint8
    r = torch.arange(h, device=x.device)
    col = torch.arange(w, device=x.device)
    rows = top[:, None] + r  # (B, H)
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - col, col)  # (B, W): mirrored read when flipped
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


def augment(x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR-10 augmentation for a whole batch, then :func:`normalize`.

    Random 32x32 crop of the image zero-padded by 4 pixels (torchvision ``RandomCrop(32, padding=4)`` on the
    uint8 image, so padded pixels are 0 before normalization, i.e. ``-mean/std`` after) and a horizontal flip
    with probability 1/2. Vectorized on ``x_uint8``'s device: one draw of the parameters
    (:func:`sample_crop_flip`, from ``generator`` if given, which must be on the same device) and one gather
    (:func:`crop_flip`).

    x_uint8 : uint8 (B, 3, 32, 32). Returns float32 (B, 3, 32, 32), contiguous; the order of images (and so
    their labels) is unchanged.
    """
    _require_torch('augment')
    x = _check_images("x_uint8", x_uint8)
    top, left, flip = sample_crop_flip(x.shape[0], generator=generator, device=x.device)
    return normalize(crop_flip(x, top, left, flip))


# ------------------------------------------------------------------------------------------------ label noise


def _check_labels(labels, n_classes) -> tuple[np.ndarray, int]:
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1} (n_classes={n_classes}), "
                         f"got values from {labels.min()} to {labels.max()}")
    return labels.astype(np.int64), int(n_classes)


def symmetric_label_noise(labels, rate: float, n_classes: int, seed: int = 0) -> np.ndarray:
    """(n,) labels with exactly ``round(rate * n)`` of them changed, each to a uniformly drawn *other* class.

    Symmetric label noise at an exact rate: the corrupted positions are a uniform random subset of that size,
    and a corrupted label is never its own class. ``rate`` in [0, 1); ``seed`` makes it repeatable (numpy's
    default_rng). The input is not modified.
    """
    labels, n_classes = _check_labels(labels, n_classes)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * labels.size))
    flip = rng.choice(labels.size, size=n_flip, replace=False)
    noisy = labels.copy()
    # A shift of 1..n_classes - 1 (mod n_classes) is a uniform draw among the other classes.
    noisy[flip] = (labels[flip] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    return noisy
