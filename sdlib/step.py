"""One step of self-distillation (Borup & Andersen, 2021, Section 5): a network trained from a fresh initialization
on targets mixed from the labels and the previous step's model (its last epoch, not its best).

:func:`train_on_batch` is that step for one batch as a reader writes it; :func:`distill_group` after it is the epoch
loop, which runs the same step through :class:`sdlib.lean_step.LeanStep`, the fast path tested equal to it. The
networks are in :mod:`sdlib.models`, the chains of steps in :mod:`sdlib.chains`.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdlib.augment import normalize
from sdlib.config import AUGMENT, DATA_ORDERS, NUM_CLASSES, ORDER, TrainConfig, derive_seed
from sdlib.lean_step import LeanStep
from sdlib.models import build_model, teacher_probs
from sdlib.records import write_atomically

__all__ = ["train_on_batch", "l2_penalty", "distill_step", "distill_group", "Member", "StepResult", "epoch_order",
           "evaluate", "build_model", "teacher_probs", "load_checkpoint", "CorruptCheckpointError"]

# Host syncs to look for a NaN/inf loss: one per this many batches (and one at every epoch end).
_NAN_CHECK_EVERY = 200


def train_on_batch(student: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   alpha: float, teacher: torch.nn.Module | None = None, l2_coef: float = 0.0,
                   teacher_bn: str = "eval") -> torch.Tensor:
    """One optimizer step of ``student`` on the (augmented, normalized) batch x, labels y (int64 (B,)).

    The student's softmax p is fitted to the mixed targets ``z = alpha * onehot(y) + (1 - alpha) * t``, t the
    frozen teacher's softmax (``TrainConfig.teacher_bn`` says how its batch norms normalize), by mean squared
    error, plus the unsquared L2 norm of every weight tensor; ``optimizer`` is Adam without weight decay.
    ``MSE(p, z)`` equals the authors' two terms ``alpha * MSE(p, onehot(y)) + (1 - alpha) * MSE(p, t)`` minus
    ``alpha * (1 - alpha) * MSE(onehot(y), t)``, which does not depend on the student: the same gradient. The
    returned objective, what ``train_loss`` records (its mean over an epoch), is the two-term form plus L2.
    """
    student.train()
    p = torch.softmax(student(x), dim=1)  # the student's softmax
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    t = teacher_probs(teacher, x, teacher_bn) if alpha != 1.0 else torch.zeros_like(onehot)  # the teacher's
    z = alpha * onehot + (1 - alpha) * t  # the mixed targets
    loss = F.mse_loss(p, z)
    l2 = l2_penalty(student, l2_coef)
    optimizer.zero_grad()
    (loss + l2).backward()
    optimizer.step()
    return (loss + alpha * (1 - alpha) * F.mse_loss(onehot, t) + l2).detach()


def l2_penalty(model: torch.nn.Module, coef: float = 1.0) -> torch.Tensor:
    """``coef * sum over weight tensors W of ||W||_2``, not squared: the paper's regularizer."""
    return coef * sum(torch.linalg.vector_norm(w) for w in model.parameters() if w.requires_grad)


def distill_step(config: TrainConfig, data, *, seed: int, step: int, alpha: float,
                 teacher: torch.nn.Module | None = None, chain: str = "", device: str | torch.device = "cpu",
                 state_path: str | os.PathLike | None = None, callback: Callable[[dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> StepResult:
    """Train one model of one step of a chain, from a fresh initialization seeded by ``(seed, step)``.

    data : a :class:`sdlib.data.CIFAR10Splits` (or anything with x_/y_ train/val/test: uint8 (N, 3, 32, 32) images,
        int64 (N,) labels on ``device``). seed, step : the initialization, data order and augmentation, shared by
        every chain of the step. alpha : the labels' weight (finite); ``teacher`` is required when alpha != 1.
    state_path : the resumable state, saved every ``config.checkpoint_every`` epochs; training resumes from it.
    on_epoch(log) : at each epoch end, before the state is saved; callback(event) : after it (``event="epoch_end"``,
        the log, ``epochs``); raising from it interrupts a step that can be resumed from that epoch.

    The last partial batch of an epoch is dropped. ``train_loss``: the epoch's mean of :func:`train_on_batch`'s
    objective; val/test ``acc`` and ``loss`` (MSE to one-hot labels) every ``config.eval_every`` (test:
    ``test_every``) epochs and at the last, None in the other logs. A NaN or inf training loss raises
    FloatingPointError naming seed, chain, step and epoch.
    """
    member = Member(chain=chain, alpha=alpha, teacher=teacher, state_path=state_path, on_epoch=on_epoch)
    return distill_group(config, data, seed=seed, step=step, members=[member], device=device, callback=callback,
                         progress=progress)[0]


def distill_group(config: TrainConfig, data, *, seed: int, step: int, members: Sequence[Member],
                  device: str | torch.device = "cpu", callback: Callable[[dict], None] | None = None,
                  progress: bool = False) -> list[StepResult]:
    """Train the models of several chains of one (seed, step) in flight (``config.chains_in_flight``, see
    :mod:`sdlib.lean_step`): same initialization and batches, each its own alpha and teacher; one
    :class:`StepResult` per member, what :func:`distill_step` gives it alone. Members whose resumable states
    stand at different epochs train as separate groups."""
    device, members = torch.device(device), list(members)
    if not members:
        raise ValueError("members must name at least one model to train, got none")
    for member in members:
        if isinstance(member.alpha, bool) or not isinstance(member.alpha, numbers.Real) \
                or not math.isfinite(member.alpha):
            raise ValueError(f"alpha must be a finite number, got {member.alpha!r} (chain {member.chain!r})")
        if member.alpha != 1.0 and member.teacher is None:
            raise ValueError(f"teacher is required for alpha != 1 (chain {member.chain!r}, step {step}, "
                             f"alpha {member.alpha:g})")
    n_train, batch_size = len(data.x_train), config.batch_size
    iters_per_epoch = n_train // batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"TrainConfig.batch_size ({batch_size}) must not exceed the {n_train} training images")

    states = [_load_state(m, seed, step) for m in members]
    starts = [0 if s is None else s["epoch"] for s in states]
    if len(set(starts)) > 1:  # in flight means in step: train each resume point as its own group
        results: dict[int, StepResult] = {}
        for start in sorted(set(starts)):
            part = [i for i, s in enumerate(starts) if s == start]
            results.update(zip(part, distill_group(config, data, seed=seed, step=step, device=device,
                                                   members=[members[i] for i in part], callback=callback,
                                                   progress=progress)))
        return [results[i] for i in range(len(members))]
    start_epoch = starts[0]

    fresh = build_model(seed, step, config.model) if None in states else None  # one init, copied: same weights
    models = [copy.deepcopy(fresh) if state is None else build_model(model=config.model, empty=True)
              for state in states]
    for model, state in zip(models, states):
        if state is not None:
            model.load_state_dict(state["model"])
    lean = LeanStep(config, models, [m.alpha for m in members], [m.teacher for m in members], data.y_train,
                    device, batched=config.chains_in_flight == "batched" and len(members) > 1)
    del models
    for i, state in enumerate(states):
        if state is not None:
            lean.load_optimizer(i, state["optimizer"])
    lean.schedule.start_at(start_epoch * iters_per_epoch)
    logs = [[] if s is None else list(s["logs"]) for s in states]
    totals = [[0, 0.0, 0.0] if s is None else [s["train_images"], s["train_time_s"], s["wall_time_s"]]
              for s in states]
    val_probs: list = [None] * len(members)
    epoch_bar = tqdm(range(start_epoch + 1, config.epochs + 1), initial=start_epoch, total=config.epochs,
                     desc=f"epochs ({', '.join(m.chain for m in members)} step {step})", leave=False,
                     disable=not progress)
    for epoch in epoch_bar:
        epoch_start = time.perf_counter()
        lean.train()
        for loss_sum in lean.loss_sums:
            loss_sum.zero_()
        # Same order and augmentation for every chain of (seed, step): chains differ by their targets only.
        order = epoch_order(config, seed, step, epoch, n_train, device)
        augment_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, epoch, AUGMENT))
        for i in range(iters_per_epoch):
            lean.write_batch(data.x_train, order[i * batch_size:(i + 1) * batch_size], augment_gen)
            lean()
            if (i + 1) % _NAN_CHECK_EVERY == 0 or i + 1 == iters_per_epoch:  # the last: the once-per-epoch sync
                sums = torch.stack(list(lean.loss_sums)).tolist()
                if not all(math.isfinite(v) for v in sums):
                    k = next(k for k, v in enumerate(sums) if not math.isfinite(v))
                    raise FloatingPointError(
                        f"non-finite training loss ({sums[k]}) at seed={seed}, chain={members[k].chain!r}, "
                        f"step={step}, epoch={epoch} (within its first {i + 1} batches); the run stops here and "
                        f"earlier results are kept. Lower TrainConfig.lr or check the data.")
        train_time = time.perf_counter() - epoch_start
        batches, last = epoch * iters_per_epoch, epoch == config.epochs
        evals = {}
        for part, every in (("val", config.eval_every), ("test", config.test_every or config.eval_every)):
            if last or epoch % every == 0:
                evals[part] = []
                for net in lean.networks:
                    result = evaluate(net, getattr(data, f"x_{part}"), getattr(data, f"y_{part}"),
                                      config.eval_batch_size, bf16=lean.bf16, channels_last=lean.channels_last,
                                      return_probs=(part == "val" and last))
                    evals[part] += result if isinstance(result, list) else [result]
        wall_time = time.perf_counter() - epoch_start
        for k, member in enumerate(members):
            totals[k] = [totals[k][0] + iters_per_epoch * batch_size, totals[k][1] + train_time,
                         totals[k][2] + wall_time]
            if last:
                val_probs[k] = evals["val"][k].pop("probs")
            logs[k].append({"seed": seed, "chain": member.chain, "step": step, "epoch": epoch,
                            "train_loss": sums[k] / iters_per_epoch,
                            **{f"{part}_{name}": (evals[part][k][name] if part in evals else None)
                               for part in ("val", "test") for name in ("acc", "loss")},
                            "lr": lean.schedule.value(batches - 1), "wall_time_s": wall_time,
                            "images_per_s": iters_per_epoch * batch_size / train_time})
            if member.on_epoch is not None:
                member.on_epoch(logs[k][-1])
        if len(members) == 1:
            epoch_bar.set_postfix(loss=f"{logs[0][-1]['train_loss']:.4f}")
        if not last and epoch % config.checkpoint_every == 0:
            for k, member in enumerate(members):
                if member.state_path is not None:
                    atomic_torch_save({
                        "seed": seed, "chain": member.chain, "step": step, "alpha": float(member.alpha),
                        "epoch": epoch, "model": lean.model_state(k), "optimizer": lean.optimizer_state(k, batches),
                        "scheduler": {"iteration": batches}, "logs": logs[k], "train_images": totals[k][0],
                        "train_time_s": totals[k][1], "wall_time_s": totals[k][2]}, member.state_path)
        if callback is not None:
            for member_logs in logs:
                callback({"event": "epoch_end", **member_logs[-1], "epochs": config.epochs})
    epoch_bar.close()
    return [StepResult(model, logs[k], val_probs[k], *totals[k]) for k, model in enumerate(lean.final_models())]


@dataclass
class Member:
    """One model of a group trained in flight by :func:`distill_group` (the arguments of :func:`distill_step`)."""

    chain: str
    alpha: float
    teacher: torch.nn.Module | None = None
    state_path: str | os.PathLike | None = None
    on_epoch: Callable[[dict], None] | None = None


@dataclass
class StepResult:
    """What :func:`distill_step` returns: the trained ``model`` (last epoch, eval mode, on the training device);
    ``epochs``, one log per epoch (a resumed step's include the earlier sessions'); ``val_probs``, float32
    (n_val, 10) softmax outputs of the model on the validation split, on the CPU; totals over the epochs
    (``train_time_s``: the training loop only; models trained in flight each count the group's time)."""

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
        """The last epoch's metrics, the step totals, and the best test accuracy over the evaluated epochs with its
        epoch (the first, on a tie; what the authors' checkpointing, which monitored it, kept): a record's numbers."""
        last = self.epochs[-1]
        evaluated = [log for log in self.epochs if log.get("test_acc") is not None]
        best = max(evaluated, key=lambda log: log["test_acc"]) if evaluated else {}
        return {
            "best_test_acc": best.get("test_acc"), "best_test_epoch": best.get("epoch"), "epochs": last["epoch"],
            "val_acc": last["val_acc"], "val_loss": last["val_loss"],
            "test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_loss": last["train_loss"],
            "wall_time_s": self.wall_time_s, "images_per_s": self.images_per_s,
            "train_images": self.train_images, "train_time_s": self.train_time_s,
        }


def epoch_order(config: TrainConfig, seed: int, step: int, epoch: int, n: int,
                device: str | torch.device) -> torch.Tensor:
    """The order in which ``epoch`` of ``step`` visits the ``n`` training images: an int64 permutation on
    ``device``, drawn on the CPU (the same on every device). ``config.data_order`` "reshuffle": a new one per
    (seed, step, epoch), shared by every chain of the step. "fixed": one drawn from the seed, for every epoch and
    step, as the authors' DataLoader (no shuffling) over a ``random_split`` drawn once did; its stream is keyed by
    (seed, 0, 0): steps and epochs count from 1, so no reshuffled epoch shares it."""
    if config.data_order not in DATA_ORDERS:
        raise ValueError(f"TrainConfig.data_order must be one of {DATA_ORDERS}, got {config.data_order!r}")
    key = (seed, 0, 0, ORDER) if config.data_order == "fixed" else (seed, step, epoch, ORDER)
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(*key))).to(device)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             bf16: bool = False, channels_last: bool = False, return_probs: bool = False) -> dict | list[dict]:
    """Accuracy and loss of ``model`` (put in eval mode) on uint8 images ``x_uint8`` (N, 3, 32, 32), labels (N,):
    ``{"acc", "loss"}`` as floats (one host sync), plus ``"probs"`` (float32 (N, C) on the CPU) with
    ``return_probs``; for a :class:`sdlib.batched.BatchedResNet50` of n models, a list of n such dicts. loss: MSE
    between softmax outputs and one-hot labels, mean over N x classes. N = 0 (``n_val=0``): acc, loss None."""
    model.eval()
    n_models = getattr(model, "n_models", None)  # None: one model, logits (B, C); else (n, B, C)
    device, n = x_uint8.device, len(x_uint8)
    dtype = next(model.parameters()).dtype  # float32 (float64 models: the tests' exact comparisons)
    correct = torch.zeros(n_models or (), device=device, dtype=torch.int64)
    squared = torch.zeros(n_models or (), device=device, dtype=torch.float64)
    probs_out = [torch.zeros(n_models or 1, 0, NUM_CLASSES)]
    for start in range(0, n, batch_size):
        x = normalize(x_uint8[start:start + batch_size]).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = y[start:start + batch_size]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=-1)
        correct += (probs.argmax(dim=-1) == labels).sum(dim=-1)
        onehot = F.one_hot(labels, probs.shape[-1]).float()
        squared += (probs - onehot).square().sum(dim=(-2, -1), dtype=torch.float64)
        if return_probs:
            probs_out.append(probs.cpu().view(n_models or 1, *probs.shape[-2:]))
    results = [{"acc": a / n if n else None, "loss": s / (n * probs_out[-1].shape[-1]) if n else None}
               for a, s in zip(correct.view(-1).tolist(), squared.view(-1).tolist())]
    if return_probs:
        probs = torch.cat(probs_out, dim=1)
        for k, result in enumerate(results):
            result["probs"] = probs[k].clone()
    return results[0] if n_models is None else results


def _load_state(member: Member, seed: int, step: int) -> dict | None:
    path = Path(member.state_path) if member.state_path is not None else None
    if path is None or not path.is_file():
        return None
    state = load_checkpoint(path)  # CorruptCheckpointError names an unreadable file
    if (state["seed"], state["chain"], state["step"], state["alpha"]) != (seed, member.chain, step,
                                                                          float(member.alpha)):
        warnings.warn(f"ignoring {path}: it holds seed={state['seed']}, chain={state['chain']!r}, "
                      f"step={state['step']}, alpha={state['alpha']}, not this step's", RuntimeWarning)
        return None
    return state


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
