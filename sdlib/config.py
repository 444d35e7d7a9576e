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
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdlib.records import ALPHA_HAT_CHAIN, chain_name

__all__ = ["PROFILES", "CHAINS_IN_FLIGHT", "CAPTURE_MODES", "TrainConfig", "effective_config", "resolve_device",
           "derive_seed", "NUM_CLASSES", "TEACHER_BN_MODES", "DATA_ORDERS", "MODELS", "device_precision"]

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
# Adam 2e-3 with one warm-up epoch and cosine decay to 0, bf16 autocast and channels_last on CPUs with native
# bf16 (AVX512-BF16 / AMX; elsewhere float32, recorded so), validation every epoch, test at the last. Speed
# settings measured by benchmarks/cpu_throughput.py; the epochs by the plateau of the validation curve (the last
# fifth of the epochs within 0.5 points of the final value): at 15 epochs and 2,000 held-out images 9 of the first
# 13 models per noise level missed it (worst 1.1 points, still rising under the cosine's last epochs); at 20 epochs
# step 1 ended 74.5 74.0 73.9 73.9 (clean) and 40.9 40.5 40.5 40.8 (40 % noise), the remaining jitter that of
# 2,000 images, hence 5,000 held out. Batch 128 was slower here (1,150 against 1,180 images/s on one thread).
PROFILES["cpu"] = dict(model="cnn4", epochs=20, batch_size=256, lr=2e-3, lr_schedule="cosine", warmup_epochs=1,
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
    and what was expected.

    ``profile`` names the profile the values came from (a label: ``from_profile`` applies a profile's values).
    ``model``: the network, one of :data:`MODELS` ("resnet50", the paper's; "cnn4", the small CPU network,
    :mod:`sdlib.models`). Training: ``epochs`` per step, ``batch_size``, Adam ``lr``, ``l2_coef`` (times the sum over parameter
    tensors of their L2 norm), ``lr_schedule`` "constant" or "cosine" after ``warmup_epochs`` of linear warmup
    (per batch), ``bf16`` autocast and ``channels_last`` (CUDA only), ``teacher_bn``: "eval" (the teacher's
    BatchNorm uses its running statistics) or "train" (the statistics of each batch, as the authors' teacher
    ran; its running statistics are not changed, see :func:`sdlib.models.teacher_probs`), ``data_order``:
    "reshuffle" (a new permutation every epoch) or "fixed" (one permutation of the seed for every epoch and
    step, :func:`sdlib.step.epoch_order`). Chains: ``seeds``, ``steps`` (>= 1; step 1 is the shared labels-only
    model), fixed ``alphas`` in [0, 1], ``include_alpha_hat``, ``alpha_hat_bounds``: (low, high) to clip
    Algorithm 1's least-squares alpha to, or None (unbounded, as the paper writes it). Data: ``n_val``
    validation images held out of the training set (stratified, ``split_seed``; 0 trains on all of it, and
    then the alpha-hat chain, which needs them, is refused), ``subset`` (None, or an int >= 10 cutting every
    part for smoke runs), ``label_noise``: the fraction in [0, 1) of training and validation labels replaced by
    another class drawn uniformly (exactly ``round(rate * n)`` of each split, :func:`sdlib.data.symmetric_label_noise`,
    seeded by the run's seed: the same labels for every step and chain of a seed; the test labels stay clean),
    ``data_root``, ``download``. Where: ``results_dir``,
    ``checkpoint_dir``, ``device`` ("auto": cuda if available, else cpu), ``eval_batch_size``, and
    ``checkpoint_every`` (epochs between resumable checkpoints; 1 = every epoch). Speed (none of these enters
    config_hash): ``eval_every`` (epochs between evaluations; the last epoch is always evaluated and is what
    the records hold), ``test_every`` (None: as ``eval_every``; else epochs between evaluations of the test
    set alone, so that the validation curve can be followed every epoch at the cost of 2,000 images, not
    12,000), ``chains_in_flight`` ("streams": the chains of one (seed, step) train together on the
    same batches, each its own network, on its own CUDA stream on a GPU; "batched": as one batched network,
    :mod:`sdlib.batched`; "off": one model at a time; see :mod:`sdlib.lean_step`), ``capture`` ("auto": the
    step as one CUDA graph on CUDA, eager elsewhere; "none"; "graph").

    ``data_fingerprint`` (None, or the 16 hex digits of :func:`sdlib.data.data_fingerprint`) pins the data a
    config is for: its hash then needs no data on this machine (a sweep file, a dry run), and a run refuses
    other data under ``data_root``. None: the fingerprint of the copy under ``data_root``.

    Results go to the git-ignored ``runs/cifar10`` unless ``results_dir`` says otherwise: the committed
    ``results/`` of the repository is written only when a caller names it (``--results-dir results/cifar10``,
    ``results_dir=`` in a TrainConfig, a sweep file or a notebook parameter); no default points there.
    """

    profile: str = "paper"
    model: str = "resnet50"
    epochs: int = 75
    batch_size: int = 16
    lr: float = 1e-4
    l2_coef: float = 1e-4
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    bf16: bool = False
    channels_last: bool = False
    teacher_bn: str = "eval"
    data_order: str = "reshuffle"
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 5
    alphas: tuple[float, ...] = _PAPER_ALPHAS
    include_alpha_hat: bool = True
    alpha_hat_bounds: tuple[float, float] | None = (0.0, 1.0)
    n_val: int = 5000
    split_seed: int = 0
    subset: int | None = None
    label_noise: float = 0.0
    data_root: str = "data/cifar10"
    results_dir: str = "runs/cifar10"
    checkpoint_dir: str = "checkpoints/cifar10"
    device: str = "auto"
    eval_batch_size: int = 1000
    download: bool = False
    checkpoint_every: int = 1
    eval_every: int = 5
    test_every: int | None = None
    chains_in_flight: str = "streams"
    capture: str = "auto"
    data_fingerprint: str | None = None

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
            setattr(self, name, os.path.expanduser(str(value)))  # "~/r": the home folder, never a folder "~"

        if self.profile not in PROFILES:
            fail("profile", f"one of {sorted(PROFILES)}")
        if self.model not in MODELS:
            fail("model", f"one of {list(MODELS)}")
        rate = self.label_noise
        if not _is_real(rate) or not 0.0 <= rate < 1.0:
            fail("label_noise", "a number in [0, 1) (the fraction of training and validation labels changed)")
        self.label_noise = float(rate)
        for name in ("epochs", "batch_size", "steps", "eval_batch_size", "checkpoint_every", "eval_every"):
            positive_int(name)
        if self.batch_size < 2:  # BatchNorm in training mode; the last partial batch of an epoch is dropped
            fail("batch_size", "an integer >= 2 (BatchNorm normalizes over the batch: one image has no batch "
                               "statistics)")
        if self.test_every is not None:
            positive_int("test_every")
        positive_int("n_val", 0)
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
        if self.teacher_bn not in TEACHER_BN_MODES:
            fail("teacher_bn", "'eval' (running statistics) or 'train' (batch statistics)")
        if self.data_order not in DATA_ORDERS:
            fail("data_order", "'reshuffle' (every epoch) or 'fixed' (one permutation for every epoch and step)")
        if self.alpha_hat_bounds is not None:
            bounds = self.alpha_hat_bounds
            if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__iter__") or len(tuple(bounds)) != 2 \
                    or not all(_is_real(b) and math.isfinite(b) for b in bounds) or bounds[0] > bounds[1]:
                fail("alpha_hat_bounds", "None (unbounded) or a pair (low, high) of finite numbers with low <= high")
            self.alpha_hat_bounds = tuple(float(b) for b in bounds)
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
        if self.n_val == 0 and self.include_alpha_hat and self.steps >= 2:
            # Algorithm 1 fits alpha on held-out images; the test set is never used for it.
            fail("n_val", "an integer >= 1 while the alpha-hat chain is run (it estimates alpha on the n_val "
                          "validation images, and never on the test set): hold images out, or set "
                          "include_alpha_hat=False (--no-alpha-hat)")

        for name in ("data_root", "results_dir", "checkpoint_dir"):
            path(name)
        if self.data_fingerprint is not None and (not isinstance(self.data_fingerprint, str)
                                                  or not _FINGERPRINT.match(self.data_fingerprint)):
            fail("data_fingerprint", "None or 16 lower-case hex digits (sdlib.data.data_fingerprint of the data)")
        if not isinstance(self.device, str) or not (self.device == "auto" or _valid_device(self.device)):
            fail("device", "'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device name")
        if self.chains_in_flight not in CHAINS_IN_FLIGHT:
            fail("chains_in_flight", f"one of {list(CHAINS_IN_FLIGHT)}")
        if self.chains_in_flight == "batched" and self.model != "resnet50":
            fail("chains_in_flight", f"'streams' or 'off' for model {self.model!r}: the batched network "
                                     "(sdlib.batched) is ResNet-50 only")
        if self.capture not in CAPTURE_MODES:
            fail("capture", f"one of {list(CAPTURE_MODES)}")

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
