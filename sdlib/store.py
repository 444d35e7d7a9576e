"""The results store: the one module that reads and writes ``records.jsonl``, ``epochs.jsonl`` and
``probe_epochs.jsonl`` (and takes their lock). Torch-free and pandas-free.

Guarantees
----------
- **Append-only.** A write appends whole lines (one ``write`` of all of them, then ``fsync``) under an
  exclusive lock of the folder; no line is ever rewritten, replaced or deleted, so nothing a run of another
  config wrote is lost, whether the runs go one after the other or at the same time. There is no full rewrite
  per epoch: an append costs the same with 10 lines in the file or 15,000.
- **Keyed by what made it.** Every record is keyed by ``(config_hash, seed, chain, step)``, every epoch line by
  ``(config_hash, seed, chain, step, epoch)``. A step redone after a crash appends again; readers keep the last
  line of a key (last write wins), so a resumed run never shows a row twice.
- **Readers choose a config** (:func:`select_config`): the newest (the one whose line was appended last) by
  default, or one named by hash or by profile, and say so (a RuntimeWarning listing every config) when a folder
  holds several. Epoch curves are never mixed across configs.
- **Unreadable lines** (a line torn by a crash on a file system without atomic appends, a hand edit) raise
  :class:`UnreadableLineError` naming the file and the line; ``skip_bad_lines=True`` skips them (with a
  RuntimeWarning naming each). A last line without its newline may be an append in progress (a reader meeting a
  large record half-written): readers wait for the writer's lock and read again, so only a line a crash tore is
  reported. A writer that finds the file not ending in a newline starts a fresh line, so a torn line never
  swallows the next record.
- **One rewrite, for migrations.** :meth:`ResultsStore.rewrite` (``scripts/migrate_results.py``) reads and
  rewrites the files under the same lock, so an append of another process waits for it and is never lost.
- **Lock.** ``results_dir/.sdlib-store.lock``, created for each write and removed after it (a waiting writer
  checks that the file it locked is still the one at that path, else it locks the new one), so no lock file is
  left behind; ``*.lock`` is git-ignored for the one a killed process may leave.

Files written by the old store (rewritten in full under ``records.jsonl.lock``) have the same lines and are read
as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sdlib.records import EPOCHS_FILE, PROBE_EPOCHS_FILE, RECORDS_FILE, remove_stale_temporaries, write_atomically

__all__ = [
    "StoreError",
    "UnreadableLineError",
    "NotWritableError",
    "UnknownConfigError",
    "RECORD_KEY",
    "EPOCH_KEY",
    "LOCK_FILE",
    "ConfigSummary",
    "ResultsStore",
    "check_writable_dir",
    "read_jsonl",
    "last_per_key",
    "configs_in",
    "select_config",
]

RECORD_KEY = ("config_hash", "seed", "chain", "step")
EPOCH_KEY = RECORD_KEY + ("epoch",)
LOCK_FILE = ".sdlib-store.lock"
_LEGACY_LOCKS = tuple(name + ".lock" for name in (RECORDS_FILE, EPOCHS_FILE, PROBE_EPOCHS_FILE))


class StoreError(ValueError):
    """A results folder that cannot be read or written as asked (a ValueError: the command line reports it)."""


class UnreadableLineError(StoreError):
    """A line of a results file that is not a JSON object. ``path`` and ``line_number`` say where."""

    def __init__(self, path: Path, line_number: int, reason: str):
        self.path, self.line_number = Path(path), line_number
        super().__init__(
            f"{path}, line {line_number}: {reason}. A crash mid-write or a hand edit leaves such a line: delete "
            f"that line (every other line is intact; a step whose record it was is re-recorded from its "
            f"checkpoint), or read with skip_bad_lines=True (command line: --skip-bad-lines) to skip it")


class NotWritableError(StoreError):
    """A results or checkpoint folder that is a file, or that cannot be created or written."""


class UnknownConfigError(StoreError):
    """No config of the asked hash or profile in a results folder."""


# ------------------------------------------------------------------------------------------------------ folders


def check_writable_dir(path: str | os.PathLike, what: str = "results_dir") -> Path:
    """Create ``path`` if missing and prove that a file can be written in it (then removed); else
    :class:`NotWritableError` naming ``what``, the path and the reason. Called before any training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotWritableError(f"{what} {str(path)!r} is a file, not a directory: choose another {what} "
                               f"or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".sdlib-write-test.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except FileExistsError:
        raise NotWritableError(f"{what} {str(path)!r} cannot be created: a parent of it is a file") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise NotWritableError(f"{what} {str(path)!r} is not writable ({reason}): choose another {what} or fix "
                               f"its permissions") from None
    return path


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive lock of ``directory`` (its lock file is removed on release, see the module docstring)."""
    lock_path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise NotWritableError(f"{lock_path} is a folder, not the results store's lock file: move it "
                                   f"away") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder before us removed that file: lock the one now at the path
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ reading


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line of ``path`` (a missing file: none).

    A line that is not a JSON object raises :class:`UnreadableLineError` (file and line), unless
    ``skip_bad_lines``: then it is left out with a RuntimeWarning naming it. A last line without its newline
    that does not parse may be an append in progress (one write of a large record, met half-way): the reader
    waits for the folder's lock and reads again; only a line still torn then (a crash cut it) is unreadable."""
    if not isinstance(skip_bad_lines, bool):
        raise ValueError(f"skip_bad_lines must be True or False, got {skip_bad_lines!r}")
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a results file: move it away (a results folder holds "
                         f"{RECORDS_FILE}, {EPOCHS_FILE} and {PROBE_EPOCHS_FILE} as files)")
    if not path.is_file():
        return []
    for _ in range(_READ_ATTEMPTS):
        with open(path, "rb") as handle:
            lines = handle.readlines()
        last = lines[-1] if lines else b"\n"
        if last.endswith(b"\n") or not last.strip() or _parses(last):
            break
        _wait_for_writer(path.parent)  # then read again: the append has finished, or the line was torn
    rows, skipped = [], []
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            reason = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        except json.JSONDecodeError as error:
            reason = f"not valid JSON ({error.msg} at column {error.colno})"
        if reason is None:
            rows.append((line_number, obj))
        elif skip_bad_lines:
            skipped.append(f"line {line_number} ({reason})")
        else:
            raise UnreadableLineError(path, line_number, reason)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} unreadable line(s): {', '.join(skipped)}", RuntimeWarning,
                      stacklevel=2)
    return rows


_READ_ATTEMPTS = 4


def _wait_for_writer(directory: Path) -> None:
    """Block until no process appends in ``directory`` (a shared lock on its lock file, if there is one), then
    pause a moment, so that a reader re-reads after the append it met half-way."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no writer now (the lock file exists only during a write), or not readable
        time.sleep(0.05)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row.get(field) for field in fields)


def last_per_key(rows: Iterable[tuple[int, dict]], fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """The last ``(line_number, row)`` of every key (last write wins), in the order of those last lines."""
    last = {}
    for line_number, row in rows:
        key = _key(row, fields)
        last.pop(key, None)  # re-insert: the dict's order becomes the order of the last lines
        last[key] = (line_number, row)
    return list(last.values())


@dataclass(frozen=True)
class ConfigSummary:
    """One config found in a results file: its hash, profile (None if no line says), how many distinct keys
    it has there and the line number of its last line (larger: newer)."""

    config_hash: str | None
    profile: str | None
    rows: int
    last_line: int

    def describe(self) -> str:
        return f"{self.config_hash} (profile {self.profile}, {self.rows} line(s))"


def configs_in(rows: list[tuple[int, dict]], profiles: dict | None = None) -> list[ConfigSummary]:
    """The configs of ``rows`` (as :func:`read_jsonl` gives them), oldest first (by their last line).
    ``profiles`` maps config_hash -> profile for lines that carry none (epoch lines of the old store)."""
    found: dict = {}
    for line_number, row in rows:
        h = row.get("config_hash")
        entry = found.setdefault(h, {"profile": None, "last": 0, "count": 0})
        entry["last"] = max(entry["last"], line_number)
        entry["count"] += 1
        if row.get("profile") is not None:
            entry["profile"] = row["profile"]
    out = [ConfigSummary(h, e["profile"] if e["profile"] is not None else (profiles or {}).get(h), e["count"],
                         e["last"]) for h, e in found.items()]
    return sorted(out, key=lambda c: c.last_line)


def select_config(rows: list[tuple[int, dict]], path: str | os.PathLike, config_hash: str | None = None,
                  profile: str | None = None, profiles: dict | None = None, warn: bool = True) -> str | None:
    """The config_hash to read from ``rows`` of ``path``: ``config_hash`` if given (it must be there), else the
    newest config of ``profile`` if given, else the newest config. With several configs in the file a
    RuntimeWarning says which one is read and lists the others (``warn=False``: silent).
    Raises :class:`UnknownConfigError` listing the configs present when the asked one is not."""
    if config_hash is not None and not isinstance(config_hash, str):
        raise ValueError(f"config_hash must be a string such as '3f2a9c01be47' or None, got {config_hash!r}")
    if profile is not None and not isinstance(profile, str):
        raise ValueError(f"profile must be a profile name such as 'paper' or None, got {profile!r}")
    if config_hash is not None and profile is not None:
        raise ValueError("give config_hash or profile, not both")
    configs = configs_in(rows, profiles)
    if not configs:
        return None
    present = "; ".join(c.describe() for c in reversed(configs))
    if config_hash is not None:
        chosen = [c for c in configs if c.config_hash == config_hash]
        if not chosen:
            raise UnknownConfigError(f"config_hash {config_hash!r} has no lines in {path}; present (newest "
                                     f"first): {present}")
        return config_hash
    candidates = configs if profile is None else [c for c in configs if c.profile == profile]
    if not candidates:
        raise UnknownConfigError(f"profile {profile!r} has no lines in {path}; present (newest first): {present}")
    chosen = candidates[-1]
    if warn and len(configs) > 1:
        how = "the newest" if profile is None else f"the newest of profile {profile!r}"
        warnings.warn(f"{path} holds {len(configs)} configs (newest first: {present}); reading {how}, "
                      f"{chosen.config_hash}: pass config_hash= or profile= to choose another", RuntimeWarning,
                      stacklevel=3)
    return chosen.config_hash


# ------------------------------------------------------------------------------------------------------- store


class ResultsStore:
    """The results of one folder, for the trainer: what a config has finished, and appending what it makes.

    results_dir : the folder (created on the first write, after :meth:`check_writable`).
    skip_bad_lines : skip unreadable lines (with a warning) instead of raising :class:`UnreadableLineError`.
    """

    def __init__(self, results_dir: str | os.PathLike, skip_bad_lines: bool = False):
        if not isinstance(skip_bad_lines, bool):
            raise ValueError(f"skip_bad_lines must be True or False, got {skip_bad_lines!r}")
        self.results_dir = Path(results_dir)
        self.skip_bad_lines = skip_bad_lines

    def path(self, filename: str) -> Path:
        return self.results_dir / filename

    def check_writable(self) -> None:
        """:class:`NotWritableError` now, before any work, if results can not be written here; removes the lock
        files and the temporaries of a killed full rewrite that the old store left behind."""
        check_writable_dir(self.results_dir, "results_dir")
        for name in (RECORDS_FILE, EPOCHS_FILE, PROBE_EPOCHS_FILE, LOCK_FILE):
            if (self.results_dir / name).is_dir():
                raise NotWritableError(f"results_dir {str(self.results_dir)!r} holds a folder {name!r} where the "
                                       f"results store writes a file: move it away or choose another results_dir")
        with _locked(self.results_dir):
            for name in _LEGACY_LOCKS:
                with contextlib.suppress(FileNotFoundError):
                    (self.results_dir / name).unlink()
            for name in (RECORDS_FILE, EPOCHS_FILE, PROBE_EPOCHS_FILE):
                remove_stale_temporaries(self.results_dir / name)

    def read(self, filename: str) -> list[tuple[int, dict]]:
        return read_jsonl(self.path(filename), self.skip_bad_lines)

    def records(self, config_hash: str) -> dict[tuple, dict]:
        """``(seed, chain, step) -> record`` of ``config_hash`` (the last line of each key)."""
        rows = [(n, r) for n, r in self.read(RECORDS_FILE) if r.get("config_hash") == config_hash]
        return {(r.get("seed"), r.get("chain"), r.get("step")): r for _, r in last_per_key(rows, RECORD_KEY)}

    def config_hashes(self) -> set:
        return {r.get("config_hash") for _, r in self.read(RECORDS_FILE)}

    def append(self, filename: str, rows: list[dict]) -> None:
        """Append ``rows`` to ``results_dir/filename`` (one write, then fsync) under the folder's lock."""
        required = RECORD_KEY if filename == RECORDS_FILE else EPOCH_KEY
        for row in rows:
            missing = [k for k in required if row.get(k) is None]
            if missing:
                raise ValueError(f"a line of {filename} needs {list(required)}; missing {missing} in {row!r}")
        payload = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(filename)
        with _locked(self.results_dir):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size:  # a torn last line (a crash mid-write) stays a line of its own
                    with open(path, "rb") as handle:
                        handle.seek(size - 1)
                        if handle.read(1) != b"\n":
                            payload = b"\n" + payload
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def rewrite(self, transform) -> dict[str, list[dict]]:
        """Read every results file and write back what ``transform`` makes of them, under the folder's lock.

        ``transform({filename: [(line_number, row), ...]})`` (records, epochs, probe epochs; a missing file: no
        rows) returns ``{filename: [row, ...]}`` for the files to replace (each written atomically) or raises,
        and then nothing is written. Appends of other processes wait for the lock, so none is lost between the
        read and the write. The one exception to append-only, for ``scripts/migrate_results.py``; returns what
        was written."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.results_dir):
            new = transform({name: self.read(name) for name in (RECORDS_FILE, EPOCHS_FILE, PROBE_EPOCHS_FILE)})
            for name, rows in new.items():
                write_atomically(self.path(name),
                                 lambda handle, rows=rows: handle.writelines(json.dumps(row) + "\n" for row in rows))
        return new

    def append_record(self, record: dict) -> None:
        self.append(RECORDS_FILE, [record])

    def append_epoch(self, row: dict, probe: bool = False) -> None:
        self.append(PROBE_EPOCHS_FILE if probe else EPOCHS_FILE, [row])
