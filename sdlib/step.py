"""One step of self-distillation: ResNet-50 trained from a fresh initialization on mixed targets.

The paper's protocol (Borup & Andersen, 2021, Section 5): at every step a ResNet-50 is trained from a fresh
random initialization on the targets

    z = alpha * onehot(y) + (1 - alpha) * softmax(teacher(x)),

where the teacher is the previous step's model (its last epoch, not its best), with the objective
``MSE(softmax(student(x)), z) + l2_coef * sum_W ||W||_2`` (unsquared norms). Read top to bottom: the model, the
loss, the L2 term, evaluation, then :func:`distill_step` (the epoch loop). The chains of steps are in
:mod:`sdlib.chains`, the command line in :mod:`sdlib.train`.

Written for speed and for reading, nanoGPT/airbench style: the data sit on the device as uint8 tensors, a batch
is an index into them, augmentation is a few vectorized tensor ops (:func:`sdlib.data.augment`), no DataLoader,
no framework between the reader and the loop. The host waits for the device once per epoch (and every
``_NAN_CHECK_EVERY`` batches, to stop a diverged run early), never per batch.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from sdlib import data as cifar
from sdlib.config import AUGMENT, DATA_ORDERS, INIT, NUM_CLASSES, ORDER, TEACHER_BN_MODES, TrainConfig, derive_seed
from sdlib.records import write_atomically

__all__ = ["build_model", "distillation_loss", "l2_penalty", "evaluate", "teacher_probs", "epoch_order", "StepResult",
           "distill_step"]

# Host syncs to look for a NaN/inf loss: one per this many batches (and one at every epoch end).
_NAN_CHECK_EVERY = 200


# ------------------------------------------------------------------------------------------ model, loss, penalty


def build_model(seed: int | None = None, step: int = 1) -> torch.nn.Module:
    """torchvision ResNet-50 with 10 outputs and its ImageNet stem (7x7 stride-2 conv + max-pool), as the
    authors used it on 32x32 images. Initialized on the CPU from a stream seeded by ``(seed, step)`` when
    ``seed`` is given (same seed and step: bit-identical weights; the global RNG is left untouched), else from
    the global RNG."""
    if seed is None:
        return torchvision.models.resnet50(num_classes=NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, step, INIT))
        return torchvision.models.resnet50(num_classes=NUM_CLASSES)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * MSE(softmax(s), onehot(y)) + (1 - alpha) * MSE(softmax(s), teacher_probs)``.

    logits : (B, C) student outputs s (any float dtype; the loss is computed in float32, also under autocast).
    labels : (B,) int64 class indices.
    alpha : weight of the ground truth: in [0, 1] for a fixed chain, any real for an unbounded alpha-hat.
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
    with ``return_probs``. With N = 0 (no validation split: ``n_val=0``) acc and loss are None.
    """
    model.eval()
    if len(x_uint8) == 0:
        return {"acc": None, "loss": None, **({"probs": torch.zeros(0, NUM_CLASSES)} if return_probs else {})}
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


def teacher_probs(teacher: torch.nn.Module, x: torch.Tensor, bn_mode: str) -> torch.Tensor:
    """Softmax outputs of the frozen ``teacher`` on the (augmented, normalized) batch ``x``: (B, C) float32, no grad.

    x : (B, 3, H, W), the batch the student sees (under the caller's autocast, if any).
    bn_mode : ``TrainConfig.teacher_bn``.
        "eval": every layer in eval mode; BatchNorm normalizes with its running statistics.
        "train": BatchNorm normalizes with the statistics of this batch (per channel: mean and biased variance
        over B, H, W), as the authors' teacher did (under PyTorch Lightning 1.1.1 it ran in train mode, see
        book/05_protocols.md). Its running statistics are NOT updated (no momentum step, num_batches_tracked
        unchanged): the teacher stays bit-identical to its checkpoint, so a resumed run and the final
        checkpoints on disk are unaffected by distillation. The outputs are the same either way, since in train
        mode BatchNorm never reads its running statistics. Other layers stay in eval mode (ResNet-50 has none
        that differ).
    The teacher is left in eval mode. Called once per batch by :func:`distill_step`.
    """
    if bn_mode not in TEACHER_BN_MODES:
        raise ValueError(f"bn_mode must be one of {TEACHER_BN_MODES}, got {bn_mode!r}")
    teacher.eval()
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] \
        if bn_mode == "train" else []
    tracked = [m.track_running_stats for m in norms]
    try:
        for m in norms:  # training=True, track_running_stats=False: batch statistics, no running-stat update
            m.training, m.track_running_stats = True, False
        with torch.inference_mode():
            logits = teacher(x)
    finally:
        for m, track in zip(norms, tracked):
            m.training, m.track_running_stats = False, track
    # softmax outside inference_mode: the loss saves these targets for its backward pass.
    return torch.softmax(logits.float(), dim=1)


def epoch_order(config: TrainConfig, seed: int, step: int, epoch: int, n: int,
                device: str | torch.device) -> torch.Tensor:
    """The order in which ``epoch`` of ``step`` visits the ``n`` training images: an int64 permutation (n,) on
    ``device``, drawn on the CPU (the same on every device).

    ``config.data_order`` "reshuffle": a new permutation for every (seed, step, epoch), shared by every chain of
    the step (chains differ by their targets only). "fixed": one permutation drawn once from the seed, used for
    every epoch and every step, as the authors' DataLoader (no shuffling) over a ``random_split`` drawn once
    did. Its stream is keyed by (seed, 0, 0): steps and epochs count from 1, so no reshuffled epoch shares it.
    """
    if config.data_order not in DATA_ORDERS:
        raise ValueError(f"TrainConfig.data_order must be one of {DATA_ORDERS}, got {config.data_order!r}")
    key = (seed, 0, 0, ORDER) if config.data_order == "fixed" else (seed, step, epoch, ORDER)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(*key)))
    return order.to(device)


# ----------------------------------------------------------------------------------------------- one step


def _lr_factor(iteration: int, warmup_iters: int, total_iters: int, schedule: str) -> float:
    """Multiplier of the base lr at a batch: linear warmup over ``warmup_iters``, then constant or cosine to 0."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if schedule == "constant":
        return 1.0
    progress = (iteration - warmup_iters) / max(1, total_iters - warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def atomic_torch_save(obj, path: Path) -> None:
    write_atomically(path, lambda handle: torch.save(obj, handle), binary=True)


class CorruptCheckpointError(ValueError):
    """A checkpoint file that torch cannot read; the message names it and says to delete it."""


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """``torch.load`` of a checkpoint written by :func:`atomic_torch_save`; an unreadable one (truncated, not
    a torch file) raises :class:`CorruptCheckpointError` naming the path and what to delete."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict):
            raise TypeError(f"expected a dict, got {type(checkpoint).__name__}")
    except Exception as error:  # RuntimeError (zip), EOFError, UnpicklingError, ...
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({type(error).__name__}: {str(error)[:200]}). Delete it "
            f"(rm {str(path)!r}) and run again: the step it belongs to is trained again from its last readable "
            f"checkpoint, or from the start") from None
    return checkpoint


def cpu_state(module_or_optimizer) -> dict:
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
        """The metrics of the final epoch plus the step totals (the numeric part of a record), and the best test
        accuracy over the evaluated epochs with its epoch (the first, on a tie): what the authors' checkpointing,
        which monitored test accuracy, would have kept. The records report the last epoch; this is beside it."""
        last = self.epochs[-1]
        evaluated = [log for log in self.epochs if log.get("test_acc") is not None]
        best = max(evaluated, key=lambda log: log["test_acc"]) if evaluated else {}
        return {
            "best_test_acc": best.get("test_acc"), "best_test_epoch": best.get("epoch"),
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
    seed, step : select the initialization and, per epoch, the data order (:func:`epoch_order`) and the
        augmentation, both shared by every chain of the step (so chains differ only by their targets) and
        reproducible on a resume.
    alpha : weight of the labels in the targets (a finite number: fixed alphas lie in [0, 1], an unbounded
        alpha-hat may not); ``teacher`` (on the same augmented batch, :func:`teacher_probs` with
        ``config.teacher_bn``) is required when alpha != 1 and ignored at alpha == 1.
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
    if not math.isfinite(alpha):  # fixed alphas lie in [0, 1]; an unbounded alpha-hat may lie outside
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if alpha != 1.0 and teacher is None:
        raise ValueError(f"teacher is required for alpha != 1 (chain {chain!r}, step {step}, alpha {alpha:g})")
    n_train, batch_size = len(data.x_train), config.batch_size
    iters_per_epoch = n_train // batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"TrainConfig.batch_size ({batch_size}) must not exceed the {n_train} training images")
    on_cuda = device.type == "cuda"
    use_bf16 = config.bf16 and on_cuda
    memory_format = torch.channels_last if (config.channels_last and on_cuda) else torch.contiguous_format
    use_teacher = alpha != 1.0

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
        state = load_checkpoint(state_path, map_location=device)
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
        order = epoch_order(config, seed, step, epoch, n_train, device)
        augment_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, epoch, AUGMENT))
        loss_sum = torch.zeros((), device=device)
        lr_used = optimizer.param_groups[0]["lr"]
        for i in range(iters_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            x = cifar.augment(data.x_train[index], generator=augment_gen)
            x = x.contiguous(memory_format=memory_format)
            labels = data.y_train[index]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                targets = teacher_probs(teacher, x, config.teacher_bn) if use_teacher else None
                logits = model(x)
            loss = distillation_loss(logits, labels, alpha, targets)
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
        epoch_bar.set_postfix(test_acc=f"{log['test_acc']:.3f}", loss=f"{train_loss:.4f}")
        if on_epoch is not None:
            on_epoch(log)
        if state_path is not None and epoch < config.epochs and epoch % config.checkpoint_every == 0:
            atomic_torch_save({
                "seed": seed, "chain": chain, "step": step, "alpha": float(alpha), "epoch": epoch,
                "model": cpu_state(model), "optimizer": cpu_state(optimizer), "scheduler": scheduler.state_dict(),
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
