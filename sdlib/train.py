"""Self-distillation chains of ResNet-50 on CIFAR-10: the whole training pipeline in one file.

The paper's protocol (Borup & Andersen, 2021, Section 5): at every step a ResNet-50 is trained from a fresh
random initialization on the targets

    z = alpha * onehot(y) + (1 - alpha) * softmax(teacher(x)),

where the teacher is the previous step's model (its last epoch, not its best). Step 1 is trained on the labels
alone, so one step-1 model per seed starts every chain of that seed. Fixed-alpha chains use one alpha at every
step; the alpha-hat chain estimates alpha at every step by Algorithm 1 (an alpha = 0 "probe" step, then the
least-squares alpha on the validation split, then the step itself).

Written for speed and for reading, nanoGPT/airbench style: the data sit on the device as uint8 tensors, a batch
is an index into them, augmentation is a few vectorized tensor ops (:func:`sdlib.data.augment`), no DataLoader,
no framework between the reader and the loop. The host waits for the device once per epoch (and every
``_NAN_CHECK_EVERY`` batches, to stop a diverged run early), never per batch.

Layout of a run (see :func:`run_chains`)::

    results_dir/records.jsonl        one JSON object per (seed, chain, step): final metrics, config, provenance
    results_dir/epochs.jsonl         one per (seed, chain, step, epoch): the training curves
    results_dir/probe_epochs.jsonl   the same for the alpha-hat chain's alpha = 0 probes (chain "alpha_hat_probe")
    checkpoint_dir/<config_hash>/seed<s>/<chain>/step<t>.pt        final weights, the next step's teacher
    checkpoint_dir/<config_hash>/seed<s>/<chain>/step<t>.state.pt  resumable state while the step trains

Command line: ``python -m sdlib.train --profile fast --epochs 10 --seeds 0 1`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from sdlib import data as cifar
from sdlib.alpha import least_squares_alpha
from sdlib.records import (ALPHA_HAT_CHAIN, EPOCHS_FILE, PROBE_CHAIN, PROBE_EPOCHS_FILE, RECORDS_FILE, SHARED_CHAIN,
                           chain_name, write_atomically)

__all__ = [
    "PROFILES",
    "TrainConfig",
    "StepResult",
    "build_model",
    "distillation_loss",
    "l2_penalty",
    "evaluate",
    "distill_step",
    "run_chains",
    "pending_tasks",
    "effective_config",
    "provenance",
    "chain_name",
    "main",
]

NUM_CLASSES = 10
# Bump when a change of this file changes results: it is part of every config_hash.
_PIPELINE_VERSION = 1
# Host syncs to look for a NaN/inf loss: one per this many batches (and one at every epoch end).
_NAN_CHECK_EVERY = 200
# Seed streams: every random stream of a run is derived from (seed, step[, epoch], purpose).
_INIT, _ORDER, _AUGMENT = 0, 1, 2


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
}

# Fields that do not change results: left out of config_hash, so a run may move between machines or folders,
# or add seeds, chains or steps, and still reuse every finished step.
_NOT_HASHED = ("profile", "seeds", "steps", "alphas", "include_alpha_hat", "data_root", "results_dir",
               "checkpoint_dir", "device", "eval_batch_size", "download", "checkpoint_every")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class TrainConfig:
    """Everything that defines a run; recorded in full with every result.

    Build with ``TrainConfig.from_profile("paper" | "fast", **overrides)`` (or directly: the defaults are the
    paper profile). Invalid values raise ValueError naming the field and what was expected.

    ``profile`` names the profile the values came from (a label: ``from_profile`` applies a profile's values).
    Training: ``epochs`` per step, ``batch_size``, Adam ``lr``, ``l2_coef`` (times the sum over parameter
    tensors of their L2 norm), ``lr_schedule`` "constant" or "cosine" after ``warmup_epochs`` of linear warmup
    (per batch), ``bf16`` autocast and ``channels_last`` (CUDA only). Chains: ``seeds``, ``steps`` (>= 1; step 1
    is the shared labels-only model), fixed ``alphas`` in [0, 1], ``include_alpha_hat``. Data: ``n_val``
    validation images held out of the training set (stratified, ``split_seed``), ``subset`` (None, or an int
    >= 10 cutting every part for smoke runs), ``data_root``, ``download``. Where: ``results_dir``,
    ``checkpoint_dir``, ``device`` ("auto": cuda if available, else cpu), ``eval_batch_size``, and
    ``checkpoint_every`` (epochs between resumable checkpoints; 1 = every epoch).
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

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "TrainConfig":
        """The named profile (``"paper"`` or ``"fast"``) with ``overrides`` applied (any field names)."""
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
        for name in ("epochs", "batch_size", "steps", "n_val", "eval_batch_size", "checkpoint_every"):
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


def _resolve_device(name: str) -> torch.device:
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


def _derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints; distinct tuples give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------------ model, loss, penalty


def build_model(seed: int | None = None, step: int = 1) -> torch.nn.Module:
    """torchvision ResNet-50 with 10 outputs and its ImageNet stem (7x7 stride-2 conv + max-pool), as the
    authors used it on 32x32 images. Initialized on the CPU from a stream seeded by ``(seed, step)`` when
    ``seed`` is given (same seed and step: bit-identical weights; the global RNG is left untouched), else from
    the global RNG."""
    if seed is None:
        return torchvision.models.resnet50(num_classes=NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derive_seed(seed, step, _INIT))
        return torchvision.models.resnet50(num_classes=NUM_CLASSES)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * MSE(softmax(s), onehot(y)) + (1 - alpha) * MSE(softmax(s), teacher_probs)``.

    logits : (B, C) student outputs s (any float dtype; the loss is computed in float32, also under autocast).
    labels : (B,) int64 class indices.
    alpha : weight of the ground truth in [0, 1].
    teacher_probs : (B, C) teacher softmax outputs; may be None only when alpha == 1.
    MSE is the mean over batch x classes (``F.mse_loss``). Returns a float32 scalar.
    """
    if teacher_probs is None and alpha != 1.0:
        raise ValueError(f"teacher_probs is required when alpha != 1, got alpha={alpha!r} and no teacher")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=1)
        loss = alpha * F.mse_loss(probs, F.one_hot(labels, probs.shape[1]).float())
        if alpha != 1.0:
            loss = loss + (1.0 - alpha) * F.mse_loss(probs, teacher_probs.float())
    return loss


def l2_penalty(model: torch.nn.Module, coef: float = 1.0) -> torch.Tensor:
    """``coef * sum over parameter tensors of their L2 norm`` (not squared): the paper's regularizer.

    One fused multi-tensor norm (``torch._foreach_norm``) instead of ~160 separate kernels. At a zero tensor
    (the batch-norm biases at initialization) the gradient is 0, not NaN.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return coef * torch.stack(torch._foreach_norm(params)).sum()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             bf16: bool = False, channels_last: bool = False, return_probs: bool = False) -> dict:
    """Accuracy and loss of ``model`` (put in eval mode) on uint8 images ``x_uint8`` (N, 3, 32, 32), labels (N,).

    loss: MSE between softmax outputs and one-hot labels, mean over N x classes (the alpha = 1 loss without the
    L2 term). Returns ``{"acc", "loss"}`` as floats (one host sync), plus ``"probs"``: float32 (N, C) on the CPU
    with ``return_probs``.
    """
    model.eval()
    device = x_uint8.device
    correct = torch.zeros((), device=device, dtype=torch.int64)
    squared = torch.zeros((), device=device, dtype=torch.float64)
    probs_out = []
    for start in range(0, len(x_uint8), batch_size):
        x = cifar.normalize(x_uint8[start:start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = y[start:start + batch_size]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
        correct += (probs.argmax(dim=1) == labels).sum()
        squared += (probs - F.one_hot(labels, probs.shape[1]).float()).square().sum(dtype=torch.float64)
        if return_probs:
            probs_out.append(probs)
    n = len(x_uint8)
    result = {"acc": correct.item() / n, "loss": squared.item() / (n * NUM_CLASSES)}
    if return_probs:
        result["probs"] = torch.cat(probs_out).cpu()
    return result


# ----------------------------------------------------------------------------------------------- one step


def _lr_factor(iteration: int, warmup_iters: int, total_iters: int, schedule: str) -> float:
    """Multiplier of the base lr at a batch: linear warmup over ``warmup_iters``, then constant or cosine to 0."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if schedule == "constant":
        return 1.0
    progress = (iteration - warmup_iters) / max(1, total_iters - warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _atomic_torch_save(obj, path: Path) -> None:
    write_atomically(path, lambda handle: torch.save(obj, handle), binary=True)


def _cpu_state(module_or_optimizer) -> dict:
    return _to_cpu(module_or_optimizer.state_dict())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class StepResult:
    """What :func:`distill_step` returns.

    model : the trained network after its last epoch (eval mode, on the training device).
    epochs : one dict per epoch (epoch, train_loss, val_acc, val_loss, test_acc, test_loss, lr, wall_time_s,
        images_per_s); a resumed step includes the epochs of the earlier session.
    val_probs : float32 (n_val, 10) softmax outputs of the final model on the validation split, on the CPU.
    train_images, train_time_s, wall_time_s : totals over the step (training loop only / everything).
    """

    model: torch.nn.Module
    epochs: list[dict]
    val_probs: torch.Tensor
    train_images: int
    train_time_s: float
    wall_time_s: float

    @property
    def images_per_s(self) -> float:
        return self.train_images / self.train_time_s if self.train_time_s > 0 else float("nan")

    def summary(self) -> dict:
        """The metrics of the final epoch plus the step totals (the numeric part of a record)."""
        last = self.epochs[-1]
        return {
            "epochs": last["epoch"],
            "val_acc": last["val_acc"], "val_loss": last["val_loss"],
            "test_acc": last["test_acc"], "test_loss": last["test_loss"],
            "train_loss": last["train_loss"],
            "wall_time_s": self.wall_time_s, "images_per_s": self.images_per_s,
            "train_images": self.train_images, "train_time_s": self.train_time_s,
        }


def distill_step(config: TrainConfig, data, *, seed: int, step: int, alpha: float,
                 teacher: torch.nn.Module | None = None, chain: str = "", device: str | torch.device = "cpu",
                 state_path: str | os.PathLike | None = None, callback: Callable[[dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> StepResult:
    """Train one model of one step of a chain, from a fresh initialization seeded by ``(seed, step)``.

    config : the run's :class:`TrainConfig` (epochs, batch, lr, schedule, l2_coef, bf16, channels_last, ...).
    data : a :class:`sdlib.data.CIFAR10Splits` (or anything with x_train/y_train/x_val/y_val/x_test/y_test:
        uint8 (N, 3, 32, 32) images and int64 (N,) labels on ``device``).
    seed, step : select the initialization and, per epoch, the data order and augmentation, both shared by
        every chain of the step (so chains differ only by their targets) and reproducible on a resume.
    alpha : weight of the labels in the targets; ``teacher`` (used in eval mode on the same augmented batch,
        under inference_mode) is required when alpha < 1 and ignored at alpha == 1.
    chain : name used in logs, events and errors.
    state_path : where the resumable state (model, optimizer, scheduler, epoch, logs so far) is saved every
        ``config.checkpoint_every`` epochs; if the file exists, training resumes from it.
    on_epoch(log) : called at each epoch end with the epoch's log, before the state is saved (run_chains
        writes epochs.jsonl here; an epoch redone after a crash is rewritten, not duplicated).
    callback(event) : called at each epoch end after the state is saved, with ``event="epoch_end"``, the log and
        ``epochs``; raising from it interrupts a step that can be resumed from that epoch.

    The last partial batch of an epoch is dropped (a batch of one cannot be batch-normalized). The learning
    rate follows the schedule per batch. ``train_loss`` in the logs is the epoch's mean of the minimized
    objective (distillation loss + L2 term); val/test ``loss`` is the MSE to one-hot labels (no L2 term).
    A NaN or inf training loss raises FloatingPointError naming seed, chain, step and epoch.
    """
    device = torch.device(device)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if alpha < 1.0 and teacher is None:
        raise ValueError(f"teacher is required for alpha < 1 (chain {chain!r}, step {step}, alpha {alpha:g})")
    n_train, batch_size = len(data.x_train), config.batch_size
    iters_per_epoch = n_train // batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"TrainConfig.batch_size ({batch_size}) must not exceed the {n_train} training images")
    on_cuda = device.type == "cuda"
    use_bf16 = config.bf16 and on_cuda
    memory_format = torch.channels_last if (config.channels_last and on_cuda) else torch.contiguous_format
    use_teacher = alpha < 1.0

    model = build_model(seed, step).to(device, memory_format=memory_format)
    # Adam without weight decay: the paper's regularizer is the (unsquared) L2 norm term in the loss.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True if on_cuda else None)
    total_iters = config.epochs * iters_per_epoch
    warmup_iters = config.warmup_epochs * iters_per_epoch

    def lr_lambda(iteration):
        return _lr_factor(iteration, warmup_iters, total_iters, config.lr_schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    logs: list[dict] = []
    start_epoch, train_images, train_time, wall_time = 0, 0, 0.0, 0.0
    val_probs = None
    state_path = Path(state_path) if state_path is not None else None
    state = None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if (state["seed"], state["chain"], state["step"], state["alpha"]) != (seed, chain, step, float(alpha)):
            warnings.warn(f"ignoring {state_path}: it holds seed={state['seed']}, chain={state['chain']!r}, "
                          f"step={state['step']}, alpha={state['alpha']}, not this step's", RuntimeWarning)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, logs = state["epoch"], list(state["logs"])
        train_images, train_time, wall_time = state["train_images"], state["train_time_s"], state["wall_time_s"]
    if use_teacher:
        teacher.eval()

    where = f"seed={seed}, chain={chain!r}, step={step}"
    epoch_bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"epochs ({chain} step {step})",
                     initial=start_epoch, total=config.epochs, leave=False, disable=not progress)
    for epoch in epoch_bar:
        epoch_start = time.perf_counter()
        model.train()
        # Same order and augmentation for every chain of (seed, step): chains differ by their targets only.
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(_derive_seed(seed, step, epoch,
                                                                                             _ORDER)))
        order = order.to(device)
        augment_gen = torch.Generator(device=device).manual_seed(_derive_seed(seed, step, epoch, _AUGMENT))
        loss_sum = torch.zeros((), device=device)
        lr_used = optimizer.param_groups[0]["lr"]
        for i in range(iters_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            x = cifar.augment(data.x_train[index], generator=augment_gen)
            x = x.contiguous(memory_format=memory_format)
            labels = data.y_train[index]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                teacher_probs = None
                if use_teacher:
                    with torch.inference_mode():
                        teacher_logits = teacher(x)
                    # softmax outside inference_mode: the loss saves these targets for its backward pass.
                    teacher_probs = torch.softmax(teacher_logits.float(), dim=1)
                logits = model(x)
            loss = distillation_loss(logits, labels, alpha, teacher_probs)
            if config.l2_coef:
                loss = loss + l2_penalty(model, config.l2_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum += loss.detach()
            if (i + 1) % _NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                _raise_non_finite(loss_sum, where, epoch, i + 1)
        train_loss = loss_sum.item() / iters_per_epoch  # the once-per-epoch sync
        if not math.isfinite(train_loss):
            _raise_non_finite(loss_sum, where, epoch, iters_per_epoch)
        epoch_train_time = time.perf_counter() - epoch_start
        evals = {}
        for part in ("val", "test"):
            evals[part] = evaluate(model, getattr(data, f"x_{part}"), getattr(data, f"y_{part}"),
                                   config.eval_batch_size, bf16=use_bf16,
                                   channels_last=memory_format is torch.channels_last,
                                   return_probs=(part == "val" and epoch == config.epochs))
        val_probs = evals["val"].pop("probs", val_probs)
        train_images += iters_per_epoch * batch_size
        train_time += epoch_train_time
        epoch_wall = time.perf_counter() - epoch_start
        wall_time += epoch_wall
        log = {
            "seed": seed, "chain": chain, "step": step, "epoch": epoch, "train_loss": train_loss,
            "val_acc": evals["val"]["acc"], "val_loss": evals["val"]["loss"],
            "test_acc": evals["test"]["acc"], "test_loss": evals["test"]["loss"],
            "lr": lr_used, "wall_time_s": epoch_wall,
            "images_per_s": iters_per_epoch * batch_size / epoch_train_time,
        }
        logs.append(log)
        epoch_bar.set_postfix(val_acc=f"{log['val_acc']:.3f}", loss=f"{train_loss:.4f}")
        if on_epoch is not None:
            on_epoch(log)
        if state_path is not None and epoch < config.epochs and epoch % config.checkpoint_every == 0:
            _atomic_torch_save({
                "seed": seed, "chain": chain, "step": step, "alpha": float(alpha), "epoch": epoch,
                "model": _cpu_state(model), "optimizer": _cpu_state(optimizer), "scheduler": scheduler.state_dict(),
                "logs": logs, "train_images": train_images, "train_time_s": train_time, "wall_time_s": wall_time,
            }, state_path)
        if callback is not None:
            callback({"event": "epoch_end", **log, "epochs": config.epochs})
    epoch_bar.close()
    model.eval()
    return StepResult(model=model, epochs=logs, val_probs=val_probs, train_images=train_images,
                      train_time_s=train_time, wall_time_s=wall_time)


def _raise_non_finite(loss_sum: torch.Tensor, where: str, epoch: int, batches: int):
    raise FloatingPointError(
        f"non-finite training loss ({loss_sum.item()}) at {where}, epoch={epoch} (within its first {batches} "
        f"batches); the run stops here and earlier results are kept. Lower TrainConfig.lr or check the data."
    )


# --------------------------------------------------------------------------------------- records and provenance


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` + ".lock" (concurrent jobs writing one results_dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomically(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows))


def _upsert_jsonl(path: Path, new_rows: list[dict], key_fields: tuple[str, ...]) -> None:
    """Rewrite ``path`` atomically (under its lock) with ``new_rows`` replacing rows of the same key."""
    with _locked(path):
        keys = {tuple(row[k] for k in key_fields) for row in new_rows}
        rows = [row for row in _read_jsonl(path) if tuple(row.get(k) for k in key_fields) not in keys]
        _write_jsonl_atomic(path, rows + new_rows)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or device.type


def provenance(device: torch.device) -> dict:
    """Where and with what a result was produced (the date is filled in per record).

    ``git_commit`` is the environment variable ``SDLIB_GIT_COMMIT`` where set (a launcher that ran a copy of a
    commit says which; ``git_dirty`` is then None: unknown), else git's HEAD, else "unknown".
    """
    # A launcher that ships a copy of the working tree (a batch machine) names the commit it sent: that copy's
    # .git, if any, need not be the one the tree was taken from.
    commit = os.environ.get("SDLIB_GIT_COMMIT") or None
    status = None
    if commit is None:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------- chains


class _ChainRunner:
    """The bookkeeping of :func:`run_chains`: which model of (seed, chain, step) exists where, and training
    the missing ones with the right teacher."""

    def __init__(self, config: TrainConfig, device: torch.device, progress: bool, callback):
        self.config, self.device, self.progress, self.callback = config, device, progress, callback
        self.hash = config.config_hash()
        self.results_dir = Path(config.results_dir)
        self.ckpt_root = Path(config.checkpoint_dir) / self.hash
        self.records = {(r["seed"], r["chain"], r["step"]): r
                        for r in _read_jsonl(self.results_dir / RECORDS_FILE) if r.get("config_hash") == self.hash}
        self.data = None
        self.provenance = None
        self.models: dict[tuple, torch.nn.Module] = {}  # final models of the latest step, as teachers
        self.summaries: dict[tuple, dict] = {}  # metrics + val_probs of every model met so far

    def final_path(self, seed, chain, step) -> Path:
        return self.ckpt_root / f"seed{seed}" / chain / f"step{step}.pt"

    def state_path(self, seed, chain, step) -> Path:
        return self.ckpt_root / f"seed{seed}" / chain / f"step{step}.state.pt"

    def ensure_data(self):
        if self.data is None:
            c = self.config
            self.data = cifar.load_splits(c.data_root, n_val=c.n_val, split_seed=c.split_seed, subset=c.subset,
                                          device=self.device, download=c.download)
            self.provenance = provenance(self.device)

    def teacher_key(self, seed, chain, step):
        """The model a step of ``chain`` distills from: the previous step of its chain (the shared model at 2)."""
        previous = ALPHA_HAT_CHAIN if chain in (ALPHA_HAT_CHAIN, PROBE_CHAIN) else chain
        return (seed, SHARED_CHAIN, 1) if step == 2 else (seed, previous, step - 1)

    def _load_or_train(self, key, cache: dict):
        """``cache[key]``: in memory, else from the final checkpoint of ``key``, else trained (again)."""
        if key not in cache:
            if self.final_path(*key).is_file():
                self.load_final(key)
            else:
                self.train(key)
        return cache[key]

    def model(self, key) -> torch.nn.Module:
        """The final model of ``key`` (a teacher)."""
        return self._load_or_train(key, self.models)

    def summary(self, key) -> dict:
        """Metrics and validation softmax outputs of ``key`` (a probe's are all the alpha-hat chain needs)."""
        return self._load_or_train(key, self.summaries)

    def load_final(self, key):
        checkpoint = torch.load(self.final_path(*key), map_location="cpu", weights_only=True)
        memory_format = torch.channels_last if (self.config.channels_last and self.device.type == "cuda") \
            else torch.contiguous_format
        model = build_model().to(self.device, memory_format=memory_format)
        model.load_state_dict(checkpoint["model"])
        self.models[key] = model.eval()
        self.summaries[key] = checkpoint["summary"]

    def alpha_for(self, key) -> tuple[float, dict]:
        """The alpha of a step and, for the alpha-hat chain, the probe's alpha_hat / accuracies."""
        seed, chain, step = key
        if chain == SHARED_CHAIN:
            return 1.0, {}
        if chain == PROBE_CHAIN:
            return 0.0, {}
        if chain != ALPHA_HAT_CHAIN:
            return float(chain.split("=", 1)[1]), {}
        probe = self.summary(self.probe_key(seed, step))
        f1 = self.summary((seed, SHARED_CHAIN, 1))["val_probs"]
        self.ensure_data()
        onehot = F.one_hot(self.data.y_val.cpu(), NUM_CLASSES).double().numpy()
        f1, g = f1.cpu().double().numpy(), probe["val_probs"].cpu().double().numpy()
        alpha_hat = least_squares_alpha(onehot, f1, g)
        return alpha_hat, {"alpha_hat": alpha_hat, "probe_val_acc": probe["val_acc"],
                           "probe_test_acc": probe["test_acc"]}

    def probe_key(self, seed, step):
        # At step 2 the probe (alpha = 0, teacher = the shared model, init and data order seeded by (seed, 2))
        # is exactly the alpha = 0 chain's step 2: reuse it when that chain is part of the run.
        if step == 2 and 0.0 in self.config.alphas:
            return (seed, chain_name(0.0), 2)
        return (seed, PROBE_CHAIN, step)

    def train(self, key):
        seed, chain, step = key
        alpha, extra = self.alpha_for(key)
        teacher = self.model(self.teacher_key(*key)) if alpha < 1.0 else None
        self.ensure_data()
        epochs_file = self.results_dir / (PROBE_EPOCHS_FILE if chain == PROBE_CHAIN else EPOCHS_FILE)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_path(*key)

        def on_epoch(log):
            _upsert_jsonl(epochs_file, [{**log, "config_hash": self.hash}], ("seed", "chain", "step", "epoch"))

        result = distill_step(self.config, self.data, seed=seed, step=step, alpha=alpha, teacher=teacher,
                              chain=chain, device=self.device, state_path=state_path, callback=self.callback,
                              on_epoch=on_epoch, progress=self.progress)
        summary = {**result.summary(), "alpha": float(alpha), **extra, "val_probs": result.val_probs}
        _atomic_torch_save({"model": _cpu_state(result.model), "summary": summary, "config_hash": self.hash,
                            "seed": seed, "chain": chain, "step": step}, self.final_path(*key))
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
        self.summaries[key] = summary
        if chain != PROBE_CHAIN:  # a probe is never a teacher: only its summary is kept
            self.models[key] = result.model
            self.write_record(key)
        if self.callback is not None:
            metrics = {k: v for k, v in summary.items() if k != "val_probs"}
            self.callback({"event": "step_end", "seed": seed, "chain": chain, "step": step,
                           "epoch": self.config.epochs, **metrics, "record": self.records.get(key)})

    def write_record(self, key):
        seed, chain, step = key
        s = self.summaries[key]
        self.ensure_data()
        record = {
            "seed": seed, "chain": chain, "step": step, "alpha": s["alpha"],
            "alpha_hat": s.get("alpha_hat"), "probe_val_acc": s.get("probe_val_acc"),
            "probe_test_acc": s.get("probe_test_acc"),
            "epochs": s["epochs"], "val_acc": s["val_acc"], "val_loss": s["val_loss"], "test_acc": s["test_acc"],
            "test_loss": s["test_loss"], "train_loss": s["train_loss"], "wall_time_s": s["wall_time_s"],
            "images_per_s": s["images_per_s"],
            "profile": self.config.profile, "config_hash": self.hash, "config": self.config.to_dict(),
            "provenance": {**self.provenance, "date": _utc_now()}, "data": self.data.meta,
        }
        # One record per (seed, chain, step) in a results_dir: a record of another config is replaced.
        _upsert_jsonl(self.results_dir / RECORDS_FILE, [record], ("seed", "chain", "step"))
        self.records[key] = record

    def release_before(self, seed, step):
        """Free the models no later step needs (teachers are always the previous step)."""
        for key in [k for k in self.models if k[0] != seed or k[2] < step]:
            del self.models[key]


def _tasks(config: TrainConfig) -> list[tuple[int, str, int]]:
    """(seed, chain, step) in training order: per seed, step by step, every chain of a step in turn (the
    chains of one step are independent of each other, which a batched trainer can exploit)."""
    tasks = []
    for seed in config.seeds:
        tasks.append((seed, SHARED_CHAIN, 1))
        for step in range(2, config.steps + 1):
            tasks.extend((seed, chain, step) for chain in config.chains)
    return tasks


def pending_tasks(config: TrainConfig) -> list[tuple[int, str, int]]:
    """The (seed, chain, step) of ``config`` with no record of its ``config_hash`` in ``results_dir`` yet, in
    training order: what :func:`run_chains` would train (the alpha-hat probes, which have no records, aside).
    Reads ``records.jsonl`` only (no torch work, no data). With ``device="auto"`` the records sought are those
    of the config as given (a CUDA run's); with a named device, those of :func:`effective_config` there."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.device != "auto":
        with warnings.catch_warnings():  # the run itself warns about bf16 / channels_last off the GPU
            warnings.simplefilter("ignore", RuntimeWarning)
            config = effective_config(config, torch.device(config.device))
    config_hash = config.config_hash()
    done = {(r["seed"], r["chain"], r["step"]) for r in _read_jsonl(Path(config.results_dir) / RECORDS_FILE)
            if r.get("config_hash") == config_hash}
    return [task for task in _tasks(config) if task not in done]


def run_chains(config: TrainConfig, progress: bool = True, callback: Callable[[dict], None] | None = None
               ) -> list[dict]:
    """Train every (seed, chain, step) of ``config`` that is not finished yet; return all their records.

    Per seed: the shared step-1 model (labels only, chain ``"shared"``), then for each step t >= 2 every fixed
    alpha chain (teacher: the chain's step t-1, or the shared model at t = 2) and the alpha-hat chain (an
    alpha = 0 probe from the previous alpha-hat model, alpha-hat = :func:`sdlib.alpha.least_squares_alpha` of
    one-hot validation labels, step-1 and probe validation softmax outputs, then step t with alpha-hat).

    Finished steps (a record with this config's ``config_hash`` in ``results_dir/records.jsonl``) are skipped
    without loading data; an unfinished one resumes from its last epoch checkpoint. As ``config_hash`` leaves
    out seeds, chains and steps, a run can be extended (more seeds, alphas or steps) and reuses what exists.
    The records file keeps one record per (seed, chain, step): a record of another config is replaced (with
    a warning at the start). Data are loaded once per call (:func:`sdlib.data.load_splits`).

    ``callback(event)`` receives a dict at every epoch end (``event="epoch_end"``: seed, chain, step, epoch,
    epochs and the epoch's metrics) and at every step end (``event="step_end"``: seed, chain, step, epoch,
    the step's metrics incl. train_images and train_time_s, and ``record``, None for a probe); raising from it
    stops the run, which a later call resumes. The alpha-hat probes have chain ``"alpha_hat_probe"``.

    Returns one record per (seed, chain, step) of the config, in training order (step 1 once per seed, chain
    ``"shared"``; the other chains from step 2): seed, chain, step, alpha (alpha-hat for the alpha-hat chain),
    alpha_hat, probe_val_acc, probe_test_acc (alpha-hat chain; else None), epochs, val_acc, val_loss, test_acc,
    test_loss (accuracies in [0, 1]; losses: MSE of softmax outputs to one-hot labels), train_loss (last epoch,
    objective incl. the L2 term), wall_time_s, images_per_s (training images per second), profile,
    config_hash, config (the effective :meth:`TrainConfig.to_dict`), provenance, data (the splits' meta).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {callback!r}")
    device = _resolve_device(config.device)
    config = effective_config(config, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    runner = _ChainRunner(config, device, progress, callback)
    tasks = _tasks(config)
    pending = [task for task in tasks if task not in runner.records]
    stale = {r.get("config_hash") for r in _read_jsonl(runner.results_dir / RECORDS_FILE)} - {runner.hash}
    if pending and stale:
        warnings.warn(f"{runner.results_dir / RECORDS_FILE} holds records of other configs {sorted(stale)}; "
                      f"records of this config ({runner.hash}) replace them step by step", RuntimeWarning,
                      stacklevel=2)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="self-distillation", unit="step",
               disable=not progress or not pending)
    for seed, chain, step in tasks:
        if (seed, chain, step) in runner.records:
            continue
        bar.set_description(f"seed {seed} step {step} {chain}")
        runner.release_before(seed, step - 1)
        if runner.final_path(seed, chain, step).is_file():  # trained, but stopped before its record
            runner.load_final((seed, chain, step))
            runner.write_record((seed, chain, step))
        else:
            runner.train((seed, chain, step))
        bar.update(1)
    bar.close()
    return [runner.records[task] for task in tasks]


# ----------------------------------------------------------------------------------------------- command line


def _parse_list(kind, name):
    """argparse type for one token of a list option: "0,1,2" or "0" (several tokens are joined later)."""
    def parse(text: str):
        try:
            return tuple(kind(part) for part in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a list of {kind.__name__}s such as "
                                             f"{'0,1,2' if kind is int else '0,0.5,1'}, got {text!r}") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlib.train",
                                description="Self-distillation chains of ResNet-50 on CIFAR-10 (resumable).")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="paper (default): the authors' protocol; fast: batch 256, lr 1e-3, warmup+cosine, bf16 "
                        "(CUDA)")
    p.add_argument("--epochs", type=int, help="epochs per step")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--l2-coef", type=float)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"))
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--seeds", type=_parse_list(int, "--seeds"), nargs="+", help="e.g. 0,1,2,3 or 0 1 2 3")
    p.add_argument("--steps", type=int, help="steps per chain (step 1 is the shared labels-only model)")
    p.add_argument("--alphas", type=_parse_list(float, "--alphas"), nargs="+",
                   help="fixed alphas, e.g. 0,0.5,1 or 0 0.5 1 ('' for none)")
    p.add_argument("--no-alpha-hat", action="store_true", help="leave out the alpha-hat chain")
    p.add_argument("--n-val", type=int)
    p.add_argument("--split-seed", type=int)
    p.add_argument("--subset", type=int, help="cut every part to this many images (smoke runs)")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if absent")
    p.add_argument("--results-dir")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--checkpoint-every", type=int, help="epochs between resumable checkpoints")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


# Flags of _parser() that are not TrainConfig fields under their own name.
_FLAGS = {"no_alpha_hat": ("include_alpha_hat", False), "no_bf16": ("bf16", False),
          "no_channels_last": ("channels_last", False), "download": ("download", True)}


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that the parsed options of :func:`_parser` set (options not given are left out;
    so are ``profile`` and ``no_progress``, and the options a caller added to the parser)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"profile"} - set(_FLAGS)  # --download: a flag
    overrides = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    for name in ("seeds", "alphas"):  # nargs="+" of comma lists -> one flat tuple
        if name in overrides:
            overrides[name] = tuple(value for token in overrides[name] for value in token)
    overrides.update(setting for flag, setting in _FLAGS.items() if getattr(args, flag))
    return overrides


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: parse, build the TrainConfig (invalid values: a clear error and exit code 2), run."""
    parser = _parser()
    args = parser.parse_args(argv)
    trained = []  # step_end events of the models trained by this call

    def collect(event):
        if event["event"] == "step_end":
            trained.append(event)

    try:
        config = TrainConfig.from_profile(args.profile or "paper", **config_overrides(args))
        start = time.perf_counter()
        records = run_chains(config, progress=not args.no_progress, callback=collect)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    images = sum(event["train_images"] for event in trained)
    seconds = sum(event["train_time_s"] for event in trained)
    print(f"{len(records)} records in {config.results_dir} (config_hash {records[0]['config_hash']}); "
          f"{len(trained)} model(s) trained in {time.perf_counter() - start:.1f} s")
    if trained:
        print(f"training throughput: {images / seconds:.1f} images/s ({images} images in {seconds:.1f} s)")
    else:
        print("nothing to train: every step of this config was already finished")
    return records


if __name__ == "__main__":
    main()
