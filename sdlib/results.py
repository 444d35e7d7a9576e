"""Read and aggregate the results of the CIFAR-10 chains, and the book's tables and figure style. Torch-free.

A results folder (written through :mod:`sdlib.store`) holds ``records.jsonl``: one line per (config_hash, seed,
chain, step) with the step's final evaluation (accuracies as fractions; val_acc null with n_val = 0; alpha_hat,
alpha_hat_unconstrained and the alpha = 0 probe's probe_{val,test}_acc on the alpha-hat chain) and its profile,
config, provenance and data; ``epochs.jsonl`` and ``probe_epochs.jsonl``: one line per epoch. The chain
``"shared"`` (a seed's step-1 model, on the labels alone) is copied by :func:`load_records` into every chain.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from pathlib import Path

import pandas as pd

from sdlib import store
from sdlib.checks import boolean, check
from sdlib.records import (ALPHA_HAT_CHAIN, EPOCHS_FILE, PROBE_CHAIN, PROBE_EPOCHS_FILE, RECORDS_FILE, SHARED_CHAIN,
                           chain_name)

_HOW_TO_PRODUCE = ("run notebooks/05_cifar10_self_distillation.ipynb with train=True (e.g. `papermill "
                   "notebooks/05_cifar10_self_distillation.ipynb out.ipynb -p train True`) or `python -m sdlib.train` "
                   "to produce them")
# The numbers of a record and of an epoch line, NaN where null or absent; others are kept as they are.
_RECORD_NUMBERS = ("alpha", "val_acc", "test_acc", "alpha_hat", "alpha_hat_unconstrained", "best_test_acc",
                   "best_test_epoch", "probe_val_acc", "probe_test_acc", "epochs", "val_loss", "test_loss",
                   "train_loss", "wall_time_s", "images_per_s")
_RECORD_OTHER = ("profile", "config_hash", "config", "provenance", "data")
_EPOCH_NUMBERS = ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "lr", "wall_time_s", "images_per_s")
_COUNTS = {"seed": 0, "step": 1, "epoch": 0, "epochs": 1}  # integers, at least this


def chain_alpha(chain: str) -> float:
    """The fixed alpha of a chain name: NaN for ``"alpha_hat"``, 1.0 for ``"shared"`` (labels alone), 0.0 for
    ``"alpha_hat_probe"``; ValueError for any other name that is not ``"alpha=<a>"``, a in [0, 1]."""
    special = {ALPHA_HAT_CHAIN: math.nan, SHARED_CHAIN: 1.0, PROBE_CHAIN: 0.0}
    if isinstance(chain, str) and chain in special:
        return special[chain]
    alpha = None
    if isinstance(chain, str) and chain.startswith("alpha="):
        with contextlib.suppress(ValueError):
            alpha = float(chain.removeprefix("alpha="))
    if alpha is None or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"chain must be 'alpha=<a>' with a in [0, 1] (e.g. 'alpha=0.1'), '{ALPHA_HAT_CHAIN}' or "
                         f"'{SHARED_CHAIN}', got {chain!r}")
    return alpha


def _chain_sort_key(chain: str) -> tuple:
    # Fixed alphas ascending, then alpha_hat, shared (which load_records expands away) and the probe.
    return ({ALPHA_HAT_CHAIN: 1, SHARED_CHAIN: 2, PROBE_CHAIN: 3}.get(chain, 0), chain_alpha(chain) if chain not in
            (ALPHA_HAT_CHAIN, SHARED_CHAIN, PROBE_CHAIN) else 0.0)


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The first directory at or above ``start`` (default: the working directory; notebooks run in
    ``notebooks/``) holding ``pyproject.toml`` and ``sdlib/``; else the checkout of this module; else ``start``."""
    start = (Path.cwd() if start is None else Path(start)).resolve()
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file() and (directory / "sdlib").is_dir():
            return directory
    package_parent = Path(__file__).resolve().parent.parent
    return package_parent if (package_parent / "pyproject.toml").is_file() else start


def resolve_repo_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``path`` itself if absolute, else ``path`` relative to the repository root (:func:`find_repo_root`)."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ValueError(f"path must be a non-empty path, got {path!r}")
    path = Path(path).expanduser()
    return path if path.is_absolute() else (Path(root) if root is not None else find_repo_root()) / path


def _display_path(path: Path) -> str:
    # Relative to the repository root where possible: messages then read the same on every machine.
    try:
        return str(path.resolve().relative_to(find_repo_root()))
    except ValueError:
        return str(path)


def has_records(results_dir: str | os.PathLike) -> bool:
    """Whether ``results_dir/records.jsonl`` holds at least one non-blank line."""
    path = Path(results_dir) / RECORDS_FILE
    return path.is_file() and bool(path.read_text(encoding="utf-8").strip())


def no_results_message(results_dir: str | os.PathLike) -> str:
    """The plain message shown where no results exist yet under ``results_dir``."""
    return f"No results committed yet under {_display_path(Path(results_dir))}: {_HOW_TO_PRODUCE}."


def _read_jsonl(results_dir, filename: str, what: str, skip_bad_lines: bool) -> tuple[Path, list[tuple[int, dict]]]:
    """``(line_number, object)`` of ``results_dir/filename`` through :func:`sdlib.store.read_jsonl`, with errors that
    say what is missing and how to produce it."""
    if results_dir is None:
        raise ValueError(f"results_dir must be a directory holding {filename}, got None")
    directory, produced = Path(results_dir), f"as written by sdlib.train.run_chains; {_HOW_TO_PRODUCE}"
    if not directory.exists():
        raise FileNotFoundError(f"results_dir {str(directory)!r} does not exist: expected a directory holding "
                                f"{filename} ({what}) {produced}")
    if not directory.is_dir():
        raise ValueError(f"results_dir must be a directory holding {filename}, got the file {str(directory)!r}")
    path = directory / filename
    if not path.exists():  # a folder: store.read_jsonl names it
        raise FileNotFoundError(f"no {filename} in results_dir {str(directory)!r}: expected {what} {produced}")
    objects = store.read_jsonl(path, skip_bad_lines)
    if not objects:
        raise ValueError(f"{path} is empty: expected one JSON object per line ({what}); {_HOW_TO_PRODUCE}")
    return path, objects


def _checked(obj: dict, where: str, required: tuple, numbers: tuple) -> dict:
    """One line's ``required`` fields (present, not null) and ``numbers`` (NaN where null), checked: the chain's
    name, counts (:data:`_COUNTS`) integers, accuracies fractions (a percentage would scale every plot by 100).
    ValueError naming the line and the field."""
    missing = [field for field in required if obj.get(field) is None]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}; every line needs {list(required)}")
    try:
        chain_alpha(obj["chain"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    row = {}
    for field in [f for f in required if f not in numbers] + list(numbers):  # the key first
        value, low = obj.get(field), _COUNTS.get(field)
        if field == "chain" or value is None:
            row[field] = obj["chain"] if field == "chain" else math.nan
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or low is not None and not (
                value == int(value) and value >= low):
            raise ValueError(f"{where}: field {field!r} must be {'a number' if low is None else f'an integer >= {low}'}"
                             f", got {value!r}")
        if field.endswith("_acc") and not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}: field {field!r} must be a fraction in [0, 1], got {value!r}")
        row[field] = float(value) if low is None else int(value)
    return row


def _record(obj: dict, where: str) -> dict:
    row = _checked(obj, where, ("seed", "chain", "step", "alpha", "test_acc"), _RECORD_NUMBERS)
    if row["chain"] == PROBE_CHAIN:
        raise ValueError(f"{where}: chain {PROBE_CHAIN!r} has no records (its results are the probe_* fields "
                         f"of the {ALPHA_HAT_CHAIN!r} chain)")
    if (row["chain"] == SHARED_CHAIN) != (row["step"] == 1):
        raise ValueError(f"{where}: step 1 is recorded once per seed under chain 'shared' (the step-1 model), got "
                         f"step {row['step']} under chain {row['chain']!r}")
    return {**row, **{field: obj.get(field) for field in _RECORD_OTHER}, "chain_alpha": chain_alpha(row["chain"]),
            "from_shared": False}


def _config_chains(config) -> set[str]:
    """The chains a run was configured with (from a record's ``config``), empty when it does not say."""
    if not isinstance(config, dict) or "alphas" not in config:
        return set()
    return {chain_name(alpha) for alpha in config["alphas"]} | ({ALPHA_HAT_CHAIN} if config.get("include_alpha_hat")
                                                               else set())


def _ordered(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    by_chain = lambda column: column.map(_chain_sort_key) if column.name == "chain" else column  # noqa: E731
    return frame.sort_values(["chain", *keys], key=by_chain, kind="stable").reset_index(drop=True)


def load_records(results_dir: str | os.PathLike, config_hash: str | None = None, profile: str | None = None,
                 skip_bad_lines: bool = False) -> pd.DataFrame:
    """The step records of one configuration in ``results_dir/records.jsonl``, one row per (seed, chain, step).

    The configuration: ``config_hash``, else the newest of ``profile``, else the newest (a RuntimeWarning names all
    where there are several: :func:`sdlib.store.select_config`); the last line of a key counts; ``skip_bad_lines``
    skips unreadable lines with a warning. A seed's shared step-1 record becomes step 1 of each of its chains (seen
    or named by its ``config``), flagged ``from_shared``. Columns: the record fields (NaN where null) plus
    ``chain_alpha`` and ``from_shared``; rows sorted by chain (fixed alphas ascending, then alpha-hat), seed, step.
    FileNotFoundError for a missing folder or file; ValueError (:class:`sdlib.store.StoreError` among them) for an
    empty file, an unreadable or malformed line, or a config that is not there.
    """
    path, objects = _read_jsonl(results_dir, RECORDS_FILE, "one JSON record per (seed, chain, step)",
                                skip_bad_lines)
    chosen = store.select_config(objects, path, config_hash, profile)
    rows = [_record(obj, f"{path}, line {n}") for n, obj in
            store.last_per_key([(n, o) for n, o in objects if o.get("config_hash") == chosen], store.RECORD_KEY)]
    expanded = [row for row in rows if row["chain"] != SHARED_CHAIN]
    for shared in (row for row in rows if row["chain"] == SHARED_CHAIN):
        chains = {row["chain"] for row in expanded if row["seed"] == shared["seed"] and not row["from_shared"]}
        expanded += [{**shared, "chain": chain, "chain_alpha": chain_alpha(chain), "from_shared": True}
                     for chain in chains | _config_chains(shared["config"])]
    if not expanded:
        raise ValueError(f"{path}: no chain to expand the shared step-1 record(s) into; expected chain records "
                         "or a 'config' with 'alphas' on the shared record")
    frame = pd.DataFrame(expanded)
    frame["epochs"] = frame["epochs"].astype("Int64")  # a count: nullable integer, not float
    return _ordered(frame, ["seed", "step"])


def load_epochs(results_dir: str | os.PathLike, probes: bool = False, config_hash: str | None = None,
                profile: str | None = None, skip_bad_lines: bool = False) -> pd.DataFrame:
    """The per-epoch curves in ``results_dir/epochs.jsonl`` (``probes=True``: ``probe_epochs.jsonl``, the alpha = 0
    probes), one row per (seed, chain, step, epoch): the key, the epoch fields (NaN where null) and config_hash; the
    shared step-1 rows keep chain ``"shared"``. The configuration is the one :func:`load_records` reads, so that
    curves and tables agree (UnknownConfigError where it has no epoch lines); without records, the newest here.
    Same errors as :func:`load_records`.
    """
    check("probes", probes, boolean())
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
        warnings.warn(f"{path} holds {len(configs)} configs (newest first: {store.describe(configs)}); reading "
                      f"{chosen}, the one load_records reads: pass config_hash= or profile= to choose another",
                      RuntimeWarning, stacklevel=2)
    rows = [{**_checked(obj, f"{path}, line {n}", ("seed", "chain", "step", "epoch"), _EPOCH_NUMBERS),
             "config_hash": obj.get("config_hash")} for n, obj in
            store.last_per_key([(n, o) for n, o in objects if o.get("config_hash") == chosen], store.EPOCH_KEY)]
    return _ordered(pd.DataFrame(rows), ["seed", "step", "epoch"])


def summarize(records: pd.DataFrame, ddof: int = 1) -> pd.DataFrame:
    """Statistics over seeds per (chain, step), sorted like :func:`load_records`: chain, chain_alpha, step, n_seeds,
    {test,val}_acc_{mean,std,min,max}, alpha_hat_mean, alpha_hat_std (NaN but for the alpha-hat chain at steps >= 2).
    ``ddof``: 1 for the sample standard deviation over seeds (NaN for one seed), 0 for the population one."""
    missing = {"seed", "chain", "step", "test_acc", "val_acc", "alpha_hat"} - set(getattr(records, "columns", ()))
    if not isinstance(records, pd.DataFrame) or missing:
        raise ValueError(f"records must be the DataFrame returned by load_records (missing {sorted(missing)})")
    if records.empty:
        raise ValueError("records is empty: nothing to summarize")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    std = lambda values: values.std(ddof=ddof)  # noqa: E731 - over the seeds, NaN left out
    stats = {f"{metric}_{name}": (metric, how) for metric in ("test_acc", "val_acc")
             for name, how in (("mean", "mean"), ("std", std), ("min", "min"), ("max", "max"))}
    summary = records.groupby(["chain", "step"], sort=False).agg(
        chain_alpha=("chain_alpha", "first"), n_seeds=("seed", "nunique"), **stats,
        alpha_hat_mean=("alpha_hat", "mean"), alpha_hat_std=("alpha_hat", std)).reset_index()
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


def markdown_table(frame: pd.DataFrame, caption: str, name: str | None = None, index: bool = True,
                   formats: dict | str | None = None):
    """A DataFrame as the book's numbered table (``name``: citable with {numref}): a MyST ``table`` directive for a
    cell with metadata ``mystnb: {markdown_format: myst}``; the index, when kept, is the first column; ``formats``:
    one format string for every number, or one per column."""
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
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and t.figure is not None and t.get_window_extent(renderer).overlaps(fig.bbox)]
    return min(sizes) if sizes else float("inf")


def book_png(fig):
    """A figure as the book shows it: a PNG at twice its resolution, with its display width as the only size (a
    height would squash it in a narrow column) and, for tests/test_browser.py, its smallest font and resolution."""
    from io import BytesIO

    if not fig.axes and not fig.lines:
        return None
    dpi = 2 * fig.dpi
    metadata = {PNG_MIN_FONT_KEY: f"{smallest_font_pt(fig):g}", PNG_DPI_KEY: f"{dpi:g}"}
    buffer = BytesIO()
    fig.canvas.print_figure(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor(),
                            edgecolor=fig.get_edgecolor(), metadata=metadata)
    data = buffer.getvalue()  # bytes 16-20: the width in the IHDR chunk, big-endian
    return data, {"width": int.from_bytes(data[16:20], "big") // 2}


def book_figures(**rc) -> None:
    """The book's figure style, for a notebook's setup cell: FIGURE_WIDTH_IN wide at FIGURE_DPI, labels of
    FIGURE_FONT_PT, shown through :func:`book_png`; ``rc`` adds or overrides matplotlib rcParams."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    # matplotlib loads its backend with the first figure, and the inline backend then sets the figure formats:
    # let that happen first, so that it does not replace book_png afterwards
    plt.close(plt.figure())

    fonts = ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
             "legend.fontsize", "legend.title_fontsize")
    # plain tick labels: no offset ("+1e3"), and 0.5 or 1.35 on a log axis rather than 5 x 10^-1
    plt.rcParams.update({"figure.dpi": FIGURE_DPI, "figure.figsize": (FIGURE_WIDTH_IN, 3.4),
                         **dict.fromkeys(fonts, FIGURE_FONT_PT), "axes.formatter.useoffset": False,
                         "axes.formatter.min_exponent": 3, **rc})
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, book_png)
