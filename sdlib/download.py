"""Torchvision's form of CIFAR-10, ``root/cifar-10-batches-py``: its file names, the download (with a timeout) and
the read of its pickles after checking every file's MD5 (a planted pickle runs nothing). :mod:`sdlib.data` reads
this form and the ImageFolder layout."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

PICKLE_DIRNAME = "cifar-10-batches-py"  # torchvision.datasets.CIFAR10.base_folder
PICKLE_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST_FILES = ("test_batch",)
PICKLE_META_FILE = "batches.meta"
DOWNLOAD_TIMEOUT_S = 60.0  # seconds without an answer before a download gives up ($SDLIB_DOWNLOAD_TIMEOUT)


def check_root(root) -> Path:
    """The data root as a Path (``~`` expanded), after checking it is a non-empty str or os.PathLike."""
    if not isinstance(root, (str, os.PathLike)) or str(root) == "":
        raise ValueError(f"root must be a non-empty path (str or os.PathLike), got {root!r}")
    return Path(root).expanduser()


def pickle_dir(root: Path) -> Path | None:
    """root/cifar-10-batches-py, or root itself where it is that folder."""
    if (root / PICKLE_DIRNAME).is_dir():
        return root / PICKLE_DIRNAME
    return root if root.name == PICKLE_DIRNAME and (root / PICKLE_META_FILE).is_file() else None


class DownloadError(FileNotFoundError):
    """Fetching CIFAR-10 failed or timed out: the message names the URL, the timeout and what to do offline."""


def download_cifar10(root: str | os.PathLike, timeout_s: float | None = None) -> None:
    """Fetch torchvision's form of CIFAR-10 into ``root/cifar-10-batches-py``, giving up after ``timeout_s`` seconds
    of silence (default ``$SDLIB_DOWNLOAD_TIMEOUT`` or 60; torchvision sets none: a silent proxy would hang)."""
    import torchvision

    root = check_root(root)
    if timeout_s is None:
        text = os.environ.get("SDLIB_DOWNLOAD_TIMEOUT", str(DOWNLOAD_TIMEOUT_S))
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"SDLIB_DOWNLOAD_TIMEOUT must be a number of seconds, got {text!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    url = torchvision.datasets.CIFAR10.url
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib (which torchvision uses) applies it to every socket it opens
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
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


def read_pickles(pdir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The pickles of ``split`` through ``torchvision.datasets.CIFAR10``, after checking every file's MD5 against
    torchvision's list (naming the first that differs): a pickle can run code, so only the published files are read."""
    from torchvision.datasets import CIFAR10, cifar

    published = dict([*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])])
    names = (PICKLE_META_FILE, *PICKLE_TRAIN_FILES, *PICKLE_TEST_FILES)
    missing = [name for name in names if not (pdir / name).is_file()]
    if missing:
        raise ValueError(f"incomplete CIFAR-10 pickle folder {str(pdir)!r}: missing {missing}; expected "
                         f"{list(names)} (re-download with download=True)")
    for name in names:
        if not cifar.check_integrity(str(pdir / name), published[name]):
            raise ValueError(f"{str(pdir / name)!r} is not the published CIFAR-10 file (its MD5 differs from "
                             "torchvision's list); a pickle can run code when read, so it is not read: delete the "
                             "folder and download again (download=True)")
    dataset = CIFAR10(str(pdir.parent), train=split == "train")
    return np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)), np.asarray(dataset.targets, dtype=np.int64)
