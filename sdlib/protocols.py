"""The three training protocols side by side, computed from :data:`sdlib.config.PROFILES` (torch-free).

``official`` is the authors' code as it ran, ``paper`` the protocol as the paper describes it (with our held-out
split, so that Algorithm 1 has data to estimate alpha-hat on), ``fast`` our quick profile. The book's page
book/reproduce_cifar10.md shows :func:`protocol_table` for every profile (values read from the profiles, never
typed by hand), the reason for each difference and the line of the authors' code it comes from, and
:func:`teacher_bn_effect`: how much the teacher's BatchNorm mode changes its targets, read from the committed
run of ``benchmarks/teacher_bn.py``.

>>> protocol_table()                      # doctest: +SKIP
>>> teacher_bn_effect()                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from sdlib.config import PROFILES, TrainConfig
from sdlib.data import CIFAR10_TRAIN_IMAGES
from sdlib.results import resolve_repo_path

# The order of the columns: the authors' code, the paper's description, our quick profile, the small network
# trained to convergence on a CPU (chapter 7). (PROFILES also holds "paper-bf16", the paper profile in bf16
# autocast: a speed variant of "paper", not a protocol of its own.)
PROTOCOLS = ("official", "paper", "fast", "cpu")
# The authors' repository at the commit read (their CIFAR-10 code is one file, self_distiller.py).
AUTHORS_CODE = ("https://github.com/Kennethborup/self_distillation/blob/"
                "cb20d6ce0b6005d97414225f97c7237117f54cf0/self_distiller.py")
# The committed run of benchmarks/teacher_bn.py, relative to the repository root.
TEACHER_BN_RESULTS = "benchmarks/results/teacher_bn_cpu.json"

_TEACHER_BN = {"eval": "eval: running statistics", "train": "train: each batch's statistics"}
_DATA_ORDER = {"reshuffle": "reshuffled every epoch", "fixed": "one permutation for every epoch and step"}


def _rows(config: TrainConfig) -> dict[str, object]:
    """The settings of one profile, as the table shows them (one entry per row)."""
    bounds = config.alpha_hat_bounds
    train_images = CIFAR10_TRAIN_IMAGES - config.n_val
    return {
        "network": {"resnet50": "ResNet-50 (torchvision)", "cnn4": "cnn4 (4 convolutions, sdlib.models)"}[config.model],
        "epochs per step": config.epochs,
        "batch size": config.batch_size,
        "optimizer": f"Adam, lr {config.lr:g}",
        "learning-rate schedule": config.lr_schedule + (f", {config.warmup_epochs} warmup epoch(s)"
                                                        if config.warmup_epochs else ""),
        "precision": ("float32" if not config.bf16 else "bf16 autocast (CUDA)" if config.model == "resnet50"
                      else "bf16 autocast (CUDA, or a CPU with native bf16)"),
        "teacher BatchNorm": _TEACHER_BN[config.teacher_bn],
        "training images": train_images if config.subset is None else min(config.subset, train_images),
        "validation images (held out)": config.n_val if config.subset is None else min(config.n_val, config.subset),
        "data order": _DATA_ORDER[config.data_order],
        "alpha-hat chain (Algorithm 1)": "yes" if config.include_alpha_hat else "no",
        "alpha-hat bounds": ("none (all reals)" if bounds is None else f"[{bounds[0]:g}, {bounds[1]:g}]")
        if config.include_alpha_hat else "(no alpha-hat chain)",
    }


def protocol_table(profiles: tuple[str, ...] = PROTOCOLS) -> pd.DataFrame:
    """One row per setting, one column per profile (``official``, ``paper``, ``fast``, ``cpu``), read from
    :meth:`TrainConfig.from_profile` (so a field a profile leaves at its default shows that default), and a last
    column ``differs`` saying whether the profiles disagree on the row.

    Raises ValueError for a name that is not in :data:`sdlib.config.PROFILES`.
    """
    unknown = [name for name in profiles if name not in PROFILES]
    if unknown or not profiles:
        raise ValueError(f"profiles must be names from {sorted(PROFILES)}, got {list(profiles)!r}")
    columns = {name: _rows(TrainConfig.from_profile(name)) for name in profiles}
    table = pd.DataFrame(columns)
    table["differs"] = table.apply(lambda row: len(set(map(str, row))) > 1, axis=1)
    table.index.name = "setting"
    return table


def teacher_bn_effect(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The committed measurement of ``benchmarks/teacher_bn.py`` as a DataFrame: one row per set of images
    (``test``: test images in a random order; ``targets``: augmented training batches as a student sees them),
    columns images, mean_abs_diff (mean |p_train - p_eval| over images x classes), mean_total_variation,
    max_abs_diff, argmax_agreement, accuracy_eval, accuracy_train (of either mode's argmax on those images),
    teacher_epochs and teacher_test_acc (how far the teacher was trained: its epochs and its test accuracy after
    them, on the benchmark's test images).

    ``frame.attrs`` holds ``settings``, ``teacher`` (its training curve) and ``provenance`` (commit, device,
    library versions, date). ``path`` defaults to the committed file (:data:`TEACHER_BN_RESULTS` under the
    repository root). Raises FileNotFoundError naming the file and the command that writes it.
    """
    path = resolve_repo_path(TEACHER_BN_RESULTS) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher BatchNorm measurement at {str(path)!r}: run "
                                "`python benchmarks/teacher_bn.py --data-root <CIFAR-10> --out "
                                f"{TEACHER_BN_RESULTS}` to write it")
    run = json.loads(path.read_text(encoding="utf-8"))
    rows = {}
    for name, r in run["results"].items():
        rows[name] = {k: r[k] for k in ("images", "mean_abs_diff", "mean_total_variation", "max_abs_diff",
                                        "argmax_agreement")}
        rows[name].update({f"accuracy_{mode}": acc for mode, acc in r["accuracy"].items()})
    for row in rows.values():  # how far the teacher got: its test accuracy (eval mode) after its last epoch
        row["teacher_epochs"] = run["teacher"]["epochs"][-1]["epoch"]
        row["teacher_test_acc"] = run["teacher"]["epochs"][-1]["test_acc"]
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "images compared"
    frame.attrs.update(settings=run["settings"], teacher=run["teacher"], provenance=run["provenance"])
    return frame
