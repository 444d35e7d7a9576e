"""The configuration of a self-distillation run of ResNet-50 on CIFAR-10: :class:`TrainConfig`, its profiles,
and the device it runs on.

Every result records its full config; :meth:`TrainConfig.config_hash` names what changes results, so a run can
be extended (more seeds, chains, steps) and reuse every finished step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdlib.records import ALPHA_HAT_CHAIN, chain_name

__all__ = ["PROFILES", "CHAINS_IN_FLIGHT", "CAPTURE_MODES", "TrainConfig", "effective_config", "resolve_device", "derive_seed", "NUM_CLASSES"]

NUM_CLASSES = 10
# Bump when a change of the training code changes results: it is part of every config_hash.
_PIPELINE_VERSION = 1
# Seed streams: every random stream of a run is derived from (seed, step[, epoch], purpose).
INIT, ORDER, AUGMENT = 0, 1, 2


# ------------------------------------------------------------------------------------------------ configuration

_PAPER_ALPHAS = tuple(round(0.1 * k, 10) for k in range(11))  # 0.0, 0.1, ..., 1.0 as exact decimals

PROFILES: dict[str, dict[str, Any]] = {
    # The paper's protocol: Adam 1e-4, batch 16, 75 epochs, constant learning rate, float32.
    "paper": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                  bf16=False, channels_last=False),
    # Quick runs: 16x the batch, a larger learning rate with linear warmup and cosine decay, bf16 autocast and
    # channels_last (both used on CUDA only; on the CPU they are switched off and recorded so).
    "fast": dict(epochs=75, batch_size=256, lr=1e-3, lr_schedule="cosine", warmup_epochs=1,
                 bf16=True, channels_last=True),
    # The paper's protocol in bf16 autocast and channels_last (CUDA only), for users who accept the rounding:
    # benchmarks/train_throughput.py --ab compares its loss curve with the float32 one from the same start.
    "paper-bf16": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                       bf16=True, channels_last=True),
}

# How the models of one (seed, step) train together (TrainConfig.chains_in_flight) and how the step runs
# (TrainConfig.capture); neither changes what is computed beyond rounding, so neither enters config_hash.
CHAINS_IN_FLIGHT = ("off", "streams", "batched", "batched-matmul")
CAPTURE_MODES = ("auto", "none", "graph", "reduce-overhead", "max-autotune")

# Fields that do not change results: left out of config_hash, so a run may move between machines or folders,
# or add seeds, chains or steps, and still reuse every finished step.
_NOT_HASHED = ("profile", "seeds", "steps", "alphas", "include_alpha_hat", "data_root", "results_dir",
               "checkpoint_dir", "device", "eval_batch_size", "download", "checkpoint_every", "eval_every",
               "chains_in_flight", "capture")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class TrainConfig:
    """Everything that defines a run; recorded in full with every result.

    Build with ``TrainConfig.from_profile("paper" | "paper-bf16" | "fast", **overrides)`` (or directly: the defaults are the
    paper profile). Invalid values raise ValueError naming the field and what was expected.

    ``profile`` names the profile the values came from (a label: ``from_profile`` applies a profile's values).
    Training: ``epochs`` per step, ``batch_size``, Adam ``lr``, ``l2_coef`` (times the sum over parameter
    tensors of their L2 norm), ``lr_schedule`` "constant" or "cosine" after ``warmup_epochs`` of linear warmup
    (per batch), ``bf16`` autocast and ``channels_last`` (CUDA only). Chains: ``seeds``, ``steps`` (>= 1; step 1
    is the shared labels-only model), fixed ``alphas`` in [0, 1], ``include_alpha_hat``. Data: ``n_val``
    validation images held out of the training set (stratified, ``split_seed``), ``subset`` (None, or an int
    >= 10 cutting every part for smoke runs), ``data_root``, ``download``. Where: ``results_dir``,
    ``checkpoint_dir``, ``device`` ("auto": cuda if available, else cpu), ``eval_batch_size``, and
    ``checkpoint_every`` (epochs between resumable checkpoints; 1 = every epoch). Speed (none of these enters
    config_hash): ``eval_every`` (epochs between evaluations; the last epoch is always evaluated and is what
    the records hold), ``chains_in_flight`` ("streams": the chains of one (seed, step) train together on the
    same batches, each its own network, on its own CUDA stream on a GPU; "batched": as one batched network,
    :mod:`sdlib.batched`; "batched-matmul": the same with its 1x1 convolutions as batched matrix
    products; "off": one model at a time), ``capture`` ("auto": the step as one CUDA graph on
    CUDA, eager elsewhere; "none"; "graph"; or the torch.compile mode "reduce-overhead" / "max-autotune").
    """

    profile: str = "paper"
    epochs: int = 75
    batch_size: int = 16
    lr: float = 1e-4
    l2_coef: float = 1e-4
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    bf16: bool = False
    channels_last: bool = False
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 5
    alphas: tuple[float, ...] = _PAPER_ALPHAS
    include_alpha_hat: bool = True
    n_val: int = 5000
    split_seed: int = 0
    subset: int | None = None
    data_root: str = "data/cifar10"
    results_dir: str = "results/cifar10"
    checkpoint_dir: str = "checkpoints/cifar10"
    device: str = "auto"
    eval_batch_size: int = 1000
    download: bool = False
    checkpoint_every: int = 1
    eval_every: int = 5
    chains_in_flight: str = "streams"
    capture: str = "auto"

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "TrainConfig":
        """The named profile (``"paper"``, ``"paper-bf16"`` or ``"fast"``) with ``overrides`` applied (any
        field names)."""
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
        valid = {f.name for f in dataclasses.fields(cls)} - {"profile"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        return cls(profile=profile, **{**PROFILES[profile], **overrides})

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def positive_int(name, minimum=1):
            if not _is_int(getattr(self, name)) or getattr(self, name) < minimum:
                fail(name, f"an integer >= {minimum}")
            setattr(self, name, int(getattr(self, name)))

        def boolean(name):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "True or False")
            setattr(self, name, bool(getattr(self, name)))

        def path(name):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or str(value) == "":
                fail(name, "a non-empty path")
            setattr(self, name, str(value))

        if self.profile not in PROFILES:
            fail("profile", f"one of {sorted(PROFILES)}")
        for name in ("epochs", "batch_size", "steps", "n_val", "eval_batch_size", "checkpoint_every", "eval_every"):
            positive_int(name)
        positive_int("warmup_epochs", 0)
        positive_int("split_seed", 0)
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"an integer in [0, epochs={self.epochs}]")
        for name, low_open in (("lr", True), ("l2_coef", False)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0 or (low_open and value == 0):
                fail(name, "a finite number > 0" if low_open else "a finite number >= 0")
            setattr(self, name, float(value))
        if self.lr_schedule not in ("constant", "cosine"):
            fail("lr_schedule", "'constant' or 'cosine'")
        for name in ("bf16", "channels_last", "include_alpha_hat", "download"):
            boolean(name)
        if self.subset is not None and (not _is_int(self.subset) or self.subset < NUM_CLASSES):
            fail("subset", f"None or an integer >= {NUM_CLASSES} (one image per class)")
        self.subset = None if self.subset is None else int(self.subset)

        if isinstance(self.seeds, (str, bytes)) or not hasattr(self.seeds, "__iter__"):
            fail("seeds", "a sequence of integers >= 0")
        seeds = tuple(self.seeds)
        if not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
            fail("seeds", "a non-empty sequence of distinct integers >= 0")
        self.seeds = tuple(int(s) for s in seeds)

        if isinstance(self.alphas, (str, bytes)) or not hasattr(self.alphas, "__iter__"):
            fail("alphas", "a sequence of numbers in [0, 1]")
        alphas = tuple(self.alphas)
        if not all(_is_real(a) and 0.0 <= a <= 1.0 for a in alphas):
            fail("alphas", "a sequence of numbers in [0, 1]")
        self.alphas = tuple(float(a) for a in alphas)
        names = [chain_name(a) for a in self.alphas]
        if len(set(names)) != len(names):
            fail("alphas", "distinct values (two alphas give the same chain name)")
        if self.steps >= 2 and not self.alphas and not self.include_alpha_hat:
            fail("alphas", "non-empty when include_alpha_hat is False and steps >= 2 (no chain to run)")

        for name in ("data_root", "results_dir", "checkpoint_dir"):
            path(name)
        if not isinstance(self.device, str) or not (self.device == "auto" or _valid_device(self.device)):
            fail("device", "'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device name")
        if self.chains_in_flight not in CHAINS_IN_FLIGHT:
            fail("chains_in_flight", f"one of {list(CHAINS_IN_FLIGHT)}")
        if self.capture not in CAPTURE_MODES:
            fail("capture", f"one of {list(CAPTURE_MODES)}")

    def to_dict(self) -> dict:
        """All fields as a JSON-serializable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def config_hash(self) -> str:
        """12 hex digits identifying what changes results (not seeds/chains/steps, paths, device, eval batch)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        payload["pipeline_version"] = _PIPELINE_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def chains(self) -> tuple[str, ...]:
        """The chains of steps >= 2, in training order: fixed alphas as given, then alpha-hat."""
        return tuple(chain_name(a) for a in self.alphas) + ((ALPHA_HAT_CHAIN,) if self.include_alpha_hat else ())


def _valid_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible")
    return device


def effective_config(config: TrainConfig, device: torch.device) -> TrainConfig:
    """``config`` as it runs on ``device``: bf16 autocast and channels_last are CUDA-only, so elsewhere they are
    switched off (with a warning), and the results are recorded and hashed with the values actually used."""
    if torch.device(device).type != "cuda" and (config.bf16 or config.channels_last):
        warnings.warn(f"bf16 autocast and channels_last are used on CUDA only; on {torch.device(device).type} "
                      "this run uses float32 and the default memory format, and records bf16=False, "
                      "channels_last=False", RuntimeWarning, stacklevel=3)
        return dataclasses.replace(config, bf16=False, channels_last=False)
    return config


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints; distinct tuples give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))
