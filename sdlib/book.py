"""Helpers of one page of the book each, apart from the library: the figures of the CIFAR-10 chains (chapter 5,
notebook 05: accuracy against step, the last step against alpha, alpha-hat per step, per-epoch curves) and the
runs and benchmark tables of book/reproduce_at_scale.md (:func:`training_runs`, :func:`load_throughput`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from sdlib import store
from sdlib.records import ALPHA_HAT_CHAIN, PROBE_EPOCHS_FILE, SHARED_CHAIN
from sdlib.results import (FIGURE_WIDTH_IN, _EPOCH_OPTIONAL_NUMERIC, _check_records, chain_alpha, chain_label,
                           load_epochs, load_records, summarize)

ALPHA_HAT_COLOR = "tab:red"
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
                            markersize=7, capsize=4, linewidth=1.6,
                            label=r"$\hat\alpha$ chain, at its mean $\hat\alpha$")
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


# ------------------------------------------------------------------------- book/reproduce_at_scale.md


def _images_per_epoch(config, data) -> float:
    """Training images of one epoch: the training split cut to whole batches (the last partial one is dropped)."""
    try:
        batch, n_train = int(config["batch_size"]), int(data["sizes"]["train"])
    except (TypeError, KeyError, ValueError):
        return math.nan
    return float(n_train // batch * batch)


def training_runs(results_dir: str | os.PathLike, max_gap_s: float = 60.0, config_hash: str | None = None,
                  profile: str | None = None) -> pd.DataFrame:
    """The wall-clock runs behind ``results_dir``: how long the models took together, at what throughput.

    Each model occupies ``[end - wall_time_s, end]``, ``end`` its record's ``provenance.date``; an alpha-hat step is
    extended back by its alpha = 0 probe's wall time (``probe_epochs.jsonl``: it trained just before, in the same
    process). Intervals within ``max_gap_s`` of each other form one run (a sweep sharing a GPU, or one run_chains).
    One row per run, in time order: run, start, end (UTC), wall_clock_s, seeds, models (probes included),
    train_images, images_per_s (their ratio, evaluation included), model_seconds (summed: more than wall_clock_s
    where models ran side by side), devices, config_hashes. ValueError where no record has a date and a wall time.
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
    """``benchmarks/train_throughput.py``'s JSON results (a path or several) as one row per (file, variant):
    file, date, device, git_commit, torch, variant, n_models, batch_per_model, precision, images_per_s,
    per_model_images_per_s, ratio_to_reference, and the paper's grid at that variant's rates (grid_profile,
    grid_models, grid_epochs, grid_train_images, grid_train_hours, grid_eval_hours, grid_total_hours). ValueError
    names a file that is not such a result; FileNotFoundError a missing one."""
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
