"""Aggregate and plot the results of the CIFAR-10 self-distillation chains.

Torch-free on purpose (numpy, pandas, matplotlib only) so that the book can read and plot committed
results on a machine without torch. The files read here are written by :func:`sdlib.train.run_chains`:

- ``results_dir/records.jsonl``: one JSON object per (seed, chain, step), the final evaluation of a step.
- ``results_dir/epochs.jsonl``: one JSON object per (seed, chain, step, epoch), the training curves.

Chains are named ``"alpha=<a:g>"`` (fixed mixing weight a), ``"alpha_hat"`` (alpha estimated at every step by
Algorithm 1) and ``"shared"``: the step-1 model of a seed, trained on the labels alone, which is the common
start of every chain of that seed. :func:`load_records` copies that shared record into step 1 of every chain,
so that each chain's curve starts at the common model.

Record schema (``records.jsonl``, one line per (config_hash, seed, chain, step), appended by the trainer through
:mod:`sdlib.store`; the readers here choose one config, and the last line of a key counts):

==================  =================================================================================
seed, chain, step   the key; step 1 appears once per seed, as chain ``"shared"``
alpha               the weight of the labels used at that step (alpha-hat for the alpha-hat chain, 1.0
                    for ``"shared"``)
alpha_hat           the estimate of Algorithm 1 used (alpha-hat chain, steps >= 2), else null
alpha_hat_          the least-squares alpha before clipping to the config's alpha_hat_bounds
unconstrained       (alpha-hat chain; null in files written before it existed)
probe_val_acc,      accuracies of the alpha = 0 probe behind alpha-hat (alpha-hat chain, steps >= 2),
probe_test_acc      else null
epochs              epochs trained
val_acc, test_acc   accuracies as fractions in [0, 1] on the validation split (null with n_val = 0)
                    and on the test set, after the last epoch
best_test_acc,      the best test accuracy over the evaluated epochs and its epoch (null in files
best_test_epoch     written before they existed)
val_loss, test_loss MSE between softmax outputs and one-hot labels (the alpha = 1 loss without L2)
train_loss          mean training loss of the last epoch
wall_time_s,        the step's wall-clock seconds and training images per second
images_per_s
profile,            the TrainConfig profile, the hash of what changes results, and the full
config_hash, config TrainConfig.to_dict()
provenance, data    git commit, versions, device, date; the data split's metadata
==================  =================================================================================

``epochs.jsonl`` holds one line per (seed, chain, step, epoch) with train_loss, val_acc, val_loss, test_acc,
test_loss, lr, wall_time_s, images_per_s (and config_hash); ``probe_epochs.jsonl`` the same for the probes
(chain ``"alpha_hat_probe"``).

>>> records = load_records("results/cifar10")          # doctest: +SKIP
>>> summarize(records)                                  # doctest: +SKIP
>>> plot_accuracy(records); plot_alpha_hat(records)     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from sdlib import store
from sdlib.records import (ALPHA_HAT_CHAIN, EPOCHS_FILE, PROBE_CHAIN, PROBE_EPOCHS_FILE, RECORDS_FILE, SHARED_CHAIN,
                           chain_name)

__all__ = [
    "RECORDS_FILE",
    "EPOCHS_FILE",
    "PROBE_EPOCHS_FILE",
    "SHARED_CHAIN",
    "PROBE_CHAIN",
    "ALPHA_HAT_CHAIN",
    "chain_name",
    "chain_alpha",
    "chain_label",
    "find_repo_root",
    "resolve_repo_path",
    "has_records",
    "no_results_message",
    "load_records",
    "load_epochs",
    "training_runs",
    "markdown_table",
    "book_figures",
    "book_png",
    "smallest_font_pt",
    "plot_last_step",
    "load_throughput",
    "summarize",
    "accuracy_table",
    "plot_accuracy",
    "plot_alpha_hat",
    "plot_epochs",
    "plot_summary",
]


_FIXED_CHAIN = re.compile(r"^alpha=(?P<alpha>[-+0-9.eE]+)$")
_HOW_TO_PRODUCE = (
    "run notebooks/05_cifar10_self_distillation.ipynb with train=True "
    "(e.g. `papermill notebooks/05_cifar10_self_distillation.ipynb out.ipynb -p train True`) "
    "or `python -m sdlib.train` to produce them"
)
# Record fields that must be present (and not null) on every line of records.jsonl.
_RECORD_REQUIRED = ("seed", "chain", "step", "alpha", "val_acc", "test_acc")
# Numeric record fields that may be null (missing in older files, or not applicable to the chain).
_RECORD_OPTIONAL_NUMERIC = (
    "alpha_hat",
    "alpha_hat_unconstrained",
    "best_test_acc",
    "best_test_epoch",
    "probe_val_acc",
    "probe_test_acc",
    "epochs",
    "val_loss",
    "test_loss",
    "train_loss",
    "wall_time_s",
    "images_per_s",
)
_RECORD_OPTIONAL_OTHER = ("profile", "config_hash", "config", "provenance", "data")
_EPOCH_REQUIRED = ("seed", "chain", "step", "epoch")
_EPOCH_OPTIONAL_NUMERIC = (
    "train_loss",
    "val_acc",
    "val_loss",
    "test_acc",
    "test_loss",
    "lr",
    "wall_time_s",
    "images_per_s",
)
_ACCURACY_FIELDS = ("val_acc", "test_acc", "probe_val_acc", "probe_test_acc", "best_test_acc")


# --------------------------------------------------------------------------------------------- chains


def chain_alpha(chain: str) -> float:
    """The fixed alpha of a chain name; NaN for ``"alpha_hat"``, 1.0 for ``"shared"`` (labels alone), 0.0 for
    ``"alpha_hat_probe"`` (the alpha = 0 probe of Algorithm 1, in probe_epochs.jsonl only).

    Raises ValueError for a name that is none of ``"alpha=<a>"``, ``"alpha_hat"``, ``"shared"``,
    ``"alpha_hat_probe"``.
    """
    if chain == ALPHA_HAT_CHAIN:
        return math.nan
    if chain == SHARED_CHAIN:
        return 1.0
    if chain == PROBE_CHAIN:
        return 0.0
    match = _FIXED_CHAIN.match(chain) if isinstance(chain, str) else None
    if match is None:
        raise ValueError(
            f"chain must be 'alpha=<a>' (e.g. 'alpha=0.1'), '{ALPHA_HAT_CHAIN}' or '{SHARED_CHAIN}', got {chain!r}"
        )
    try:
        alpha = float(match.group("alpha"))
    except ValueError:
        raise ValueError(f"chain {chain!r}: {match.group('alpha')!r} is not a number") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"chain {chain!r}: alpha must lie in [0, 1], got {alpha!r}")
    return alpha


def _chain_sort_key(chain: str) -> tuple:
    # Fixed alphas ascending, then alpha_hat, then shared (which load_records expands away).
    if chain == ALPHA_HAT_CHAIN:
        return (1, 0.0)
    if chain == SHARED_CHAIN:
        return (2, 0.0)
    if chain == PROBE_CHAIN:
        return (3, 0.0)
    return (0, chain_alpha(chain))


# ---------------------------------------------------------------------------------------------- paths


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: the first directory at or above ``start`` (default: the working directory)
    holding both ``pyproject.toml`` and ``sdlib/``; else the checkout this module was imported from;
    else ``start`` itself. Notebooks run with the working directory ``notebooks/``, hence the search upward.
    """
    start = Path.cwd() if start is None else Path(start)
    start = start.resolve()
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file() and (directory / "sdlib").is_dir():
            return directory
    package_parent = Path(__file__).resolve().parent.parent
    if (package_parent / "pyproject.toml").is_file():
        return package_parent
    return start


def resolve_repo_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``path`` itself if absolute, else ``path`` relative to the repository root (:func:`find_repo_root`)."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ValueError(f"path must be a non-empty path, got {path!r}")
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return (Path(root) if root is not None else find_repo_root()) / path


def _display_path(path: Path) -> str:
    # Relative to the repository root where possible: messages then read the same on every machine.
    try:
        return str(path.resolve().relative_to(find_repo_root()))
    except ValueError:
        return str(path)


# -------------------------------------------------------------------------------------------- loading


def has_records(results_dir: str | os.PathLike) -> bool:
    """Whether ``results_dir/records.jsonl`` exists and holds at least one non-blank line."""
    path = Path(results_dir) / RECORDS_FILE
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as handle:
        return any(line.strip() for line in handle)


def no_results_message(results_dir: str | os.PathLike) -> str:
    """The plain message shown where no results exist yet under ``results_dir``."""
    return f"No results committed yet under {_display_path(Path(results_dir))}: {_HOW_TO_PRODUCE}."


def _read_jsonl(results_dir: str | os.PathLike, filename: str, what: str, skip_bad_lines: bool = False
                ) -> tuple[Path, list[tuple[int, dict]]]:
    """``(line_number, object)`` of ``results_dir/filename`` (:func:`sdlib.store.read_jsonl`: an unreadable line
    raises naming the file and line unless ``skip_bad_lines``); clear errors for a missing folder or file."""
    if results_dir is None:
        raise ValueError(f"results_dir must be a directory holding {filename}, got None")
    directory = Path(results_dir)
    if not directory.exists():
        raise FileNotFoundError(
            f"results_dir {str(directory)!r} does not exist: expected a directory holding {filename} "
            f"({what}) as written by sdlib.train.run_chains; {_HOW_TO_PRODUCE}"
        )
    if not directory.is_dir():
        raise ValueError(f"results_dir must be a directory holding {filename}, got the file {str(directory)!r}")
    path = directory / filename
    if not path.is_file() and not path.is_dir():  # a folder: store.read_jsonl names it
        raise FileNotFoundError(
            f"no {filename} in results_dir {str(directory)!r}: expected {what} as written by "
            f"sdlib.train.run_chains; {_HOW_TO_PRODUCE}"
        )
    objects = store.read_jsonl(path, skip_bad_lines)
    if not objects:
        raise ValueError(f"{path} is empty: expected one JSON object per line ({what}); {_HOW_TO_PRODUCE}")
    return path, objects


def _check_int(value, field: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ValueError(f"{where}: field {field!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_number(value, field: str, where: str, allow_null: bool) -> float:
    if value is None:
        if allow_null:
            return math.nan
        raise ValueError(f"{where}: field {field!r} must be a number, got null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field {field!r} must be a number{' or null' if allow_null else ''}, got {value!r}")
    return float(value)


def _check_fraction(value: float, field: str, where: str) -> None:
    # Accuracies are fractions; a percentage here would silently scale every plot by 100.
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: field {field!r} must be a fraction in [0, 1], got {value!r}")


def _parse_record(obj: dict, where: str) -> dict:
    missing = [field for field in _RECORD_REQUIRED if field not in obj]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}; every record needs {list(_RECORD_REQUIRED)}")
    chain = obj["chain"]
    if not isinstance(chain, str):
        raise ValueError(f"{where}: field 'chain' must be a string, got {chain!r}")
    try:
        fixed_alpha = chain_alpha(chain)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if chain == PROBE_CHAIN:
        raise ValueError(f"{where}: chain {PROBE_CHAIN!r} has no records (its results are the probe_* fields "
                         f"of the {ALPHA_HAT_CHAIN!r} chain)")
    row = {
        "seed": _check_int(obj["seed"], "seed", where, 0),
        "chain": chain,
        "step": _check_int(obj["step"], "step", where, 1),
        "alpha": _check_number(obj["alpha"], "alpha", where, allow_null=False),
        # null with n_val=0 (no validation split: the authors' protocol trains on all 50,000 images)
        "val_acc": _check_number(obj["val_acc"], "val_acc", where, allow_null=True),
        "test_acc": _check_number(obj["test_acc"], "test_acc", where, allow_null=False),
    }
    for field in _RECORD_OPTIONAL_NUMERIC:
        row[field] = _check_number(obj.get(field), field, where, allow_null=True)
    for field in _RECORD_OPTIONAL_OTHER:
        row[field] = obj.get(field)
    for field in _ACCURACY_FIELDS:
        _check_fraction(row[field], field, where)
    if not math.isnan(row["epochs"]):
        row["epochs"] = _check_int(row["epochs"], "epochs", where, 1)
    if chain == SHARED_CHAIN and row["step"] != 1:
        raise ValueError(f"{where}: chain 'shared' is the step-1 model, got step {row['step']}")
    if chain != SHARED_CHAIN and row["step"] == 1:
        raise ValueError(
            f"{where}: step 1 is recorded once per seed under chain 'shared', got it under chain {chain!r}"
        )
    row["chain_alpha"] = fixed_alpha
    return row


def _config_chains(config) -> set[str]:
    """The chains a run was configured with (from a record's ``config``), empty when it does not say."""
    if not isinstance(config, dict) or "alphas" not in config:
        return set()
    chains = {chain_name(alpha) for alpha in config["alphas"]}
    if config.get("include_alpha_hat", False):
        chains.add(ALPHA_HAT_CHAIN)
    return chains


def _ordered(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    order = {chain: rank for rank, chain in enumerate(sorted(frame["chain"].unique(), key=_chain_sort_key))}
    frame = frame.assign(_chain_rank=frame["chain"].map(order))
    frame = frame.sort_values(["_chain_rank", *keys], kind="stable").drop(columns="_chain_rank")
    return frame.reset_index(drop=True)


def load_records(results_dir: str | os.PathLike, config_hash: str | None = None, profile: str | None = None,
                 skip_bad_lines: bool = False) -> pd.DataFrame:
    """The step records of one configuration in ``results_dir/records.jsonl`` as a DataFrame, one row per
    (seed, chain, step).

    Which configuration (:func:`sdlib.store.select_config`): ``config_hash`` if given, else the newest one of
    ``profile`` if given, else the newest (the one whose record was appended last); where the file holds
    several, a RuntimeWarning names them all and the one read. Records are keyed by (config_hash, seed, chain,
    step); where a key was recorded more than once (a step re-recorded after a crash), the last line counts.
    ``skip_bad_lines`` skips unreadable lines (with a warning) instead of raising.

    The shared step-1 record of each seed (chain ``"shared"``) becomes step 1 of every chain of that seed:
    the chains seen for that seed plus those named in the shared record's ``config`` (``alphas``,
    ``include_alpha_hat``). The copies keep ``alpha`` = 1.0 (the step-1 model saw the labels alone) and are
    flagged by ``from_shared`` = True.

    Columns: seed, chain, step, alpha, val_acc, test_acc, the optional numeric fields (alpha_hat,
    probe_val_acc, probe_test_acc, epochs, val_loss, test_loss, train_loss, wall_time_s, images_per_s; NaN
    where null or absent), profile, config_hash, config, provenance, data (as stored), plus
    ``chain_alpha`` (the chain's fixed alpha, NaN for ``"alpha_hat"``) and ``from_shared``.
    Rows are sorted by chain (fixed alphas ascending, then ``"alpha_hat"``), seed, step.

    Raises FileNotFoundError when the directory or its records.jsonl is missing; ValueError when the file
    is empty, a line is unreadable (:class:`sdlib.store.UnreadableLineError`: file and line) or malformed (a
    missing or ill-typed field, an accuracy outside [0, 1], step 1 under a chain other than ``"shared"``),
    or the asked config is not there (:class:`sdlib.store.UnknownConfigError`, listing those present).
    """
    path, objects = _read_jsonl(results_dir, RECORDS_FILE, "one JSON record per (seed, chain, step)",
                                skip_bad_lines)
    chosen = store.select_config(objects, path, config_hash, profile)
    rows = []
    for line_number, obj in store.last_per_key([(n, o) for n, o in objects if o.get("config_hash") == chosen],
                                               store.RECORD_KEY):
        row = _parse_record(obj, f"{path}, line {line_number}")
        row["from_shared"] = False
        rows.append(row)

    expanded = [row for row in rows if row["chain"] != SHARED_CHAIN]
    for shared in (row for row in rows if row["chain"] == SHARED_CHAIN):
        chains = {row["chain"] for row in expanded if row["seed"] == shared["seed"] and not row["from_shared"]}
        chains |= _config_chains(shared["config"])
        for chain in chains:
            expanded.append(
                {**shared, "chain": chain, "chain_alpha": chain_alpha(chain), "from_shared": True}
            )
    if not expanded:
        raise ValueError(f"{path}: no chain to expand the shared step-1 record(s) into; expected chain records "
                         "or a 'config' with 'alphas' on the shared record")
    frame = pd.DataFrame(expanded)
    frame["epochs"] = frame["epochs"].astype("Int64")  # a count: nullable integer, not float
    return _ordered(frame, ["seed", "step"])


def load_epochs(results_dir: str | os.PathLike, probes: bool = False, config_hash: str | None = None,
                profile: str | None = None, skip_bad_lines: bool = False) -> pd.DataFrame:
    """The per-epoch training curves of one configuration in ``results_dir/epochs.jsonl``, one row per
    (seed, chain, step, epoch).

    The configuration is the one :func:`load_records` reads (``config_hash``, else the newest of ``profile`` in
    records.jsonl, else the newest there; without records, the newest of this file, with a RuntimeWarning where
    it holds several): curves of different configurations are never mixed, and never shown beside another
    config's records (:class:`sdlib.store.UnknownConfigError` where that config has no epoch lines). Epoch lines
    without a profile (the old store's) take it from records.jsonl.

    Columns: seed, chain, step, epoch, then train_loss, val_acc, val_loss, test_acc, test_loss, lr,
    wall_time_s, images_per_s (NaN where null or absent) and config_hash (None where absent). The shared
    step-1 rows keep chain ``"shared"`` (see :func:`plot_epochs`). ``probes=True`` reads the alpha = 0 probes
    of the alpha-hat chain instead (``probe_epochs.jsonl``, chain ``"alpha_hat_probe"``). Where an epoch
    appears twice (a resumed step), the later line counts. Same errors as :func:`load_records`.
    """
    if not isinstance(probes, bool):
        raise ValueError(f"probes must be True or False, got {probes!r}")
    filename = PROBE_EPOCHS_FILE if probes else EPOCHS_FILE
    path, objects = _read_jsonl(results_dir, filename, "one JSON object per (seed, chain, step, epoch)",
                                skip_bad_lines)
    records_path = Path(results_dir) / RECORDS_FILE
    with warnings.catch_warnings():  # its bad lines are load_records' to report
        warnings.simplefilter("ignore", RuntimeWarning)
        record_rows = store.read_jsonl(records_path, skip_bad_lines=True) if records_path.is_file() else []
    profiles = {r.get("config_hash"): r.get("profile") for _, r in record_rows}
    as_records = False
    if config_hash is None and record_rows and any(o.get("config_hash") is not None for _, o in objects):
        # the config load_records reads by default (or of this profile), so that tables and curves agree; its
        # absence from this file is an error naming the configs present, never another config's curves
        with contextlib.suppress(store.UnknownConfigError):
            config_hash, profile = store.select_config(record_rows, records_path, None, profile, warn=False), None
            as_records = True
    chosen = store.select_config(objects, path, config_hash, profile, profiles=profiles)
    configs = store.configs_in(objects, profiles)
    if as_records and len(configs) > 1:
        present = "; ".join(c.describe() for c in reversed(configs))
        warnings.warn(f"{path} holds {len(configs)} configs (newest first: {present}); reading {chosen}, the one "
                      f"load_records reads: pass config_hash= or profile= to choose another", RuntimeWarning,
                      stacklevel=2)
    rows = []
    for line_number, obj in store.last_per_key([(n, o) for n, o in objects if o.get("config_hash") == chosen],
                                               store.EPOCH_KEY):
        where = f"{path}, line {line_number}"
        missing = [field for field in _EPOCH_REQUIRED if field not in obj]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {missing}; every line needs {list(_EPOCH_REQUIRED)}")
        chain = obj["chain"]
        try:
            chain_alpha(chain)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        row = {
            "seed": _check_int(obj["seed"], "seed", where, 0),
            "chain": chain,
            "step": _check_int(obj["step"], "step", where, 1),
            "epoch": _check_int(obj["epoch"], "epoch", where, 0),
        }
        for field in _EPOCH_OPTIONAL_NUMERIC:
            row[field] = _check_number(obj.get(field), field, where, allow_null=True)
        row["config_hash"] = obj.get("config_hash")
        for field in ("val_acc", "test_acc"):
            _check_fraction(row[field], field, where)
        rows.append(row)
    return _ordered(pd.DataFrame(rows), ["seed", "step", "epoch"])


def _images_per_epoch(config, data) -> float:
    """Training images of one epoch: the training split cut to whole batches (the last partial one is dropped)."""
    try:
        batch, n_train = int(config["batch_size"]), int(data["sizes"]["train"])
    except (TypeError, KeyError, ValueError):
        return math.nan
    return float(n_train // batch * batch)


def training_runs(results_dir: str | os.PathLike, max_gap_s: float = 60.0, config_hash: str | None = None,
                  profile: str | None = None) -> pd.DataFrame:
    """The wall-clock runs behind ``results_dir``: how long the models took together, and at what throughput.

    Each trained model occupies the interval ``[end - wall_time_s, end]``, ``end`` being its record's
    ``provenance.date`` (written when the step finished); an alpha-hat step's interval is extended back by the
    wall time of its alpha = 0 probe (``probe_epochs.jsonl``), which trained just before it in the same
    process. Intervals that overlap or lie within ``max_gap_s`` of each other (loading a teacher, writing a
    checkpoint) form one run: the models of one sweep sharing a GPU, or one sequential ``run_chains`` call.

    Returns one row per run, in time order: run (1, 2, ...), start, end (UTC timestamps), wall_clock_s,
    seeds (tuple), models (probes included), train_images (epochs x training images per epoch, probes included),
    images_per_s (train_images / wall_clock_s: the aggregate throughput, evaluation included in the time),
    model_seconds (the models' own wall times summed: more than wall_clock_s where models ran side by side),
    devices, config_hashes. Records without a date or a wall time are left out; with none left, ValueError.
    """
    if isinstance(max_gap_s, bool) or not isinstance(max_gap_s, (int, float)) or not max_gap_s >= 0:
        raise ValueError(f"max_gap_s must be a number of seconds >= 0, got {max_gap_s!r}")
    records = load_records(results_dir, config_hash=config_hash, profile=profile)
    # One row per trained model: the shared step-1 record was copied into every chain of its seed.
    models = records[~records["from_shared"] | ~records.duplicated(["seed", "step"])]
    probe_time, probe_epochs = {}, {}
    chosen = records["config_hash"].iloc[0]
    probe_hashes = {line.get("config_hash")
                    for _, line in store.read_jsonl(Path(results_dir) / PROBE_EPOCHS_FILE, skip_bad_lines=True)}
    if chosen in probe_hashes or probe_hashes == {None}:  # {None}: lines that name no config (one config only)
        probes = load_epochs(results_dir, probes=True, config_hash=chosen if chosen in probe_hashes else None)
        grouped = probes.groupby(["seed", "step"])
        probe_time = grouped["wall_time_s"].sum().to_dict()
        probe_epochs = grouped["epoch"].count().to_dict()
    intervals = []
    for row in models.itertuples(index=False):
        provenance = row.provenance if isinstance(row.provenance, dict) else {}
        if not provenance.get("date") or not math.isfinite(row.wall_time_s):
            continue
        end = pd.Timestamp(provenance["date"])
        end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
        seconds, n_models, epochs = row.wall_time_s, 1, float(row.epochs) if not pd.isna(row.epochs) else math.nan
        if row.chain == ALPHA_HAT_CHAIN and (row.seed, row.step) in probe_time:
            seconds += probe_time[(row.seed, row.step)]
            n_models += 1
            epochs += probe_epochs[(row.seed, row.step)]
        intervals.append({
            "start": end - pd.Timedelta(seconds=seconds), "end": end, "seed": row.seed, "models": n_models,
            "train_images": epochs * _images_per_epoch(row.config, row.data), "model_seconds": seconds,
            "device": provenance.get("device_name"), "config_hash": row.config_hash,
        })
    if not intervals:
        raise ValueError(f"no record under {results_dir} has both provenance.date and wall_time_s")
    intervals.sort(key=lambda item: item["start"])
    groups = [[intervals[0]]]
    group_end = intervals[0]["end"]
    for item in intervals[1:]:
        if (item["start"] - group_end).total_seconds() <= max_gap_s:
            groups[-1].append(item)
        else:
            groups.append([item])
            group_end = item["end"]
        group_end = max(group_end, item["end"])
    rows = []
    for number, group in enumerate(groups, start=1):
        start, end = min(i["start"] for i in group), max(i["end"] for i in group)
        wall = (end - start).total_seconds()
        images = sum(i["train_images"] for i in group)
        rows.append({
            "run": number, "start": start, "end": end, "wall_clock_s": wall,
            "seeds": tuple(sorted({i["seed"] for i in group})), "models": sum(i["models"] for i in group),
            "train_images": images, "images_per_s": images / wall if wall > 0 else math.nan,
            "model_seconds": sum(i["model_seconds"] for i in group),
            "devices": tuple(sorted({str(i["device"]) for i in group})),
            "config_hashes": tuple(sorted({str(i["config_hash"]) for i in group})),
        })
    return pd.DataFrame(rows)


def load_throughput(paths) -> pd.DataFrame:
    """The results of ``benchmarks/train_throughput.py`` (its JSON files) as one row per (file, variant).

    paths : a path or a sequence of paths of such files (at least one).
    Columns: file (name), date, device, git_commit, torch, variant, n_models, batch_per_model, precision,
    images_per_s (aggregate over the variant's models), per_model_images_per_s, ratio_to_reference,
    grid_profile, grid_models, grid_epochs, grid_train_images, grid_train_hours, grid_eval_hours,
    grid_total_hours (the paper's grid at that variant's rates, as the benchmark computed it). ValueError names a file that is not such a
    result; FileNotFoundError a missing one.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths must name at least one train_throughput JSON file (benchmarks/results/), got none")
    rows = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no benchmark results at {str(path)!r}: run benchmarks/train_throughput.py "
                                    "--out <file> on the GPU to measure them")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg})") from None
        if not isinstance(result, dict) or result.get("benchmark") != "train_throughput" \
                or not isinstance(result.get("variants"), dict):
            raise ValueError(f"{path}: not a result of benchmarks/train_throughput.py (expected 'benchmark': "
                             "'train_throughput' and a 'variants' object)")
        provenance = result.get("provenance") or {}
        for variant, r in result["variants"].items():
            grid = r.get("grid") or {}
            rows.append({
                "file": path.name, "date": result.get("date"), "device": provenance.get("device_name"),
                "git_commit": provenance.get("git_commit"), "torch": provenance.get("torch"),
                "variant": variant, "n_models": r["n_models"], "batch_per_model": r["batch_per_model"],
                "precision": r["precision"], "images_per_s": r["images_per_s"],
                "per_model_images_per_s": r["per_model_images_per_s"],
                "ratio_to_reference": r.get("ratio_to_reference"), "grid_profile": grid.get("profile"),
                "grid_models": grid.get("models"), "grid_epochs": grid.get("epochs"),
                "grid_train_images": grid.get("train_images"),
                "grid_train_hours": grid.get("train_hours"), "grid_eval_hours": grid.get("eval_hours"),
                "grid_total_hours": grid.get("total_hours"),
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- aggregation


def _check_records(records: pd.DataFrame, name: str = "records") -> None:
    if not isinstance(records, pd.DataFrame):
        raise ValueError(f"{name} must be the DataFrame returned by load_records, got {type(records).__name__}")
    missing = [column for column in ("seed", "chain", "step", "test_acc", "val_acc", "alpha_hat") if column not in records]
    if missing:
        raise ValueError(f"{name} must be the DataFrame returned by load_records; missing column(s) {missing}")
    if records.empty:
        raise ValueError(f"{name} is empty: nothing to summarize")


def summarize(records: pd.DataFrame, ddof: int = 1) -> pd.DataFrame:
    """Statistics over seeds per (chain, step).

    Parameters
    ----------
    records : DataFrame from :func:`load_records`.
    ddof : delta degrees of freedom of the standard deviations (1: the sample standard deviation over
        seeds, NaN for a single seed; 0: the population one).

    Returns
    -------
    DataFrame with one row per (chain, step), sorted like :func:`load_records`, and columns
    chain, chain_alpha, step, n_seeds, test_acc_mean, test_acc_std, test_acc_min, test_acc_max,
    val_acc_mean, val_acc_std, val_acc_min, val_acc_max, alpha_hat_mean, alpha_hat_std
    (the alpha-hat columns are NaN except for the ``"alpha_hat"`` chain at steps >= 2).
    """
    _check_records(records)
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    groups = records.groupby(["chain", "step"], sort=False)
    summary = groups.agg(
        chain_alpha=("chain_alpha", "first"),
        n_seeds=("seed", "nunique"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", lambda values: values.std(ddof=ddof)),
        test_acc_min=("test_acc", "min"),
        test_acc_max=("test_acc", "max"),
        val_acc_mean=("val_acc", "mean"),
        val_acc_std=("val_acc", lambda values: values.std(ddof=ddof)),
        val_acc_min=("val_acc", "min"),
        val_acc_max=("val_acc", "max"),
        alpha_hat_mean=("alpha_hat", "mean"),
        alpha_hat_std=("alpha_hat", lambda values: values.dropna().std(ddof=ddof)),
    ).reset_index()
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    return _ordered(summary, ["step"])


def chain_label(chain: str) -> str:
    """How a reader reads a chain's name: ``"alpha=0.25"`` -> ``"α = 0.25"``, the alpha-hat chain ->
    ``"α̂ (Algorithm 1)"``, the shared step-1 model -> ``"step 1 (shared)"``."""
    if chain == ALPHA_HAT_CHAIN:
        return "α̂ (Algorithm 1)"
    if chain == SHARED_CHAIN:
        return "step 1 (shared)"
    return f"α = {chain_alpha(chain):g}"


def accuracy_table(records: pd.DataFrame, metric: str = "test_acc", decimals: int = 2,
                   readable: bool = False) -> pd.DataFrame:
    """A chain x step table of ``"mean ± std"`` accuracies in percent over seeds (the paper's layout).

    ``metric`` is ``"test_acc"`` or ``"val_acc"``; the std is the sample one (``"mean"`` alone for one seed).
    Rows are chains (fixed alphas ascending, then alpha-hat), columns steps. ``readable``: rows named as a
    reader reads them (:func:`chain_label`: ``α = 0.25``, ``α̂ (Algorithm 1)``) instead of the chains' ids.
    """
    if metric not in ("test_acc", "val_acc"):
        raise ValueError(f"metric must be 'test_acc' or 'val_acc', got {metric!r}")
    summary = summarize(records)

    def cell(row) -> str:
        mean, std = 100 * row[f"{metric}_mean"], 100 * row[f"{metric}_std"]
        return f"{mean:.{decimals}f}" if math.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"

    table = summary.assign(cell=summary.apply(cell, axis=1)).pivot(index="chain", columns="step", values="cell")
    table = table.loc[sorted(table.index, key=_chain_sort_key)].fillna("")
    table.columns = [f"step {step}" for step in table.columns]
    if readable:
        table.index = [chain_label(chain) for chain in table.index]
    table.index.name = "chain"
    return table


# --------------------------------------------------------------------------------------------- tables

def markdown_table(frame: pd.DataFrame, caption: str, name: str | None = None, index: bool = True,
                   formats: dict | str | None = None):
    """A DataFrame as the book shows a table: a MyST ``table`` directive holding a pipe table, so that Sphinx
    numbers it (Table 5.1) and gives it its caption; ``name`` makes it citable with {numref}. Shown by a notebook
    cell whose Markdown output is read as MyST (cell metadata ``mystnb: {markdown_format: myst}``). The index,
    when kept, is the first column, headed by its name (no extra header row); ``formats`` is one format string
    for every number, or one per column."""
    from IPython.display import Markdown

    def text(value, fmt=None) -> str:
        if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
            value = ""
        elif fmt is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = fmt.format(value)
        return str(value).replace("|", "\\|").replace("\n", " ")

    def column_format(column):
        return formats.get(column) if isinstance(formats, dict) else formats

    header = ([text(frame.index.name or "")] if index else []) + [text(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    align = (["---"] if index else []) + ["--:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for key, row in frame.iterrows():
        cells = ([text(key)] if index else []) + [text(row[c], column_format(c)) for c in frame.columns]
        lines.append("| " + " | ".join(cells) + " |")
    label = f":name: {name}\n" if name else ""
    return Markdown(f"::::{{table}} {text(caption)}\n{label}:align: left\n\n" + "\n".join(lines) + "\n::::\n")


# -------------------------------------------------------------------------------------------- figures

ALPHA_HAT_COLOR = "tab:red"


# Figures are drawn at 5.6 in and 100 px per inch with labels of at least 12 pt (book_figures), so that on a
# phone's 342 px column their text is still about 10 px (12 pt x 100/72 x 342/560).
FIGURE_WIDTH_IN = 5.6
FIGURE_DPI = 100
FIGURE_FONT_PT = 12
# PNG text chunks written by book_figures: the smallest font drawn and the resolution of the image.
PNG_MIN_FONT_KEY = "sdlib:min-font-pt"
PNG_DPI_KEY = "sdlib:dpi"


def smallest_font_pt(fig) -> float:
    """The smallest font size (pt) of any non-empty visible text drawn inside the figure (after a draw)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.figure is not None
             and t.get_window_extent(renderer).overlaps(box)]
    return min(sizes) if sizes else float("inf")


def book_png(fig):
    """A figure as the book shows it: a PNG at twice its resolution (sharp when enlarged), with only its display
    width as metadata, so that the page scales it with its column and keeps its aspect ratio (IPython's retina
    format also fixes the height, which squashes a figure on a narrow screen). The PNG records the smallest font
    drawn and its resolution (text chunks PNG_MIN_FONT_KEY, PNG_DPI_KEY) for tests/test_browser.py."""
    from io import BytesIO

    if not fig.axes and not fig.lines:
        return None
    dpi = 2 * fig.dpi
    metadata = {PNG_MIN_FONT_KEY: f"{smallest_font_pt(fig):g}", PNG_DPI_KEY: f"{dpi:g}"}
    buffer = BytesIO()
    fig.canvas.print_figure(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor(),
                            edgecolor=fig.get_edgecolor(), metadata=metadata)
    data = buffer.getvalue()
    width = int.from_bytes(data[16:20], "big")  # the IHDR chunk: width, then height, big-endian
    return data, {"width": width // 2}


def book_figures(**rc) -> None:
    """The book's figure style, for a notebook's setup cell: figures FIGURE_WIDTH_IN wide at FIGURE_DPI with
    labels of FIGURE_FONT_PT, shown through :func:`book_png`. ``rc`` adds or overrides matplotlib rcParams."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    # matplotlib loads its backend with the first figure, and the inline backend then sets the figure formats:
    # let that happen first, so that it does not replace book_png afterwards
    plt.close(plt.figure())

    plt.rcParams.update({
        "figure.dpi": FIGURE_DPI, "figure.figsize": (FIGURE_WIDTH_IN, 3.4), "font.size": FIGURE_FONT_PT,
        "axes.titlesize": FIGURE_FONT_PT, "axes.labelsize": FIGURE_FONT_PT, "xtick.labelsize": FIGURE_FONT_PT,
        "ytick.labelsize": FIGURE_FONT_PT, "legend.fontsize": FIGURE_FONT_PT, "legend.title_fontsize": FIGURE_FONT_PT,
        # plain tick labels: no offset ("+1e3"), and 0.5 or 1.35 on a log axis rather than 5 x 10^-1
        "axes.formatter.useoffset": False, "axes.formatter.min_exponent": 3, **rc,
    })
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, book_png)
_METRIC_LABELS = {"test_acc": "test accuracy", "val_acc": "validation accuracy", "train_loss": "training loss",
                  "val_loss": "validation loss", "test_loss": "test loss", "lr": "learning rate",
                  "wall_time_s": "wall-clock time per epoch (s)", "images_per_s": "training images per second"}


def _axes(ax, figsize=(FIGURE_WIDTH_IN, 4.0)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax.figure, ax


def _step_axis(ax, steps) -> None:
    # One tick per step, and room around a lone step (matplotlib would otherwise tick 1.9, 1.95, ...).
    steps = sorted({int(step) for step in steps})
    ax.set_xticks(steps)
    ax.set_xlim(steps[0] - 0.3, steps[-1] + 0.3)


def _spread(rows: pd.DataFrame, metric: str, spread: str | None):
    if spread == "std":
        std = rows[f"{metric}_std"].fillna(0.0).to_numpy()
        return rows[f"{metric}_mean"].to_numpy() - std, rows[f"{metric}_mean"].to_numpy() + std
    if spread == "minmax":
        return rows[f"{metric}_min"].to_numpy(), rows[f"{metric}_max"].to_numpy()
    return None


def _chain_colors(chains, cmap: str = "viridis") -> dict:
    """One distinct colour per fixed-alpha chain (ascending alpha, evenly spaced on the colormap), and the
    alpha-hat chain's red."""
    import matplotlib as mpl

    fixed = sorted((c for c in chains if c != ALPHA_HAT_CHAIN), key=chain_alpha)
    colormap = mpl.colormaps[cmap]
    colors = {chain: colormap(0.9 * i / max(1, len(fixed) - 1)) for i, chain in enumerate(fixed)}
    colors[ALPHA_HAT_CHAIN] = ALPHA_HAT_COLOR
    return colors


def plot_accuracy(records: pd.DataFrame, ax=None, metric: str = "test_acc", spread: str | None = "std",
                  cmap: str = "viridis"):
    """Accuracy against step: one line per fixed alpha, each its own colour from a sequential colormap and named
    in the legend, and the alpha-hat chain highlighted in red with a band for the spread over seeds (the fixed
    chains' spread is in :func:`plot_last_step`: their bands would pile up).

    Parameters
    ----------
    records : DataFrame from :func:`load_records`.
    ax : matplotlib Axes to draw into (a new figure when None).
    metric : ``"test_acc"`` or ``"val_acc"``.
    spread : ``"std"`` (mean ± sample std over seeds), ``"minmax"`` (min to max over seeds) or None.
    cmap : name of the sequential colormap the fixed alphas' colours are taken from, in ascending order.

    Returns the Figure. The Axes holds exactly one Line2D per chain (fixed alphas ascending, then alpha-hat).
    """
    from matplotlib.ticker import PercentFormatter

    if metric not in ("test_acc", "val_acc"):
        raise ValueError(f"metric must be 'test_acc' or 'val_acc', got {metric!r}")
    if spread not in ("std", "minmax", None):
        raise ValueError(f"spread must be 'std', 'minmax' or None, got {spread!r}")
    summary = summarize(records)
    fig, ax = _axes(ax)
    colors = _chain_colors(summary["chain"].unique(), cmap)

    fixed = [chain for chain in summary["chain"].unique() if chain != ALPHA_HAT_CHAIN]
    for chain in fixed:
        rows = summary[summary["chain"] == chain]
        ax.plot(rows["step"], rows[f"{metric}_mean"], color=colors[chain], marker="o", markersize=4,
                linewidth=1.4, label=chain_label(chain))

    rows = summary[summary["chain"] == ALPHA_HAT_CHAIN]
    if not rows.empty:
        ax.plot(rows["step"], rows[f"{metric}_mean"], color=ALPHA_HAT_COLOR, marker="D", markersize=6,
                linewidth=2.6, zorder=5, label=r"$\hat\alpha$ (Algorithm 1)")
        band = _spread(rows, metric, spread)
        if band is not None:
            ax.fill_between(rows["step"], *band, color=ALPHA_HAT_COLOR, alpha=0.15, linewidth=0, zorder=4)
    n_seeds = int(records["seed"].nunique())
    spread_text = {"std": "± 1 std", "minmax": "min to max"}.get(spread)
    band_text = (f"; red band: {spread_text} over seeds" if spread_text and n_seeds > 1 and not rows.empty else "")
    # above the axes, where no line can run under it
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, columnspacing=1.0,
              title=f"Mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}{band_text}")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("test accuracy" if metric == "test_acc" else "validation accuracy")
    _step_axis(ax, summary["step"])
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.grid(alpha=0.3)
    return fig


def plot_last_step(records: pd.DataFrame, ax=None, metric: str = "test_acc", cmap: str = "viridis"):
    """The last step's accuracy against alpha: mean ± one sample standard deviation over seeds for every fixed
    alpha (error bars, coloured as in :func:`plot_accuracy`), the alpha-hat chain at its mean alpha-hat (red), and
    step 1 (dashed) for reference. Returns the Figure; the Axes holds one error-bar container per chain."""
    from matplotlib.ticker import PercentFormatter

    if metric not in ("test_acc", "val_acc"):
        raise ValueError(f"metric must be 'test_acc' or 'val_acc', got {metric!r}")
    summary = summarize(records)
    last = int(summary["step"].max())
    rows = summary[summary["step"] == last]
    fig, ax = _axes(ax, figsize=(FIGURE_WIDTH_IN, 3.4))
    colors = _chain_colors(summary["chain"].unique(), cmap)
    step1 = summary[summary["step"] == 1][f"{metric}_mean"].mean()
    ax.axhline(step1, color="0.5", ls="--", lw=1.2, label="step 1")
    for _, row in rows.iterrows():
        std = 0.0 if pd.isna(row[f"{metric}_std"]) else row[f"{metric}_std"]
        if row["chain"] == ALPHA_HAT_CHAIN:
            hats = records[(records["chain"] == ALPHA_HAT_CHAIN) & (records["step"] == last)]["alpha_hat"]
            if hats.notna().any():
                ax.errorbar(hats.mean(), row[f"{metric}_mean"], yerr=std, color=ALPHA_HAT_COLOR, marker="D",
                            markersize=7, capsize=4, linewidth=1.6, label=r"$\hat\alpha$ chain, at its mean $\hat\alpha$")
        else:
            ax.errorbar(chain_alpha(row["chain"]), row[f"{metric}_mean"], yerr=std, color=colors[row["chain"]],
                        marker="o", markersize=6, capsize=4, linewidth=1.6)
    ax.set_xlabel(r"weight of the labels $\alpha$")
    ax.set_ylabel("test accuracy" if metric == "test_acc" else "validation accuracy")
    ax.set_title(f"Step {last}, mean ± 1 std over seeds")
    ax.set_xlim(-0.05, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_alpha_hat(records: pd.DataFrame, ax=None):
    """The estimated alpha-hat per step (steps >= 2): one point per seed and the mean over seeds as a line.

    Returns the Figure; the Axes holds one Line2D (the mean) and one scatter collection (the seeds).
    Raises ValueError when the records hold no alpha-hat chain.
    """
    _check_records(records)
    rows = records[(records["chain"] == ALPHA_HAT_CHAIN) & records["alpha_hat"].notna()]
    if rows.empty:
        raise ValueError("records hold no alpha_hat chain with alpha_hat values (steps >= 2): "
                         "train with include_alpha_hat=True and at least 2 steps")
    fig, ax = _axes(ax, figsize=(FIGURE_WIDTH_IN, 3.6))
    seeds = sorted(rows["seed"].unique())
    # A small horizontal offset per seed keeps coinciding estimates visible.
    offsets = {seed: 0.06 * (index - (len(seeds) - 1) / 2) for index, seed in enumerate(seeds)}
    ax.scatter(rows["step"] + rows["seed"].map(offsets), rows["alpha_hat"], s=22, color="0.45", alpha=0.8,
               label="per seed", zorder=3)
    means = rows.groupby("step")["alpha_hat"].mean()
    ax.plot(means.index, means.to_numpy(), color=ALPHA_HAT_COLOR, marker="D", linewidth=2.2,
            label=f"mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}", zorder=4)
    ax.set_xlabel("distillation step")
    ax.set_ylabel(r"estimated weight $\hat\alpha$")
    ax.set_ylim(-0.03, 1.03)
    _step_axis(ax, rows["step"])
    ax.set_title(r"$\hat\alpha$ per step (Algorithm 1 on the validation split)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_epochs(epochs: pd.DataFrame, chain: str, ax=None, metric: str = "test_acc"):
    """The per-epoch ``metric`` of one chain across all its steps, mean over seeds, epochs laid end to end.

    The chain's step 1 is the shared step-1 model (chain ``"shared"`` in ``epochs``). One Line2D per step.
    ``metric``: any numeric column of :func:`load_epochs` (test_acc, val_acc, train_loss, ...).
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if not isinstance(epochs, pd.DataFrame) or not {"chain", "step", "epoch"} <= set(epochs.columns):
        raise ValueError("epochs must be the DataFrame returned by load_epochs")
    if metric not in _EPOCH_OPTIONAL_NUMERIC or metric not in epochs.columns:
        raise ValueError(f"metric must be one of {list(_EPOCH_OPTIONAL_NUMERIC)}, got {metric!r}")
    rows = epochs[(epochs["chain"] == chain) | ((epochs["chain"] == SHARED_CHAIN) & (epochs["step"] == 1))]
    if not (epochs["chain"] == chain).any():
        raise ValueError(f"chain {chain!r} not in epochs; chains present: {sorted(epochs['chain'].unique())}")
    fig, ax = _axes(ax, figsize=(FIGURE_WIDTH_IN, 3.6))
    means = rows.groupby(["step", "epoch"])[metric].mean().reset_index()
    offset = 0
    for step, curve in means.groupby("step"):
        x = offset + curve["epoch"].to_numpy() - curve["epoch"].min() + 1
        ax.plot(x, curve[metric].to_numpy(), marker=".", label=f"step {step}")
        offset = x.max()
    ax.set_xlabel("epoch (the steps laid end to end)")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    if metric.endswith("_acc"):
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{_METRIC_LABELS.get(metric, metric).capitalize()} per epoch, chain {chain_label(chain)}, "
                 "mean over seeds")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_summary(records: pd.DataFrame, metric: str = "test_acc", spread: str | None = "std"):
    """The summary figure, stacked at the width of the book's column: accuracy against step
    (:func:`plot_accuracy`), the last step's accuracy against alpha (:func:`plot_last_step`) and, where the
    records hold an alpha-hat chain, alpha-hat per step (:func:`plot_alpha_hat`). Returns the Figure."""
    import matplotlib.pyplot as plt

    _check_records(records)
    with_alpha_hat = bool(((records["chain"] == ALPHA_HAT_CHAIN) & records["alpha_hat"].notna()).any())
    rows = 3 if with_alpha_hat else 2
    fig, axes = plt.subplots(rows, 1, figsize=(FIGURE_WIDTH_IN, 3.4 * rows + 1.4), layout="constrained",
                             gridspec_kw={"height_ratios": [1.5] + [1.0] * (rows - 1)})
    plot_accuracy(records, ax=axes[0], metric=metric, spread=spread)
    plot_last_step(records, ax=axes[1], metric=metric)
    if with_alpha_hat:
        plot_alpha_hat(records, ax=axes[2])
    return fig
