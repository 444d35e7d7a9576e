"""One step of self-distillation: ResNet-50 trained from a fresh initialization on mixed targets.

The paper's protocol (Borup & Andersen, 2021, Section 5): at every step a ResNet-50 is trained from a fresh
random initialization on the targets

    z = alpha * onehot(y) + (1 - alpha) * softmax(teacher(x)),

where the teacher is the previous step's model (its last epoch, not its best), with the objective
``MSE(softmax(student(x)), z) + l2_coef * sum_W ||W||_2`` (unsquared norms). Read top to bottom: the loss, the
L2 term, evaluation, then :func:`distill_step` (the epoch loop); the networks are in :mod:`sdlib.models`. The chains of steps are in
:mod:`sdlib.chains`, the command line in :mod:`sdlib.train`.

Written for speed and for reading, nanoGPT/airbench style: the data sit on the device as uint8 tensors, a batch
is an index into them, augmentation is a few vectorized tensor ops (:func:`sdlib.data.augment`), no DataLoader,
no framework between the reader and the loop. The host waits for the device once per epoch (and every
``_NAN_CHECK_EVERY`` batches, to stop a diverged run early), never per batch.

The step is lean, because at the paper's batch of 16 the host dispatching ATen ops is the bottleneck, not the
GPU (``benchmarks/step_ops.py`` counts them): the L2 term's value is one fused multi-tensor norm without autograd
and its gradient ``coef * W / ||W||`` is added after ``backward()`` by one multi-tensor op; the learning-rate
schedule lives in a device tensor; Adam is fused (``capturable`` on CUDA); the batch is written into static
buffers; the teacher (frozen) has its batch norms folded into its convolutions (with ``teacher_bn="eval"``;
``"train"`` normalizes each batch by its own statistics, which no folding can express, so that teacher runs
unfolded, through :func:`teacher_probs`, its running statistics untouched); batch norms do not count their
batches during training. Nothing inside the step waits for the device or builds a tensor from Python values,
so on CUDA the whole step (teacher forward, student forward and backward, L2 gradient, Adam) is captured as one
CUDA graph after a few warm-up steps and replayed (``TrainConfig.capture``); on the CPU the same step runs
eagerly. :func:`distill_group` trains several models of one (seed, step) in flight, on the same batches: one
after the other on the CPU, each on its own CUDA stream in one graph, or as one batched network
(:mod:`sdlib.batched`), as ``TrainConfig.chains_in_flight`` says.
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

from sdlib import data as cifar
from sdlib.config import (AUGMENT, DATA_ORDERS, NUM_CLASSES, ORDER, TEACHER_BN_MODES, TrainConfig, derive_seed,
                          device_precision)
from sdlib.models import build_model
from sdlib.records import write_atomically

__all__ = ["build_model", "distillation_loss", "l2_penalty", "l2_norms", "add_l2_grad_", "teacher_probs",
           "epoch_order", "fold_batch_norms", "evaluate", "StepResult", "Member", "GroupStep", "distill_step",
           "distill_group", "load_checkpoint", "CorruptCheckpointError"]

# Host syncs to look for a NaN/inf loss: one per this many batches (and one at every epoch end).
_NAN_CHECK_EVERY = 200


# ------------------------------------------------------------------------------------------ model, loss, penalty


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * MSE(softmax(s), onehot(y)) + (1 - alpha) * MSE(softmax(s), teacher_probs)``.

    logits : (B, C) student outputs s (any float dtype; the loss is computed in float32, also under autocast).
    labels : (B,) int64 class indices, or their (B, C) one-hot float encoding (what the lean step passes: a
        gather from a table built once, instead of ``F.one_hot``'s checks every step).
    alpha : weight of the ground truth: in [0, 1] for a fixed chain, any real for an unbounded alpha-hat.
    teacher_probs : (B, C) teacher softmax outputs; may be None only when alpha == 1.
    MSE is the mean over batch x classes (``F.mse_loss``). Returns a float32 scalar (float64 for float64 logits).
    """
    if teacher_probs is None and alpha != 1.0:
        raise ValueError(f"teacher_probs is required when alpha != 1, got alpha={alpha!r} and no teacher")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.to(dtype), dim=1)
        onehot = labels.to(dtype) if labels.dim() == 2 else F.one_hot(labels, probs.shape[1]).to(dtype)
        loss = alpha * F.mse_loss(probs, onehot)
        if alpha != 1.0:
            loss = loss + (1.0 - alpha) * F.mse_loss(probs, teacher_probs.to(dtype))
    return loss


def l2_penalty(model: torch.nn.Module, coef: float = 1.0) -> torch.Tensor:
    """``coef * sum over parameter tensors of their L2 norm`` (not squared): the paper's regularizer.

    One fused multi-tensor norm (``torch._foreach_norm``) instead of ~160 separate kernels. At a zero tensor
    (the batch-norm biases at initialization) the gradient is 0, not NaN.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return coef * torch.stack(torch._foreach_norm(params)).sum()


def l2_norms(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(P,) the L2 norm of each tensor of ``params``, one fused kernel, outside autograd: the lean step's L2 term
    is ``coef * l2_norms(params).sum()``, and its gradient is added by :func:`add_l2_grad_`."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(list(params)))


@torch.no_grad()
def add_l2_grad_(params: Sequence[torch.Tensor], norms: torch.Tensor, coef: float,
                 grads: Sequence[torch.Tensor] | None = None) -> None:
    """``grad += coef * W / ||W||`` for every W of ``params`` (0 where W = 0): the gradient of
    ``coef * sum_W ||W||`` (:func:`l2_penalty`), added in place after ``backward()`` by one multi-tensor op.

    norms : (P,) :func:`l2_norms` of ``params`` at the point where the gradient is taken.
    grads : the tensors to add to (default: each parameter's ``.grad``, which must exist).
    Autograd differentiates ``_foreach_norm`` one tensor at a time (div, eq, masked_fill, mul and an
    accumulation per tensor: ~800 ops per step for ResNet-50); this is 6. ``||W||`` is clamped to float's
    smallest normal number, so a zero tensor gets 0 (``0 * W``), as autograd's masked norm gradient gives.
    """
    grads = [p.grad for p in params] if grads is None else list(grads)
    scales = norms.clamp_min(torch.finfo(norms.dtype).tiny).reciprocal_().mul_(coef).unbind()
    torch._foreach_addcmul_(grads, list(params), list(scales))


def teacher_probs(teacher: torch.nn.Module, x: torch.Tensor, bn_mode: str = "eval") -> torch.Tensor:
    """Softmax outputs of the frozen ``teacher`` on the (augmented, normalized) batch ``x``: (B, C) float32
    (float64 for a float64 teacher), no grad.

    teacher : the previous step's model, or what the lean step runs in its place: a :func:`fold_batch_norms`
        copy (eval mode only) or a :class:`sdlib.batched.BatchedResNet50` of m teachers (then (m, B, C): the
        softmax is over the last dim).
    x : (B, 3, H, W), the batch the student sees (under the caller's autocast, if any).
    bn_mode : ``TrainConfig.teacher_bn``.
        "eval": every layer in eval mode; BatchNorm normalizes with its running statistics.
        "train": BatchNorm normalizes with the statistics of this batch (per channel: mean and biased variance
        over B, H, W), as the authors' teacher did (under PyTorch Lightning 1.1.1 it ran in train mode, see
        book/reproduce_cifar10.md). Its running statistics are NOT updated (no momentum step, num_batches_tracked
        unchanged): the teacher stays bit-identical to its checkpoint, so a resumed run and the final
        checkpoints on disk are unaffected by distillation. The outputs are the same either way, since in train
        mode BatchNorm never reads its running statistics. Other layers stay in eval mode (ResNet-50 has none
        that differ).
    The teacher is left in eval mode. Called once per batch by the training step (``_Teachers``).
    """
    if bn_mode not in TEACHER_BN_MODES:
        raise ValueError(f"bn_mode must be one of {TEACHER_BN_MODES}, got {bn_mode!r}")
    if teacher.training or bn_mode == "train":  # no walk over the modules per batch where nothing changes
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
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


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


@torch.no_grad()
def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of a ResNet-50 (or :class:`sdlib.batched.BatchedResNet50`) with every batch norm
    folded into the convolution before it: ``conv(x) * s + (beta - mean * s)``, ``s = gamma / sqrt(var + eps)``,
    becomes one convolution with weight ``W * s`` and that bias. The same function of x in eval mode (up to
    rounding: the folding is done in float64); 53 fewer ops per teacher forward."""
    folded = copy.deepcopy(model).eval()

    def fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d):
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        shift = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        conv.bias = torch.nn.Parameter(shift.to(conv.weight.dtype))

    for module in list(folded.modules()):
        for k in ("1", "2", "3"):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                fold(conv, bn)
                setattr(module, f"bn{k}", torch.nn.Identity())
        if (isinstance(module, torch.nn.Sequential) and len(module) == 2 and isinstance(module[0], torch.nn.Conv2d)
                and isinstance(module[1], torch.nn.BatchNorm2d)):
            fold(module[0], module[1])
            module[1] = torch.nn.Identity()
    left = [name for name, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if left:
        raise ValueError(f"fold_batch_norms: batch norms not preceded by a convolution: {left[:3]}")
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


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
    dtype = next(model.parameters()).dtype  # float32 (float64 models: the tests' exact comparisons)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    squared = torch.zeros((), device=device, dtype=torch.float64)
    probs_out = []
    for start in range(0, len(x_uint8), batch_size):
        x = cifar.normalize(x_uint8[start:start + batch_size]).to(dtype)
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
    """Multiplier of the base lr at a batch: linear warmup over ``warmup_iters``, then constant, cosine to 0, or
    step (divided by 10 at half and at three quarters of the iterations after the warmup, He et al. 2016)."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if schedule == "constant":
        return 1.0
    progress = (iteration - warmup_iters) / max(1, total_iters - warmup_iters)
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Schedule:
    """The learning rate as a device tensor that the step advances itself (no Python value enters the step).

    ``lr`` (float32, 0-dim) is what the optimizers read; :meth:`advance` (inside the step, after Adam) moves it
    to the next batch's value, :func:`_lr_factor` computed on the device in float64. :meth:`value` is the same
    schedule on the host, for the logs.
    """

    def __init__(self, config: TrainConfig, iters_per_epoch: int, device: torch.device):
        self.base, self.schedule = config.lr, config.lr_schedule
        self.total, self.warmup = config.epochs * iters_per_epoch, config.warmup_epochs * iters_per_epoch
        self.constant = self.schedule == "constant" and self.warmup == 0
        self.lr = torch.full((), self.base, dtype=torch.float32, device=device)
        self.iteration = torch.zeros((), dtype=torch.float64, device=device)

    def start_at(self, iteration: int) -> None:
        """Outside the step: the schedule at ``iteration`` (0, or a resumed run's)."""
        self.iteration.fill_(iteration)
        self._update()

    def advance(self) -> None:
        if not self.constant:
            self.iteration.add_(1)
            self._update()

    def _update(self) -> None:
        it = self.iteration
        if self.schedule == "cosine":
            progress = ((it - self.warmup) / max(1, self.total - self.warmup)).clamp_(max=1.0)
            factor = progress.mul_(math.pi).cos_().add_(1.0).mul_(0.5)
        elif self.schedule == "step":
            progress = (it - self.warmup) / max(1, self.total - self.warmup)
            factor = torch.full_like(it, 0.1).pow_((progress >= 0.5).double() + (progress >= 0.75).double())
        else:
            factor = torch.ones_like(it)
        if self.warmup:
            factor = torch.where(it < self.warmup, (it + 1) / self.warmup, factor)
        self.lr.copy_(factor.mul_(self.base))

    def value(self, iteration: int) -> float:
        return self.base * _lr_factor(iteration, self.warmup, self.total, self.schedule)


class _BatchCounters:
    """Batch norms count their training batches (``num_batches_tracked += 1``: one op per batch norm per step)
    only for ``momentum=None``; with torchvision's momentum 0.1 the count is never read. During training the
    counters are detached; :meth:`restore` puts them back holding ``batches``, the batches trained since the
    fresh initialization (what the counters would hold: a state_dict of a trained model is unchanged)."""

    def __init__(self, model: torch.nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        and m.num_batches_tracked is not None and m.momentum is not None]
        self.counters = [m.num_batches_tracked for m in self.modules]
        self.detach()

    def detach(self) -> None:
        for m in self.modules:
            m.num_batches_tracked = None

    def restore(self, batches: int) -> None:
        for m, counter in zip(self.modules, self.counters):
            counter.fill_(batches)
            m.num_batches_tracked = counter


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict, lr: torch.Tensor, on_cuda: bool) -> None:
    """Adam's saved state into ``optimizer``, keeping this run's device lr tensor and fused/capturable flags."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(lr=lr, fused=True, capturable=on_cuda, foreach=None)
    for p_state in optimizer.state.values():
        if "step" in p_state:
            p_state["step"] = p_state["step"].to(device=lr.device, dtype=torch.float32)


def _optimizer_state(optimizer: torch.optim.Optimizer, lr: float) -> dict:
    state = cpu_state(optimizer)
    for group in state["param_groups"]:
        group["lr"] = lr  # a float in the file, as torch.optim writes it
    return state


class _Lockstep:
    """n students stepped on the same batch, each its own ResNet-50 and fused Adam: one after the other on the
    CPU (exactly the ops of n separate runs), each on its own CUDA stream on a GPU (forked and joined inside
    the one captured graph). ``n = 1`` is the one-at-a-time path."""

    def __init__(self, models: list, alphas: list[float], config: TrainConfig, schedule: _Schedule,
                 device: torch.device, use_bf16: bool):
        self.models, self.alphas, self.coef, self.use_bf16 = models, alphas, config.l2_coef, use_bf16
        self.device, self.on_cuda = device, device.type == "cuda"
        self.params = [[p for p in m.parameters() if p.requires_grad] for m in models]
        self.lr = schedule.lr
        # Adam without weight decay: the paper's regularizer is the (unsquared) L2 norm term.
        self.optimizers = [torch.optim.Adam(ps, lr=self.lr, fused=True, capturable=self.on_cuda)
                           for ps in self.params]
        self.counters = [_BatchCounters(m) for m in models]
        self.loss_sums = [torch.zeros((), device=device) for _ in models]
        self.streams = [torch.cuda.Stream(device) for _ in models] if self.on_cuda and len(models) > 1 else None

    def __len__(self):
        return len(self.models)

    def load(self, i: int, optimizer_state: dict) -> None:
        _load_optimizer(self.optimizers[i], optimizer_state, self.lr, self.on_cuda)

    def train(self):
        for m in self.models:
            m.train()

    def step(self, x: torch.Tensor, onehot: torch.Tensor, targets: list) -> None:
        """One optimizer step of every student on the static batch (x, onehot); targets[i]: student i's
        teacher probabilities (B, C) or None (alpha = 1)."""
        if self.streams is None:
            for i in range(len(self.models)):
                self._step_one(i, x, onehot, targets[i])
            return
        main = torch.cuda.current_stream(self.device)
        for i, stream in enumerate(self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                self._step_one(i, x, onehot, targets[i])
        for stream in self.streams:
            main.wait_stream(stream)

    def _step_one(self, i, x, onehot, target) -> None:
        model, params, optimizer = self.models[i], self.params[i], self.optimizers[i]
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = model(x)
        loss = distillation_loss(logits, onehot, self.alphas[i], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self.loss_sums[i].add_(loss)
            if self.coef:
                norms = l2_norms(params)
                add_l2_grad_(params, norms, self.coef)
                self.loss_sums[i].add_(norms.sum(), alpha=self.coef)
        optimizer.step()

    def evaluate(self, x, y, batch_size, bf16, channels_last, return_probs) -> list[dict]:
        return [evaluate(m, x, y, batch_size, bf16=bf16, channels_last=channels_last, return_probs=return_probs)
                for m in self.models]

    def model_state(self, i: int, batches: int) -> dict:
        self.counters[i].restore(batches)
        state = cpu_state(self.models[i])
        self.counters[i].detach()
        return state

    def optimizer_state(self, i: int, lr: float) -> dict:
        return _optimizer_state(self.optimizers[i], lr)

    def final_models(self, batches: int) -> list:
        for counters in self.counters:
            counters.restore(batches)
        return [m.eval() for m in self.models]


class _Teachers:
    """The teachers of a group, each distinct one run once per batch (at step 2 every chain's teacher is the
    shared step-1 model), in bf16 where the students train in bf16 autocast (the frozen weights are cast once,
    not at every step). ``bn_mode`` is ``TrainConfig.teacher_bn``: "eval" folds the batch norms into the
    convolutions (the same function: eval-mode batch norm is affine); "train" normalizes each batch by its own
    statistics (:func:`teacher_probs`), which no folding can express, so the teacher runs unfolded. Either way
    the teacher run is a copy: the caller's teacher (and its checkpoint) is never changed."""

    def __init__(self, members: list, memory_format, use_bf16: bool, batched: bool, bn_mode: str = "eval",
                 pointwise: str = "conv"):
        distinct, self.index = [], []
        for member in members:
            if member.alpha != 1.0:  # an unbounded alpha-hat may exceed 1: it needs its teacher too
                ids = [id(t) for t in distinct]
                if id(member.teacher) not in ids:
                    distinct.append(member.teacher)
                self.index.append([id(t) for t in distinct].index(id(member.teacher)))
            else:
                self.index.append(None)
        self.bn_mode, self.n = bn_mode, len(members)
        prepared = [self._prepare(t, memory_format, use_bf16) for t in distinct]
        self.batched = batched and len(prepared) > 1
        if self.batched:
            from sdlib.batched import stack_models
            self.models = [self._prepare(stack_models(distinct, pointwise), memory_format, use_bf16)]
            device = next(self.models[0].parameters()).device
            self.member_index = torch.tensor([0 if i is None else i for i in self.index], device=device)
        else:
            self.models = prepared
        self.broadcast = batched

    def _prepare(self, teacher, memory_format, use_bf16):
        teacher = fold_batch_norms(teacher) if self.bn_mode == "eval" else copy.deepcopy(teacher)
        teacher = teacher.to(memory_format=memory_format)
        return teacher.to(torch.bfloat16) if use_bf16 else teacher

    def __call__(self, x: torch.Tensor):
        """Per member (B, C) float32 probabilities (None at alpha = 1), or for a batched group one (n, B, C)."""
        outs = [teacher_probs(t, x, self.bn_mode) for t in self.models]
        if not self.broadcast:
            return [None if i is None else outs[i] for i in self.index]
        if not outs:
            return None
        if self.batched:
            return outs[0].index_select(0, self.member_index)
        return outs[0].expand(self.n, -1, -1)  # one teacher (or several identical ones) for every member


class _CapturedStep:
    """``fn`` (one training step over static tensors) run eagerly for ``warmup`` calls on a side stream, then
    captured as one CUDA graph at the next call (which replays it: capturing does not run the work) and replayed
    ever after. Every step, warm-up included, is a real optimizer step on the real batch."""

    def __init__(self, fn: Callable[[], None], device: torch.device, warmup: int = 3):
        self.fn, self.device, self.warmup, self.calls, self.graph = fn, device, warmup, 0, None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        main = torch.cuda.current_stream(self.device)
        if self.calls < self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.fn()
            main.wait_stream(side)
            self.calls += 1
            return
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.fn()
        self.graph.replay()


def _step_runner(config: TrainConfig, device: torch.device, fn: Callable[[], None], modules: list):
    """How the step runs: ``TrainConfig.capture`` "auto" (a CUDA graph on CUDA, eager elsewhere), "none",
    "graph" (CUDA only), or a torch.compile mode ("reduce-overhead", "max-autotune") applied to the networks."""
    mode = config.capture
    if mode == "auto":
        mode = "graph" if device.type == "cuda" else "none"
    if mode == "graph":
        if device.type != "cuda":
            raise ValueError(f"TrainConfig.capture='graph' needs CUDA; the run is on {device.type} "
                             "(use 'auto' or 'none')")
        return _CapturedStep(fn, device)
    if mode in ("reduce-overhead", "max-autotune"):
        for module in modules:
            module.compile(mode=mode)
    return fn


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
        images_per_s; the val/test fields are None in an epoch without evaluation, see ``eval_every``); a
        resumed step includes the epochs of the earlier session.
    val_probs : float32 (n_val, 10) softmax outputs of the final model on the validation split, on the CPU.
    train_images, train_time_s, wall_time_s : totals over the step (training loop only / everything; a model
        trained in flight with others counts the group's time).
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


@dataclass
class Member:
    """One model of a group trained in flight by :func:`distill_group`: its ``chain`` name, ``alpha``, its
    ``teacher`` (required when alpha != 1), where its resumable state lives (``state_path``) and its per-epoch
    ``on_epoch(log)`` (see :func:`distill_step`)."""

    chain: str
    alpha: float
    teacher: torch.nn.Module | None = None
    state_path: str | os.PathLike | None = None
    on_epoch: Callable[[dict], None] | None = None


class GroupStep:
    """One training step of the models of a group (one model: the one-at-a-time path), over static buffers.

    models : the students (initial or resumed weights, on the device in its memory format), one per member.
    y_train : (N,) the training labels (their one-hot table is built once; a batch gathers its rows).
    ``write_batch`` writes a batch (augmented images, one-hot labels) into the static buffers ``x``,
    ``onehot``; ``step()`` then runs the teachers, every student's forward, loss, backward, L2 gradient and
    Adam, and advances the learning-rate schedule, all on those buffers: what a CUDA graph captures.
    """

    def __init__(self, config: TrainConfig, models: list, members: Sequence[Member], y_train: torch.Tensor,
                 device: torch.device, *, use_bf16: bool, memory_format, batched: bool):
        iters_per_epoch = max(1, len(y_train) // config.batch_size)
        self.schedule = _Schedule(config, iters_per_epoch, device)
        alphas = [float(m.alpha) for m in members]
        if batched:
            from sdlib.batched import BatchedStudents
            self.students = BatchedStudents(models, alphas, config.l2_coef, self.schedule.lr, use_bf16=use_bf16,
                                            memory_format=memory_format, pointwise=self.pointwise(config))
            self.networks = self.students.networks()
        else:
            self.students = _Lockstep(models, alphas, config, self.schedule, device, use_bf16)
            self.networks = list(models)
        self.teachers = _Teachers(members, memory_format, use_bf16, batched, bn_mode=config.teacher_bn,
                                  pointwise=self.pointwise(config))
        # float32 (float64 where the models are: the tests' exact comparisons of the in-flight paths)
        dtype = next(models[0].parameters()).dtype
        self.x = torch.zeros((config.batch_size, 3, 32, 32), dtype=torch.bfloat16 if use_bf16 else dtype,
                             device=device).contiguous(memory_format=memory_format)
        self.onehot = torch.zeros((config.batch_size, NUM_CLASSES), dtype=dtype, device=device)
        self.onehot_train = F.one_hot(y_train, NUM_CLASSES).to(dtype)

    @staticmethod
    def pointwise(config: TrainConfig) -> str:
        return "matmul" if config.chains_in_flight == "batched-matmul" else "conv"

    def write_batch(self, x_train: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> None:
        """Outside the step: images ``x_train[index]`` augmented (drawing from ``generator``) and their one-hot
        labels, into the static buffers."""
        self.x.copy_(cifar.augment(x_train[index], generator=generator))
        self.onehot.copy_(self.onehot_train[index])

    def step(self) -> None:
        self.students.step(self.x, self.onehot, self.teachers(self.x))
        self.schedule.advance()


def distill_step(config: TrainConfig, data, *, seed: int, step: int, alpha: float,
                 teacher: torch.nn.Module | None = None, chain: str = "", device: str | torch.device = "cpu",
                 state_path: str | os.PathLike | None = None, callback: Callable[[dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> StepResult:
    """Train one model of one step of a chain, from a fresh initialization seeded by ``(seed, step)``.

    config : the run's :class:`TrainConfig` (epochs, batch, lr, schedule, l2_coef, bf16, channels_last,
        eval_every, capture, ...).
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
    objective (distillation loss + L2 term); val/test ``loss`` is the MSE to one-hot labels (no L2 term),
    evaluated every ``config.eval_every`` epochs and at the last (None in the other epochs' logs).
    A NaN or inf training loss raises FloatingPointError naming seed, chain, step and epoch.
    """
    member = Member(chain=chain, alpha=alpha, teacher=teacher, state_path=state_path, on_epoch=on_epoch)
    return distill_group(config, data, seed=seed, step=step, members=[member], device=device, callback=callback,
                         progress=progress)[0]


def _load_state(member: Member, seed: int, step: int, device: torch.device) -> dict | None:
    path = Path(member.state_path) if member.state_path is not None else None
    if path is None or not path.is_file():
        return None
    state = load_checkpoint(path, map_location="cpu")  # CorruptCheckpointError names an unreadable file
    if (state["seed"], state["chain"], state["step"], state["alpha"]) != (seed, member.chain, step,
                                                                          float(member.alpha)):
        warnings.warn(f"ignoring {path}: it holds seed={state['seed']}, chain={state['chain']!r}, "
                      f"step={state['step']}, alpha={state['alpha']}, not this step's", RuntimeWarning)
        return None
    return state


def distill_group(config: TrainConfig, data, *, seed: int, step: int, members: Sequence[Member],
                  device: str | torch.device = "cpu", callback: Callable[[dict], None] | None = None,
                  progress: bool = False) -> list[StepResult]:
    """Train the models of several chains of one (seed, step) in flight: same initialization, same batches
    (order and augmentation), each with its own alpha and teacher. Returns one :class:`StepResult` per member,
    each what :func:`distill_step` (which is this function with one member) returns for it alone.

    ``config.chains_in_flight`` says how: "streams" (and "off", for a single member) step the members one
    after the other on each batch, on the CPU exactly the ops of separate runs, on CUDA each on its own stream;
    "batched" fuses them into one :class:`sdlib.batched.BatchedResNet50` (same results up to rounding),
    "batched-matmul" the same with its 1x1 convolutions as batched matrix products.
    Members whose resumable states stand at different epochs are trained as separate groups.
    callback(event) : as for :func:`distill_step`, once per member at each epoch end.
    """
    device = torch.device(device)
    members = list(members)
    if not members:
        raise ValueError("members must name at least one model to train, got none")
    for member in members:
        # fixed alphas lie in [0, 1]; an unbounded alpha-hat may lie outside
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

    states = [_load_state(m, seed, step, device) for m in members]
    starts = [0 if s is None else s["epoch"] for s in states]
    if len(set(starts)) > 1:  # in flight means in step: train each resume point as its own group
        results: dict[int, StepResult] = {}
        for start in sorted(set(starts)):
            part = [i for i, s in enumerate(starts) if s == start]
            done = distill_group(config, data, seed=seed, step=step, members=[members[i] for i in part],
                                 device=device, callback=callback, progress=progress)
            results.update(zip(part, done))
        return [results[i] for i in range(len(members))]
    start_epoch = starts[0]

    use_bf16, channels_last = device_precision(config, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batched = config.chains_in_flight in ("batched", "batched-matmul") and len(members) > 1

    models = []
    for state in states:
        model = build_model(seed, step, config.model)
        if state is not None:
            model.load_state_dict(state["model"])
        models.append(model.to(device, memory_format=memory_format))
    group = GroupStep(config, models, members, data.y_train, device, use_bf16=use_bf16,
                      memory_format=memory_format, batched=batched)
    students, schedule = group.students, group.schedule
    del models
    for i, state in enumerate(states):
        if state is not None:
            students.load(i, state["optimizer"])
    schedule.start_at(start_epoch * iters_per_epoch)
    train_step = group.step

    run_step = _step_runner(config, device, train_step, group.networks)

    n = len(members)
    logs = [list(s["logs"]) if s is not None else [] for s in states]
    totals = [(s["train_images"], s["train_time_s"], s["wall_time_s"]) if s is not None else (0, 0.0, 0.0)
              for s in states]
    train_images, train_time, wall_time = (list(t) for t in zip(*totals))
    val_probs: list = [None] * n
    chains = ", ".join(m.chain for m in members)
    epoch_bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"epochs ({chains} step {step})",
                     initial=start_epoch, total=config.epochs, leave=False, disable=not progress)
    for epoch in epoch_bar:
        epoch_start = time.perf_counter()
        students.train()
        for loss_sum in students.loss_sums:
            loss_sum.zero_()
        # Same order and augmentation for every chain of (seed, step): chains differ by their targets only.
        order = epoch_order(config, seed, step, epoch, n_train, device)
        augment_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, step, epoch, AUGMENT))
        for i in range(iters_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            group.write_batch(data.x_train, index, augment_gen)
            run_step()
            if (i + 1) % _NAN_CHECK_EVERY == 0:
                sums = torch.stack(list(students.loss_sums)).tolist()
                if not all(math.isfinite(v) for v in sums):
                    _raise_non_finite(sums, members, seed, step, epoch, i + 1)
        sums = torch.stack(list(students.loss_sums)).tolist()  # the once-per-epoch sync
        if not all(math.isfinite(v) for v in sums):
            _raise_non_finite(sums, members, seed, step, epoch, iters_per_epoch)
        train_loss = [v / iters_per_epoch for v in sums]
        epoch_train_time = time.perf_counter() - epoch_start
        batches = epoch * iters_per_epoch
        lr_used = schedule.value(batches - 1)
        last = epoch == config.epochs
        evals = {}
        for part, every in (("val", config.eval_every), ("test", config.test_every or config.eval_every)):
            if last or epoch % every == 0:
                evals[part] = students.evaluate(getattr(data, f"x_{part}"), getattr(data, f"y_{part}"),
                                                config.eval_batch_size, bf16=use_bf16,
                                                channels_last=memory_format is torch.channels_last,
                                                return_probs=(part == "val" and last))
        epoch_wall = time.perf_counter() - epoch_start
        epoch_logs = []
        for k, member in enumerate(members):
            train_images[k] += iters_per_epoch * batch_size
            train_time[k] += epoch_train_time
            wall_time[k] += epoch_wall
            metrics = {f"{part}_{name}": (evals[part][k][name] if part in evals else None)
                       for part in ("val", "test") for name in ("acc", "loss")}
            if last:
                val_probs[k] = evals["val"][k].pop("probs")
            log = {"seed": seed, "chain": member.chain, "step": step, "epoch": epoch,
                   "train_loss": train_loss[k], **metrics, "lr": lr_used, "wall_time_s": epoch_wall,
                   "images_per_s": iters_per_epoch * batch_size / epoch_train_time}
            logs[k].append(log)
            epoch_logs.append(log)
            if member.on_epoch is not None:
                member.on_epoch(log)
        if n == 1:
            epoch_bar.set_postfix(loss=f"{train_loss[0]:.4f}")
        if not last and epoch % config.checkpoint_every == 0:
            for k, member in enumerate(members):
                if member.state_path is not None:
                    atomic_torch_save({
                        "seed": seed, "chain": member.chain, "step": step, "alpha": float(member.alpha),
                        "epoch": epoch, "model": students.model_state(k, batches),
                        "optimizer": students.optimizer_state(k, schedule.value(batches)),
                        "scheduler": {"iteration": batches}, "logs": logs[k], "train_images": train_images[k],
                        "train_time_s": train_time[k], "wall_time_s": wall_time[k],
                    }, member.state_path)
        if callback is not None:
            for log in epoch_logs:
                callback({"event": "epoch_end", **log, "epochs": config.epochs})
    epoch_bar.close()
    final = students.final_models(config.epochs * iters_per_epoch)
    return [StepResult(model=final[k], epochs=logs[k], val_probs=val_probs[k], train_images=train_images[k],
                       train_time_s=train_time[k], wall_time_s=wall_time[k]) for k in range(n)]


def _raise_non_finite(loss_sums: list[float], members: Sequence[Member], seed: int, step: int, epoch: int,
                      batches: int):
    k = next(k for k, v in enumerate(loss_sums) if not math.isfinite(v))
    raise FloatingPointError(
        f"non-finite training loss ({loss_sums[k]}) at seed={seed}, chain={members[k].chain!r}, step={step}, "
        f"epoch={epoch} (within its first {batches} batches); the run stops here and earlier results are kept. "
        f"Lower TrainConfig.lr or check the data."
    )
