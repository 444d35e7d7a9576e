"""The configuration of a self-distillation run of ResNet-50 on CIFAR-10: :class:`TrainConfig`, its profiles,
and the device it runs on.

Every result records its full config; :meth:`TrainConfig.config_hash` names what changes results, so a run can
be extended (more seeds, chains, steps) and reuse every finished step.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdlib.records import ALPHA_HAT_CHAIN, chain_name

__all__ = ["PROFILES", "CHAINS_IN_FLIGHT", "CAPTURE_MODES", "TrainConfig", "effective_config", "resolve_device",
           "derive_seed", "NUM_CLASSES", "TEACHER_BN_MODES", "DATA_ORDERS", "MODELS",
           "device_precision", "field_docs", "FIELD_CHOICES"]

NUM_CLASSES = 10
# Bump when a change of the training code changes results: it is part of every config_hash. Not bumped for the
# lean step (L2 gradient without autograd, folded teacher batch norms, fused Adam, chains in flight): it computes
# the same function up to float rounding (tests/test_step.py, test_inflight.py: against the plain autograd step
# in float64), and a bump would change every hash and orphan the committed results/cifar10.
_PIPELINE_VERSION = 1
# Seed streams: every random stream of a run is derived from (seed, step[, epoch], purpose).
INIT, ORDER, AUGMENT, LABEL_NOISE = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------ configuration

_PAPER_ALPHAS = tuple(round(0.1 * k, 10) for k in range(11))  # 0.0, 0.1, ..., 1.0 as exact decimals

# How the frozen teacher's BatchNorm layers normalize (sdlib.models.teacher_probs) and how the training images are
# ordered (sdlib.step.epoch_order); the first value of each is the pipeline's behaviour before the field existed.
TEACHER_BN_MODES = ("eval", "train")
DATA_ORDERS = ("reshuffle", "fixed")
# The networks (sdlib.models.build_model): the paper's ResNet-50, and a small network for 32x32 images that trains
# to convergence on a CPU (the cpu profile).
MODELS = ("resnet50", "cnn4")

PROFILES: dict[str, dict[str, Any]] = {
    # What the paper describes (Section 5): Adam 1e-4, batch 16, 75 epochs, constant learning rate, float32, a
    # frozen teacher (eval mode), and Algorithm 1 as written: alpha-hat = argmin over all real alpha (no bounds),
    # estimated on our 5,000 held-out training images (the paper names no validation set).
    "paper": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                  bf16=False, channels_last=False, teacher_bn="eval", data_order="reshuffle", n_val=5000,
                  include_alpha_hat=True, alpha_hat_bounds=None),
    # The authors' code as it ran (github.com/Kennethborup/self_distillation, self_distiller.py, Lightning 1.1.1):
    # the same optimizer and schedule, but the teacher's BatchNorm in train mode (batch statistics), all 50,000
    # training images (their validation loader is the test set), one fixed data order, fixed alphas only (their
    # code has no alpha-hat). book/reproduce_cifar10.md gives the line of their code behind each value.
    "official": dict(epochs=75, batch_size=16, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                     bf16=False, channels_last=False, teacher_bn="train", data_order="fixed", n_val=0,
                     include_alpha_hat=False),
    # Quick runs: 16x the batch, a larger learning rate with linear warmup and cosine decay, bf16 autocast and
    # channels_last (both used on CUDA only; on the CPU they are switched off and recorded so); otherwise the
    # pipeline's defaults (eval-mode teacher, reshuffled order, 5,000 held out, alpha-hat clipped to [0, 1]).
    "fast": dict(epochs=75, batch_size=256, lr=1e-3, lr_schedule="cosine", warmup_epochs=1,
                 bf16=True, channels_last=True),
}
# The paper profile in bf16 autocast and channels_last (CUDA only), for users who accept the rounding:
# benchmarks/train_throughput.py --ab compares its loss curve with the float32 one from the same start. A variant
# of "paper", not a protocol of its own (sdlib.protocols.PROTOCOLS lists official, paper and fast).
PROFILES["paper-bf16"] = dict(PROFILES["paper"], bf16=True, channels_last=True)
# Deep self-distillation trained to convergence on a 2-core CPU (chapter 7): the small cnn4 network on 10,000
# training images (5,000 more held out for alpha-hat and model selection; all 10,000 test images), batch 256,
# Adam 2e-3 with one warm-up epoch, then the step schedule (the rate divided by 10 at half and at three quarters
# of the remaining iterations), bf16 autocast and channels_last on CPUs with native bf16 (AVX512-BF16 / AMX;
# elsewhere float32, recorded so), validation every epoch, test at the last. Speed settings measured by
# benchmarks/cpu_throughput.py (batch 128 was slower here on one thread: 1,150 against 1,180 images/s). The epochs
# and schedule by the plateau of the validation curve (the last fifth of the epochs within 0.5 points of the final
# value), seed 0, step 1: at 15 epochs, cosine decay to 0 and 2,000 held-out images 9 of the first 13 models per
# noise level missed it (worst 1.1 points); at 20 epochs and 5,000 held out, cosine still rose through its last
# epochs (clean 72.7 73.0 73.6 73.6; 7 of the first 14 models missed); with the step schedule the last five
# epochs run at 1 % of the peak rate and ended 71.9 72.1 71.9 72.0 (clean) and 40.7 40.9 41.0 40.9 (40 % noise),
# at a test accuracy 0.8 points below cosine's (72.5 against 73.2 clean, 64.7 against 65.6 noisy).
PROFILES["cpu"] = dict(model="cnn4", epochs=20, batch_size=256, lr=2e-3, lr_schedule="step", warmup_epochs=1,
                       bf16=True, channels_last=True, n_val=5000, subset=10000, eval_every=1, test_every=20,
                       alphas=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1, 2), steps=5)

# How the models of one (seed, step) train together (TrainConfig.chains_in_flight) and how the step runs
# (TrainConfig.capture); neither changes what is computed beyond rounding, so neither enters config_hash.
# "batched-matmul", "reduce-overhead" and "max-autotune" were removed (no measurement chose them).
CHAINS_IN_FLIGHT = ("off", "streams", "batched")
CAPTURE_MODES = ("auto", "none", "graph")

# Fields added after results were committed, left out of config_hash while they hold the value that reproduces the
# pipeline before they existed: every config written before keeps its hash (its records and checkpoints are
# found, nothing is retrained); any other value is hashed, so e.g. teacher_bn="train" is a different config.
_HASHED_UNLESS = {"teacher_bn": "eval", "data_order": "reshuffle", "alpha_hat_bounds": [0.0, 1.0],
                  "model": "resnet50", "label_noise": 0.0}

# Fields that do not change results: left out of config_hash, so a run may move between machines or folders,
# or add seeds, chains or steps, and still reuse every finished step.
# data_root is left out for the data's content: config_hash holds the data's fingerprint instead (data_fingerprint,
# or that of the copy under data_root).
_NOT_HASHED = ("profile", "seeds", "steps", "alphas", "include_alpha_hat", "data_root", "results_dir",
               "checkpoint_dir", "device", "eval_batch_size", "download", "checkpoint_every", "data_fingerprint",
               "eval_every", "test_every", "chains_in_flight", "capture")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
# The fields that take one of a few values, and which.
FIELD_CHOICES = {"profile": PROFILES, "model": MODELS, "lr_schedule": ("constant", "cosine", "step"),
            "teacher_bn": TEACHER_BN_MODES, "data_order": DATA_ORDERS, "chains_in_flight": CHAINS_IN_FLIGHT,
            "capture": CAPTURE_MODES}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class TrainConfig:
    """Everything that defines a run; recorded in full with every result.

    Build with ``TrainConfig.from_profile("paper" | "official" | "fast" | "paper-bf16" | "cpu", **overrides)``, or
    directly: the defaults are the paper profile's values except ``alpha_hat_bounds`` (default (0, 1), the
    pipeline's clipped estimate; the paper profile has None). Invalid values raise ValueError naming the field
    and what was expected. Each field's docstring below is also its ``--help`` text (:func:`field_docs`).
    Results go to the git-ignored ``runs/cifar10`` unless ``results_dir`` names another folder: no default
    points at the committed ``results/``.
    """

    profile: str = "paper"
    """paper: the protocol as the paper describes it (batch 16, Adam 1e-4, 75 epochs, eval-mode teacher, 5,000 held
    out, alpha-hat unbounded); official: the authors' code as it ran (teacher BatchNorm in train mode, all 50,000
    images, one fixed data order, fixed alphas only); fast: batch 256, lr 1e-3, warmup+cosine, bf16 (CUDA);
    paper-bf16: the paper profile in bf16 autocast and channels_last (CUDA); cpu: the small cnn4 network trained to
    convergence on a 2-core CPU (sdlib.config.PROFILES says how each value was chosen)"""
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
    """fraction in [0, 1) of training and validation labels replaced by another class drawn uniformly (exactly
    round(rate * n) of each split, sdlib.data.symmetric_label_noise), the same for every step and chain of a seed;
    test labels stay clean"""
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
    """how the chains of a step train: streams (each its own network, together on the same batches, on its own
    CUDA stream on a GPU; the way for models the batched network does not cover, sdlib.lean_step), batched (one
    batched ResNet-50 network, sdlib.batched) or off (one at a time)"""
    capture: str = "auto"
    """how the training step runs: auto (one CUDA graph on CUDA, eager elsewhere), none (eager) or graph (CUDA
    only)"""
    data_fingerprint: str | None = None
    """the data's fingerprint (16 hex digits, sdlib.data.data_fingerprint): the config's hash then needs no data
    here, and a run refuses other data under data_root; none: that of the data found there"""

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "TrainConfig":
        """The named profile (``"paper"``, ``"official"``, ``"fast"``, ``"paper-bf16"`` or ``"cpu"``) with ``overrides``
        applied (any field names)."""
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

        def integer(name, minimum=1):
            if not _is_int(getattr(self, name)) or getattr(self, name) < minimum:
                fail(name, f"an integer >= {minimum}")
            setattr(self, name, int(getattr(self, name)))

        def sequence(name, expected):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                fail(name, expected)
            return tuple(value)

        for name, choices in FIELD_CHOICES.items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                fail(name, f"one of {list(choices)}")
        if not _is_real(self.label_noise) or not 0.0 <= self.label_noise < 1.0:
            fail("label_noise", "a number in [0, 1) (the fraction of training and validation labels changed)")
        self.label_noise = float(self.label_noise)
        for name in ("epochs", "batch_size", "steps", "eval_batch_size", "checkpoint_every", "eval_every"):
            integer(name)
        if self.batch_size < 2:  # BatchNorm in training mode; the last partial batch of an epoch is dropped
            fail("batch_size", "an integer >= 2 (BatchNorm normalizes over the batch: one image has no batch "
                               "statistics)")
        if self.test_every is not None:
            integer("test_every")
        for name in ("n_val", "warmup_epochs", "split_seed"):
            integer(name, 0)
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"an integer in [0, epochs={self.epochs}]")
        for name, low_open in (("lr", True), ("l2_coef", False)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0 or (low_open and value == 0):
                fail(name, "a finite number > 0" if low_open else "a finite number >= 0")
            setattr(self, name, float(value))
        if self.alpha_hat_bounds is not None:
            bounds = sequence("alpha_hat_bounds", "None or a pair (low, high)")
            if len(bounds) != 2 or not all(_is_real(b) and math.isfinite(b) for b in bounds) or bounds[0] > bounds[1]:
                fail("alpha_hat_bounds", "None (unbounded) or a pair (low, high) of finite numbers with low <= high")
            self.alpha_hat_bounds = tuple(float(b) for b in bounds)
        for name in ("bf16", "channels_last", "include_alpha_hat", "download"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "True or False")
            setattr(self, name, bool(getattr(self, name)))
        if self.subset is not None:
            integer("subset", NUM_CLASSES)  # one image per class

        seeds = sequence("seeds", "a sequence of integers >= 0")
        if not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
            fail("seeds", "a non-empty sequence of distinct integers >= 0")
        self.seeds = tuple(int(s) for s in seeds)
        alphas = sequence("alphas", "a sequence of numbers in [0, 1]")
        if not all(_is_real(a) and 0.0 <= a <= 1.0 for a in alphas):
            fail("alphas", "a sequence of numbers in [0, 1]")
        self.alphas = tuple(float(a) for a in alphas)
        if len(set(self.chains)) != len(self.chains):
            fail("alphas", "distinct values (two alphas give the same chain name)")
        if self.steps >= 2 and not self.chains:
            fail("alphas", "non-empty when include_alpha_hat is False and steps >= 2 (no chain to run)")
        if self.n_val == 0 and self.include_alpha_hat and self.steps >= 2:
            # Algorithm 1 fits alpha on held-out images; the test set is never used for it.
            fail("n_val", "an integer >= 1 while the alpha-hat chain is run (it estimates alpha on the n_val "
                          "validation images, and never on the test set): hold images out, or set "
                          "include_alpha_hat=False (--no-alpha-hat)")

        for name in ("data_root", "results_dir", "checkpoint_dir"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or str(getattr(self, name)) == "":
                fail(name, "a non-empty path")
            setattr(self, name, os.path.expanduser(str(getattr(self, name))))  # "~/r": the home folder
        if self.data_fingerprint is not None and (not isinstance(self.data_fingerprint, str)
                                                  or not _FINGERPRINT.match(self.data_fingerprint)):
            fail("data_fingerprint", "None or 16 lower-case hex digits (sdlib.data.data_fingerprint of the data)")
        if not isinstance(self.device, str) or not (self.device == "auto" or _valid_device(self.device)):
            fail("device", "'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device name")
        if self.chains_in_flight == "batched" and self.model != "resnet50":
            fail("chains_in_flight", f"'streams' or 'off' for model {self.model!r}: the batched network "
                                     "(sdlib.batched) is ResNet-50 only")

    def to_dict(self) -> dict:
        """All fields as a JSON-serializable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def hashed_fields(self) -> dict:
        """The fields that enter :meth:`config_hash`, with the pipeline version (the data's fingerprint aside).

        teacher_bn, data_order and alpha_hat_bounds enter only when they differ from the behaviour the pipeline
        had before they existed ("eval", "reshuffle", [0, 1]), so configs written before keep their hash."""
        payload = {k: v for k, v in self.to_dict().items()
                   if k not in _NOT_HASHED and not (k in _HASHED_UNLESS and v == _HASHED_UNLESS[k])}
        payload["pipeline_version"] = _PIPELINE_VERSION
        return payload

    def resolved_data_fingerprint(self) -> str | None:
        """``data_fingerprint`` if set, else :func:`sdlib.data.data_fingerprint` of ``data_root`` (None where
        no CIFAR-10 is there). Reads and hashes the files once per process (about 1 s), then only stats them."""
        if self.data_fingerprint is not None:
            return self.data_fingerprint
        from sdlib.data import data_fingerprint

        return data_fingerprint(self.data_root)

    def config_hash(self, data_fingerprint: str | None = None) -> str:
        """12 hex digits identifying what changes results: the hashed fields (not seeds/chains/steps, paths,
        device, eval batch) and the data's identity, ``data_fingerprint`` if given, else
        :meth:`resolved_data_fingerprint` (None, hashed as such, where there are no data: no record of real data
        matches it). Records and teachers are reused only under the same hash, so never across data."""
        payload = self.hashed_fields()
        payload["data"] = data_fingerprint if data_fingerprint is not None else self.resolved_data_fingerprint()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def chains(self) -> tuple[str, ...]:
        """The chains of steps >= 2, in training order: fixed alphas as given, then alpha-hat."""
        return tuple(chain_name(a) for a in self.alphas) + ((ALPHA_HAT_CHAIN,) if self.include_alpha_hat else ())


def _valid_device(name: str) -> bool:
    try:
        import torch  # here, not at the top: the book's torch-free environment imports PROFILES
    except ImportError:  # no torch to ask: the usual device names
        return re.fullmatch(r"(cpu|cuda|mps|xpu|meta)(:\d+)?", name) is not None
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def resolve_device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible")
    return device


def device_precision(config: TrainConfig, device: "torch.device") -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) as ``config`` runs them on ``device``. On CUDA: as configured. On the
    CPU: never for ResNet-50 (its CPU runs, the tests' among them, stay float32 and contiguous, as they always
    were); for the small networks bf16 only where the CPU computes bf16 natively (AVX512-BF16 / AMX, which is
    where benchmarks/cpu_throughput.py measured it faster than float32), channels_last as configured."""
    import torch

    if torch.device(device).type == "cuda":
        return config.bf16, config.channels_last
    if torch.device(device).type != "cpu" or config.model == "resnet50":
        return False, False
    return config.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported(), config.channels_last


def effective_config(config: TrainConfig, device: "torch.device") -> TrainConfig:
    """``config`` as it runs on ``device`` (:func:`device_precision`): bf16 autocast and channels_last that do
    not apply there are switched off (with a warning), and the results are recorded and hashed with the values
    actually used."""
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
    """Each TrainConfig field's docstring (the string under it in the class body), in one line: the command
    line's help texts (sdlib.train) are these, so the options are documented once, beside the fields."""
    body = ast.parse(inspect.getsource(TrainConfig)).body[0].body
    return {field.target.id: " ".join(doc.value.value.split()) for field, doc in zip(body, body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}
