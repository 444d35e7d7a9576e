"""The configuration of a self-distillation run: :class:`TrainConfig`, its profiles, and the device it runs on.

Every record holds its full config; :meth:`TrainConfig.config_hash` names what changes results, so a run can be
extended (more seeds, chains, steps) and reuse every finished step.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdlib.checks import boolean, integer, integers, kind, number, numbers, path, text
from sdlib.records import ALPHA_HAT_CHAIN, chain_name

__all__ = ["PROFILES", "CHAINS_IN_FLIGHT", "CAPTURE_MODES", "TrainConfig", "effective_config", "resolve_device",
           "derive_seed", "NUM_CLASSES", "TEACHER_BN_MODES", "DATA_ORDERS", "MODELS", "LR_SCHEDULES",
           "device_precision", "field_docs", "FIELD_CHOICES"]

NUM_CLASSES = 10
# Part of every config_hash: bump it when a change of the training code changes results (not for the lean step,
# equal to the plain step up to rounding; a bump would orphan every committed record).
_PIPELINE_VERSION = 1
# Seed streams: every random stream of a run is derived from (seed, step[, epoch], purpose).
INIT, ORDER, AUGMENT, LABEL_NOISE = 0, 1, 2, 3

_PAPER_ALPHAS = tuple(round(0.1 * k, 10) for k in range(11))  # 0.0, 0.1, ..., 1.0 as exact decimals
# The first value of each is the pipeline's behaviour before the field existed.
TEACHER_BN_MODES = ("eval", "train")
DATA_ORDERS = ("reshuffle", "fixed")
MODELS = ("resnet50", "cnn4")  # sdlib.models.build_model
LR_SCHEDULES = ("constant", "cosine", "step")
# How the chains of one (seed, step) train together, and how the step runs: neither changes results beyond
# rounding, so neither is hashed.
CHAINS_IN_FLIGHT = ("off", "streams", "batched")
CAPTURE_MODES = ("auto", "none", "graph")

# The book's profile table (book/reproduce_cifar10.md) and chapters 5 and 7 say where each value comes from.
PROFILES: dict[str, dict[str, Any]] = {
    # the paper's Section 5, with Algorithm 1 unbounded on 5,000 held-out images (the paper names no split)
    "paper": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                  bf16=False, channels_last=False, teacher_bn="eval", data_order="reshuffle", n_val=5000,
                  include_alpha_hat=True, alpha_hat_bounds=None),
    # the authors' code as it ran (github.com/Kennethborup/self_distillation, book/reproduce_cifar10.md)
    "official": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                     bf16=False, channels_last=False, teacher_bn="train", data_order="fixed", n_val=0,
                     include_alpha_hat=False),
    # quick GPU runs; otherwise the pipeline's defaults
    "fast": dict(epochs=75, batch_size=256, lr=1e-3, lr_schedule="cosine", warmup_epochs=1,
                 bf16=True, channels_last=True),
}
# a variant of "paper", not a protocol (benchmarks/train_throughput.py --ab compares it with float32)
PROFILES["paper-bf16"] = dict(PROFILES["paper"], bf16=True, channels_last=True)
# cnn4 to its plateau on a 2-core CPU (chapter 7; README.md says how the schedule was chosen)
PROFILES["cpu"] = dict(model="cnn4", epochs=20, batch_size=256, lr=2e-3, lr_schedule="step", warmup_epochs=1,
                       bf16=True, channels_last=True, n_val=5000, subset=10000, eval_every=1, test_every=20,
                       alphas=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1, 2), steps=5)

# Fields added after results were committed: hashed only when they differ from the value that reproduces the
# pipeline before them, so every config written before keeps its hash.
_HASHED_UNLESS = {"teacher_bn": "eval", "data_order": "reshuffle", "alpha_hat_bounds": [0.0, 1.0],
                  "model": "resnet50", "label_noise": 0.0}
# Fields that do not change results (data_root: the data's fingerprint is hashed instead).
_NOT_HASHED = ("profile", "seeds", "steps", "alphas", "include_alpha_hat", "data_root", "results_dir",
               "checkpoint_dir", "device", "eval_batch_size", "download", "checkpoint_every", "data_fingerprint",
               "eval_every", "test_every", "chains_in_flight", "capture")
FIELD_CHOICES = {"profile": PROFILES, "model": MODELS, "lr_schedule": LR_SCHEDULES, "teacher_bn": TEACHER_BN_MODES,
                 "data_order": DATA_ORDERS, "chains_in_flight": CHAINS_IN_FLIGHT, "capture": CAPTURE_MODES}


def _explained(of, why: str):  # a kind whose expectation is followed by why
    return lambda value: (expected := of(value)) and expected + why


# Each field's kind (sdlib.checks) and its conversion. Fields typed "... | None" may also be None.
_CHECKS = {
    **{name: (text(*choices), str) for name, choices in FIELD_CHOICES.items()},
    **dict.fromkeys(("epochs", "steps", "eval_batch_size", "checkpoint_every", "eval_every", "test_every"),
                    (integer(1), int)),
    "batch_size": (_explained(integer(2), " (BatchNorm normalizes over the batch: one image has no batch "
                                          "statistics)"), int),
    **dict.fromkeys(("n_val", "warmup_epochs", "split_seed"), (integer(0), int)),
    "subset": (integer(NUM_CLASSES), int),  # one image per class
    "lr": (number(0, low_open=True), float),
    "l2_coef": (number(0), float),
    "label_noise": (_explained(number(0, 1, high_open=True), " (the fraction of training and validation labels "
                                                             "changed)"), float),
    **dict.fromkeys(("bf16", "channels_last", "include_alpha_hat", "download"), (boolean(), bool)),
    "seeds": (integers(0, distinct=True), lambda v: tuple(map(int, v))),
    "alphas": (numbers(0, 1, min_len=0), lambda v: tuple(map(float, v))),
    "alpha_hat_bounds": (kind("None (unbounded) or a pair (low, high) of finite numbers with low <= high",
                              lambda v: not numbers(min_len=2)(v) and len(v) == 2 and v[0] <= v[1]),
                         lambda v: tuple(map(float, v))),
    **dict.fromkeys(("data_root", "results_dir", "checkpoint_dir"),
                    (path(), lambda v: os.path.expanduser(str(v)))),  # "~/r": the home folder
    "data_fingerprint": (kind("None or 16 lower-case hex digits (sdlib.data.data_fingerprint of the data)",
                              lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v)), str),
    "device": (kind("'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device name",
                    lambda v: isinstance(v, str) and re.fullmatch(
                        r"auto|(cpu|cuda|mps|xpu|hpu|mtia|meta|privateuseone)(:\d+)?", v)), str),
}


@dataclass
class TrainConfig:
    """Everything that defines a run; recorded in full with every result.

    Build with ``TrainConfig.from_profile(name, **overrides)`` (:data:`PROFILES`), or directly: the defaults are
    the paper profile's but ``alpha_hat_bounds`` (0, 1). Invalid values raise ValueError naming the field and what
    was expected. Each field's docstring is its ``--help`` text (:func:`field_docs`).
    """

    profile: str = "paper"
    """paper: the protocol as the paper describes it; official: the authors' code as it ran (teacher BatchNorm in
    train mode, all 50,000 images, one fixed data order, no alpha-hat); fast: batch 256, warmup+cosine, bf16 (CUDA);
    paper-bf16: paper in bf16 (CUDA); cpu: cnn4 to convergence on a 2-core CPU (the book's table of profiles)"""
    model: str = "resnet50"
    """the network: resnet50 (the paper's) or cnn4 (four 3x3 convolutions for 32x32 images, sdlib.models)"""
    epochs: int = 75
    """epochs per step"""
    batch_size: int = 16
    """training batch size"""
    lr: float = 1e-4
    """Adam learning rate"""
    l2_coef: float = 1e-4
    """coefficient of the L2 term, the sum of the parameter tensors' (unsquared) norms"""
    lr_schedule: str = "constant"
    """learning rate after the warmup: constant, cosine (to 0) or step (divided by 10 at half and at three quarters
    of the iterations after the warmup)"""
    warmup_epochs: int = 0
    """epochs of linear warmup, per batch"""
    bf16: bool = False
    """bf16 autocast (used on CUDA, and for the small networks on a CPU with native bf16; recorded as used)"""
    channels_last: bool = False
    """the channels_last memory format (where bf16 applies; recorded as used)"""
    teacher_bn: str = "eval"
    """the teacher's BatchNorm: eval (running statistics) or train (each batch's statistics, as the authors'
    teacher ran; its running statistics are not changed, sdlib.step.teacher_probs)"""
    data_order: str = "reshuffle"
    """reshuffle (a new order every epoch) or fixed (one permutation of the seed for every epoch and step, as the
    authors' DataLoader)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """seeds, e.g. 0,1,2,3 or 0 1 2 3"""
    steps: int = 5
    """steps per chain; step 1 is the shared labels-only model"""
    alphas: tuple[float, ...] = _PAPER_ALPHAS
    """fixed alphas in [0, 1], e.g. 0,0.5,1 or 0 0.5 1; '' for none"""
    include_alpha_hat: bool = True
    """the alpha-hat chain (Algorithm 1)"""
    alpha_hat_bounds: tuple[float, float] | None = (0.0, 1.0)
    """two numbers LOW HIGH to clip Algorithm 1's least-squares alpha to (0 1, 0,1, or =-1,2 for a negative LOW),
    or 'none' for the unbounded estimate"""
    n_val: int = 5000
    """validation images held out of the training set, stratified; 0 trains on all of it (no alpha-hat chain
    then: it estimates alpha on these images, never on the test set)"""
    split_seed: int = 0
    """seed of the validation split and subsets"""
    subset: int | None = None
    """cut every part to this many images (>= 10), for smoke runs; none: all images"""
    label_noise: float = 0.0
    """fraction in [0, 1) of training and validation labels replaced by another class (exactly round(rate * n) of
    each split, sdlib.data.symmetric_label_noise), the same for every step and chain of a seed; test labels clean"""
    data_root: str = "data/cifar10"
    """CIFAR-10: torchvision's cifar-10-batches-py/ or an ImageFolder with train/ and test/"""
    results_dir: str = "runs/cifar10"
    """where records.jsonl and epochs.jsonl are appended (git-ignored; the committed results/cifar10 only when
    named here)"""
    checkpoint_dir: str = "checkpoints/cifar10"
    """final weights (the next step's teachers) and resumable states"""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ..."""
    eval_batch_size: int = 1000
    """batch size of evaluation"""
    download: bool = False
    """download CIFAR-10 with torchvision if absent (timeout: $SDLIB_DOWNLOAD_TIMEOUT seconds of silence, 60)"""
    checkpoint_every: int = 1
    """epochs between resumable checkpoints"""
    eval_every: int = 5
    """epochs between evaluations of val/test; the last epoch is always evaluated and is what the records hold"""
    test_every: int | None = None
    """epochs between evaluations of the test set alone (the last epoch always); none: as eval_every"""
    chains_in_flight: str = "streams"
    """how the chains of a step train: streams (each its own network on the same batches, on its own CUDA stream,
    sdlib.lean_step), batched (one batched ResNet-50 network, sdlib.batched) or off (one at a time)"""
    capture: str = "auto"
    """how the training step runs: auto (a CUDA graph on CUDA, eager elsewhere), none (eager) or graph (CUDA)"""
    data_fingerprint: str | None = None
    """the data's fingerprint (16 hex digits, sdlib.data.data_fingerprint): the config's hash then needs no data
    here, and a run refuses other data under data_root; none: that of the data found there"""

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "TrainConfig":
        """The named profile of :data:`PROFILES` with ``overrides`` (any fields) applied."""
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.name != "profile")
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {valid}")
        return cls(profile=profile, **{**PROFILES[profile], **overrides})

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for field in dataclasses.fields(self):
            of, convert = _CHECKS[field.name]
            value = getattr(self, field.name)
            if field.name in ("seeds", "alphas", "alpha_hat_bounds") and not isinstance(value, (str, bytes)) \
                    and hasattr(value, "__iter__"):
                value = tuple(value)
            if value is None and field.type.endswith("| None"):
                continue
            expected = of(value)
            if expected:
                fail(field.name, expected)
            setattr(self, field.name, convert(value))
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"an integer in [0, epochs={self.epochs}]")
        if len(set(self.chains)) != len(self.chains):
            fail("alphas", "distinct values (two alphas give the same chain name)")
        if self.steps >= 2 and not self.chains:
            fail("alphas", "non-empty when include_alpha_hat is False and steps >= 2 (no chain to run)")
        if self.n_val == 0 and self.include_alpha_hat and self.steps >= 2:  # Algorithm 1 never sees the test set
            fail("n_val", "an integer >= 1 while the alpha-hat chain is run (it estimates alpha on the n_val "
                          "validation images, and never on the test set): hold images out, or set "
                          "include_alpha_hat=False (--no-alpha-hat)")
        if self.chains_in_flight == "batched" and self.model != "resnet50":
            fail("chains_in_flight", f"'streams' or 'off' for model {self.model!r}: the batched network "
                                     "(sdlib.batched) is ResNet-50 only")

    def to_dict(self) -> dict:
        """All fields as a JSON-serializable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def hashed_fields(self) -> dict:
        """The fields that enter :meth:`config_hash` (the data's fingerprint aside), with the pipeline version."""
        payload = {k: v for k, v in self.to_dict().items()
                   if k not in _NOT_HASHED and not (k in _HASHED_UNLESS and v == _HASHED_UNLESS[k])}
        return {**payload, "pipeline_version": _PIPELINE_VERSION}

    def resolved_data_fingerprint(self) -> str | None:
        """``data_fingerprint`` if set, else that of the data under ``data_root`` (None where none are there;
        :func:`sdlib.data.data_fingerprint`: about 1 s once per process)."""
        if self.data_fingerprint is not None:
            return self.data_fingerprint
        from sdlib.data import data_fingerprint  # here: the book's torch-free environment imports PROFILES

        return data_fingerprint(self.data_root)

    def config_hash(self, data_fingerprint: str | None = None) -> str:
        """12 hex digits naming what changes results: :meth:`hashed_fields` and the data's fingerprint
        (``data_fingerprint``, else :meth:`resolved_data_fingerprint`), so records are never reused across data."""
        payload = self.hashed_fields()
        payload["data"] = data_fingerprint if data_fingerprint is not None else self.resolved_data_fingerprint()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def chains(self) -> tuple[str, ...]:
        """The chains of steps >= 2, in training order: fixed alphas as given, then alpha-hat."""
        return tuple(chain_name(a) for a in self.alphas) + ((ALPHA_HAT_CHAIN,) if self.include_alpha_hat else ())


def resolve_device(name: str) -> "torch.device":
    """``name`` as a torch.device ("auto": CUDA if available, else the CPU); ValueError for CUDA devices absent here."""
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible")
    return device


def device_precision(config: TrainConfig, device: "torch.device") -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) as ``config`` runs them on ``device``: as configured on CUDA; on the CPU
    never for ResNet-50 (float32 there, as always), for the small networks bf16 only where the CPU computes it
    natively (AVX512-BF16 / AMX)."""
    import torch

    if torch.device(device).type == "cuda":
        return config.bf16, config.channels_last
    if torch.device(device).type != "cpu" or config.model == "resnet50":
        return False, False
    return config.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported(), config.channels_last


def effective_config(config: TrainConfig, device: "torch.device") -> TrainConfig:
    """``config`` as it runs, and is recorded and hashed, on ``device`` (:func:`device_precision`; a warning where
    bf16 or channels_last is switched off)."""
    bf16, channels_last = device_precision(config, device)
    if (bf16, channels_last) != (config.bf16, config.channels_last):
        warnings.warn(f"bf16 autocast and channels_last are used on CUDA only (and for the small networks on a CPU "
                      f"with native bf16): for model {config.model!r} on {device} this run uses bf16={bf16}, "
                      f"channels_last={channels_last}, and records them", RuntimeWarning, stacklevel=3)
        return dataclasses.replace(config, bf16=bf16, channels_last=channels_last)
    return config


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints; distinct tuples give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@functools.cache
def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string under it in the class body) in one line: the --help texts."""
    body = ast.parse(inspect.getsource(TrainConfig)).body[0].body
    return {field.target.id: " ".join(doc.value.value.split()) for field, doc in zip(body, body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}
