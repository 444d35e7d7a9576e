"""The results store: the one reader and writer of ``records.jsonl``, ``epochs.jsonl`` and ``probe_epochs.jsonl``.

Append-only: a write appends whole lines (one write, then fsync) under an exclusive lock of the folder
(``.sdlib-store.lock``, fcntl, removed after each write), so runs of several configs, one after the other or at the
same time, lose nothing. Lines are keyed by ``(config_hash, seed, chain, step)`` (and ``epoch``); readers keep the
last line of a key and choose one config (:func:`select_config`). A torn last line may be an append in progress:
the reader waits for the writer and reads again, so only a line a crash tore is reported (:class:`UnreadableLineError`,
naming file and line, which pandas.read_json(lines=True) would not) or skipped on request. One rewrite, under the
same lock, for ``scripts/migrate_results.py``. Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable

from sdlib.checks import boolean, check
from sdlib.records import EPOCHS_FILE, PROBE_EPOCHS_FILE, RECORDS_FILE, remove_stale_temporaries, write_atomically

RECORD_KEY = ("config_hash", "seed", "chain", "step")
EPOCH_KEY = RECORD_KEY + ("epoch",)
LOCK_FILE = ".sdlib-store.lock"
RESULTS_FILES = (RECORDS_FILE, EPOCHS_FILE, PROBE_EPOCHS_FILE)


class StoreError(ValueError):
    """A results folder that cannot be read or written as asked (a ValueError: the command line reports it)."""


class UnreadableLineError(StoreError):
    """A line of a results file that is not a JSON object; ``path`` and ``line_number`` say where."""

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


def check_writable_dir(path: str | os.PathLike, what: str = "results_dir") -> Path:
    """Create ``path`` if missing and prove that a file can be written in it, else :class:`NotWritableError`
    naming ``what``, the path and the reason. Called before any training."""
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
        raise NotWritableError(f"{what} {str(path)!r} is not writable ({error.strerror or type(error).__name__}): "
                               f"choose another {what} or fix its permissions") from None
    return path


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive lock of ``directory``; its lock file is removed on release."""
    lock_path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise NotWritableError(f"{lock_path} is a folder, not the results store's lock file: move it "
                                   f"away") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = False
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            if current:  # else the holder before us removed that file: lock the one now at the path
                try:
                    yield
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock_path)
                return
        finally:
            os.close(fd)


def _wait_for_writer(directory: Path) -> None:
    """Block while a process appends in ``directory`` (a shared lock on its lock file), then pause a moment."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no writer now (the lock file exists only during a write)
        time.sleep(0.05)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    """(object, None) for a line holding a JSON object, else (None, why not)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    return (obj, None) if isinstance(obj, dict) else (None, f"expected a JSON object, got {type(obj).__name__}")


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line of ``path`` (a missing file: none); an unreadable line
    raises :class:`UnreadableLineError`, or with ``skip_bad_lines`` is left out with a RuntimeWarning naming it."""
    check("skip_bad_lines", skip_bad_lines, boolean())
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a results file: move it away (a results folder holds "
                         f"{RECORDS_FILE}, {EPOCHS_FILE} and {PROBE_EPOCHS_FILE} as files)")
    if not path.is_file():
        return []
    for _ in range(4):  # a torn last line: an append met half-way (read again after it) or a crash
        with open(path, "rb") as handle:
            lines = handle.readlines()
        last = lines[-1] if lines else b"\n"
        if last.endswith(b"\n") or not last.strip() or _parse(last)[0] is not None:
            break
        _wait_for_writer(path.parent)
    rows, skipped = [], []
    for line_number, raw in enumerate(lines, start=1):
        if raw.strip():
            obj, reason = _parse(raw)
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


def last_per_key(rows: Iterable[tuple[int, dict]], fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """The last ``(line_number, row)`` of every key (last write wins), in the order of those last lines."""
    last = {tuple(row.get(field) for field in fields): (line_number, row) for line_number, row in rows}
    return sorted(last.values(), key=lambda item: item[0])


def configs_in(rows: list[tuple[int, dict]], profiles: dict | None = None) -> dict[str | None, dict]:
    """The configs of ``rows``, oldest (by their last line) first: ``config_hash -> {"profile", "lines"}``, the
    profile the last one a line names, else ``profiles[config_hash]``."""
    found: dict = {}
    for _, row in rows:
        old = found.pop(row.get("config_hash"), {"profile": (profiles or {}).get(row.get("config_hash")), "lines": 0})
        found[row.get("config_hash")] = {"profile": row.get("profile") or old["profile"], "lines": old["lines"] + 1}
    return found


def describe(configs: dict) -> str:
    """The configs of :func:`configs_in`, newest first, as messages name them."""
    return "; ".join(f"{h} (profile {c['profile']}, {c['lines']} line(s))" for h, c in reversed(configs.items()))


def select_config(rows: list[tuple[int, dict]], path: str | os.PathLike, config_hash: str | None = None,
                  profile: str | None = None, profiles: dict | None = None, warn: bool = True) -> str | None:
    """The config_hash to read from ``rows`` of ``path``: ``config_hash`` (it must be there), else the newest of
    ``profile``, else the newest; a RuntimeWarning names them all where there are several (unless ``warn=False``).
    :class:`UnknownConfigError` lists the configs present when the asked one is not."""
    if config_hash is not None and not isinstance(config_hash, str):
        raise ValueError(f"config_hash must be a string such as '3f2a9c01be47' or None, got {config_hash!r}")
    if profile is not None and not isinstance(profile, str):
        raise ValueError(f"profile must be a profile name such as 'paper' or None, got {profile!r}")
    if config_hash is not None and profile is not None:
        raise ValueError("give config_hash or profile, not both")
    configs = configs_in(rows, profiles)
    if not configs:
        return None
    present = describe(configs)
    if config_hash is not None:
        if config_hash not in configs:
            raise UnknownConfigError(f"config_hash {config_hash!r} has no lines in {path}; present (newest "
                                     f"first): {present}")
        return config_hash
    candidates = [h for h, c in configs.items() if profile is None or c["profile"] == profile]
    if not candidates:
        raise UnknownConfigError(f"profile {profile!r} has no lines in {path}; present (newest first): {present}")
    chosen = candidates[-1]
    if warn and len(configs) > 1:
        how = "the newest" if profile is None else f"the newest of profile {profile!r}"
        warnings.warn(f"{path} holds {len(configs)} configs (newest first: {present}); reading {how}, {chosen}: "
                      f"pass config_hash= or profile= to choose another", RuntimeWarning, stacklevel=3)
    return chosen


class ResultsStore:
    """The results of one folder, for the trainer: what a config has finished, and appending what it makes.
    ``skip_bad_lines``: skip unreadable lines (with a warning) instead of raising :class:`UnreadableLineError`."""

    def __init__(self, results_dir: str | os.PathLike, skip_bad_lines: bool = False):
        check("skip_bad_lines", skip_bad_lines, boolean())
        self.results_dir, self.skip_bad_lines = Path(results_dir), skip_bad_lines

    def path(self, filename: str) -> Path:
        return self.results_dir / filename

    def check_writable(self) -> None:
        """:class:`NotWritableError` now, before any work, where results cannot be written here; removes the lock
        files and temporaries the old store (which rewrote files in full) may have left."""
        check_writable_dir(self.results_dir, "results_dir")
        for name in (*RESULTS_FILES, LOCK_FILE):
            if (self.results_dir / name).is_dir():
                raise NotWritableError(f"results_dir {str(self.results_dir)!r} holds a folder {name!r} where the "
                                       f"results store writes a file: move it away or choose another results_dir")
        with _locked(self.results_dir):
            for name in RESULTS_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.results_dir / (name + ".lock")).unlink()
                remove_stale_temporaries(self.results_dir / name)

    def read(self, filename: str) -> list[tuple[int, dict]]:
        return read_jsonl(self.path(filename), self.skip_bad_lines)

    def records(self, config_hash: str) -> dict[tuple, dict]:
        """``(seed, chain, step) -> record`` of ``config_hash`` (the last line of each key)."""
        rows = [(n, r) for n, r in self.read(RECORDS_FILE) if r.get("config_hash") == config_hash]
        return {(r.get("seed"), r.get("chain"), r.get("step")): r for _, r in last_per_key(rows, RECORD_KEY)}

    def append(self, filename: str, rows: list[dict]) -> None:
        """Append ``rows`` to ``results_dir/filename`` (one write, then fsync) under the folder's lock."""
        required = RECORD_KEY if filename == RECORDS_FILE else EPOCH_KEY
        for row in rows:
            missing = [k for k in required if row.get(k) is None]
            if missing:
                raise ValueError(f"a line of {filename} needs {list(required)}; missing {missing} in {row!r}")
        payload = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.results_dir), open(self.path(filename), "a+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size and os.pread(handle.fileno(), 1, size - 1) != b"\n":  # a torn last line stays a line of its own
                payload = b"\n" + payload
            handle.write(payload)  # buffered: written in full, however large
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, transform) -> dict[str, list[dict]]:
        """Write back what ``transform({filename: [(line_number, row), ...]})`` returns (``{filename: [row, ...]}``,
        each file written atomically; raising writes nothing), read and written under the folder's lock so that no
        append of another process is lost. The one exception to append-only, for ``scripts/migrate_results.py``."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.results_dir):
            new = transform({name: self.read(name) for name in RESULTS_FILES})
            for name, rows in new.items():
                write_atomically(self.path(name),
                                 lambda handle, rows=rows: handle.writelines(json.dumps(row) + "\n" for row in rows))
        return new

    def append_record(self, record: dict) -> None:
        self.append(RECORDS_FILE, [record])

    def append_epoch(self, row: dict, probe: bool = False) -> None:
        self.append(PROBE_EPOCHS_FILE if probe else EPOCHS_FILE, [row])
