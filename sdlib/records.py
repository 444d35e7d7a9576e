"""The names shared by the trainer and the torch-free readers (the results files, the chains), and
:func:`write_atomically`. Chains are ``"alpha=<a:g>"`` for a fixed alpha, ``"alpha_hat"`` for the estimated one and
``"shared"`` for the step-1 model of a seed (labels alone); :mod:`sdlib.store` reads and writes the results files.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Callable, IO

RECORDS_FILE = "records.jsonl"
EPOCHS_FILE = "epochs.jsonl"
PROBE_EPOCHS_FILE = "probe_epochs.jsonl"
SHARED_CHAIN = "shared"  # the step-1 model of a seed, trained on the labels alone
ALPHA_HAT_CHAIN = "alpha_hat"
PROBE_CHAIN = "alpha_hat_probe"  # the alpha = 0 step of Algorithm 1 (no record of its own)


def chain_name(alpha: float | None) -> str:
    """``"alpha=<a:g>"`` for a fixed alpha (``"alpha=0.1"``), ``"alpha_hat"`` for None."""
    return ALPHA_HAT_CHAIN if alpha is None else f"alpha={float(alpha):g}"


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``: readers
    see the old file or the new one, never half of one, and a crash cannot leave an empty file. An interrupted
    write leaves no temporary (a killed process may: :func:`remove_stale_temporaries`). Permissions 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``<name>.*.tmp``) a killed :func:`write_atomically` of ``path`` left (a
    checkpoint's can be hundreds of MB). Call it only where no other process writes ``path``."""
    path, removed = Path(path), []
    for tmp in sorted(path.parent.glob(glob.escape(path.name) + ".*.tmp")) if path.parent.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
