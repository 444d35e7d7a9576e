"""The fast path: :func:`sdlib.step.train_on_batch` made lean for a GPU, one interface: :class:`LeanStep`,
held equal to the readable step by ``tests/test_step.py``.

At the paper's batch of 16 the host dispatching ATen ops is the bottleneck (``benchmarks/step_ops.py``), so the
batch goes into static buffers, the L2 gradient ``coef * W / ||W||`` is added after ``backward()``, Adam is fused
(``capturable`` on CUDA), the lr is read from a device tensor, and a frozen teacher runs once per batch with its
batch norms folded (``teacher_bn="eval"``). Nothing waits for the device, so on CUDA the step is captured as one
CUDA graph and replayed (``TrainConfig.capture``); on the CPU it runs eagerly.

The models of one (seed, step) train in flight on the same batches (``TrainConfig.chains_in_flight``):
"batched" fuses them into one :class:`sdlib.batched.BatchedResNet50` (ResNet-50 only); "streams" steps separate
models one after the other, each on its own CUDA stream on a GPU. "streams" is the simplest way to run the models
the batched network does not cover (the cpu profile's cnn4), and on the CPU it runs exactly the ops of separate
runs.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from sdlib.augment import augment
from sdlib.batched import model_slice, stack_models
from sdlib.config import NUM_CLASSES, TrainConfig, device_precision
from sdlib.models import build_model, fold_batch_norms, teacher_probs

__all__ = ["LeanStep", "distillation_loss", "l2_norms", "add_l2_grad_", "lr_factor"]


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * MSE(softmax(s), onehot(y)) + (1 - alpha) * MSE(softmax(s), teacher_probs)``, the authors' form
    (see :func:`sdlib.step.train_on_batch`). labels: (B,) class indices or their (B, C) one-hot rows;
    teacher_probs may be None at alpha = 1. Computed in float32 (float64 for float64 logits), also under autocast."""
    if teacher_probs is None and alpha != 1.0:
        raise ValueError(f"teacher_probs is required when alpha != 1, got alpha={alpha!r} and no teacher")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.to(dtype), dim=1)
        onehot = labels.to(dtype) if labels.dim() == 2 else F.one_hot(labels, probs.shape[1]).to(dtype)
        loss = alpha * F.mse_loss(probs, onehot)
        if alpha != 1.0:
            loss = loss + (1.0 - alpha) * F.mse_loss(probs, teacher_probs.to(dtype))
    return loss


def l2_norms(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(P,) the L2 norm of each tensor, one fused kernel, outside autograd: the L2 term is ``coef * sum``."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(list(params)))


@torch.no_grad()
def add_l2_grad_(params: Sequence[torch.Tensor], norms: torch.Tensor, coef: float,
                 grads: Sequence[torch.Tensor] | None = None) -> None:
    """``grad += coef * W / ||W||`` for every W of ``params`` (their ``.grad``, or ``grads``): the gradient of
    ``coef * sum_W ||W||`` at ``norms`` = :func:`l2_norms`, in 6 ops where autograd takes ~800 for ResNet-50.
    ``||W||`` is clamped to the smallest normal float, so W = 0 gets 0, as autograd's masked norm gives."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    scales = norms.clamp_min(torch.finfo(norms.dtype).tiny).reciprocal_().mul_(coef).unbind()
    torch._foreach_addcmul_(grads, list(params), list(scales))


def lr_factor(iteration: int, warmup_iters: int, total_iters: int, schedule: str) -> float:
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
    """:func:`lr_factor` times the base lr for every batch, as a float32 device table: ``lr``, the 0-dim tensor
    Adam reads, is the table's entry at a device counter that the step advances (no host sync, so a CUDA graph
    replays it). :meth:`value` is the host's, for the logs."""

    def __init__(self, config: TrainConfig, iters_per_epoch: int, device: torch.device):
        self.base, self.schedule = config.lr, config.lr_schedule
        self.total, self.warmup = config.epochs * iters_per_epoch, config.warmup_epochs * iters_per_epoch
        self.constant = self.schedule == "constant" and self.warmup == 0
        values = [self.base] if self.constant else [self.value(i) for i in range(self.total + 1)]
        self.table = torch.tensor(values, dtype=torch.float32, device=device)
        self.iteration = torch.zeros(1, dtype=torch.int64, device=device)
        self.lr = self.table[0].clone()

    def start_at(self, iteration: int) -> None:
        self.iteration.fill_(0 if self.constant else min(iteration, self.total))
        self.lr.copy_(self.table.index_select(0, self.iteration)[0])

    def advance(self) -> None:
        if not self.constant:
            self.iteration.add_(1).clamp_(max=self.total)
            self.lr.copy_(self.table.index_select(0, self.iteration)[0])

    def value(self, iteration: int) -> float:
        return self.base * lr_factor(iteration, self.warmup, self.total, self.schedule)


class _Separate:
    """n students, each its own network and fused Adam, stepped on the same batch one after the other (each on
    its own CUDA stream on a GPU, forked and joined inside the one captured graph); n = 1: one model at a time."""

    def __init__(self, models: list, alphas: list[float], coef: float, lr: torch.Tensor, use_bf16: bool):
        self.networks, self.alphas, self.coef, self.use_bf16, self.device = models, alphas, coef, use_bf16, lr.device
        self.on_cuda = self.device.type == "cuda"
        self.params = [[p for p in m.parameters() if p.requires_grad] for m in models]
        # Adam without weight decay: the paper's regularizer is the (unsquared) L2 norm term.
        self.optimizers = [torch.optim.Adam(ps, lr=lr, fused=True, capturable=self.on_cuda) for ps in self.params]
        self.loss_sums = [torch.zeros((), device=self.device) for _ in models]
        self.streams = [torch.cuda.Stream(self.device) for _ in models] if self.on_cuda and len(models) > 1 \
            else None

    def step(self, x: torch.Tensor, onehot: torch.Tensor, targets: list) -> None:
        if self.streams is None:
            for i in range(len(self.networks)):
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
        model, params, optimizer = self.networks[i], self.params[i], self.optimizers[i]
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

    def load_optimizer(self, i: int, state: dict) -> None:
        optimizer = self.optimizers[i]
        lr = optimizer.param_groups[0]["lr"]
        optimizer.load_state_dict(state)  # then this run's device lr tensor and fused/capturable flags again
        for group in optimizer.param_groups:
            group.update(lr=lr, fused=True, capturable=self.on_cuda, foreach=None)
        for p_state in optimizer.state.values():
            p_state["step"] = p_state["step"].to(device=self.device, dtype=torch.float32)

    def model_state(self, i: int) -> dict:
        return self.networks[i].state_dict()

    def optimizer_state(self, i: int) -> dict:
        return self.optimizers[i].state_dict()

    def final_models(self) -> list:
        return [m.eval() for m in self.networks]


class _Batched:
    """n ResNet-50 students as one :class:`sdlib.batched.BatchedResNet50` and one fused Adam, stepped on the sum of
    the n losses; the L2 term per model slice, through views made once (gradients live in persistent buffers)."""

    def __init__(self, models: list, alphas: list[float], coef: float, lr: torch.Tensor, use_bf16: bool,
                 memory_format):
        self.n, self.memory_format, self.coef, self.use_bf16 = len(models), memory_format, coef, use_bf16
        self.net = stack_models(models).to(memory_format=memory_format)
        self.networks, self.device = [self.net], lr.device
        self.names = [name for name, p in self.net.named_parameters() if p.requires_grad]
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        # Model-major views, p-major order: slices[j * n + i] is model i's part of parameter j.
        self.param_slices = [s for p in self.params for s in p.detach().unflatten(0, (self.n, -1)).unbind(0)]
        self.grad_slices = [s for g in self.grads for s in g.unflatten(0, (self.n, -1)).unbind(0)]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, fused=True, capturable=self.device.type == "cuda")
        alpha64 = torch.tensor(alphas, dtype=torch.float64)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        # 1 - alpha rounded from float64, as Python does for distillation_loss: float32(1 - 0.4) != 1 - float32(0.4)
        self.alpha = alpha64.to(self.device, dtype).view(-1, 1, 1)
        self.teacher_weight = (1.0 - alpha64).to(self.device, dtype).view(-1, 1, 1)
        self.needs_teacher = bool((alpha64 != 1.0).any())
        self.loss_sum = torch.zeros(self.n, device=self.device)
        self.loss_sums = list(self.loss_sum.unbind(0))

    def step(self, x: torch.Tensor, onehot: torch.Tensor, targets: torch.Tensor | None) -> None:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.net(x)  # (n, B, C)
        with torch.autocast(device_type=self.device.type, enabled=False):
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=2)
            per_element = self.alpha * (probs - onehot).square()
            if self.needs_teacher:
                per_element = per_element + self.teacher_weight * (probs - targets).square()
            losses = per_element.mean(dim=(1, 2))
        torch._foreach_zero_(self.grads)
        losses.sum().backward()
        with torch.no_grad():
            self.loss_sum.add_(losses)
            if self.coef:
                norms = l2_norms(self.param_slices)  # (P * n,)
                add_l2_grad_(self.param_slices, norms, self.coef, self.grad_slices)
                self.loss_sum.add_(norms.view(-1, self.n).sum(0), alpha=self.coef)
        self.optimizer.step()

    def load_optimizer(self, i: int, saved: dict) -> None:
        """Model i's Adam state (a one-model ``torch.optim.Adam`` state_dict) into its slices."""
        saved = saved["state"]
        if len(saved) != len(self.params):
            raise ValueError(f"optimizer state of model {i} holds {len(saved)} parameters, expected "
                             f"{len(self.params)}")
        with torch.no_grad():
            for j, (name, p) in enumerate(zip(self.names, self.params)):
                state = self.optimizer.state[p]
                if not state:
                    state.update(step=torch.zeros((), device=self.device), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                entry = saved[j] if j in saved else saved[str(j)]
                state["step"].copy_(entry["step"])  # shared by the n models: they stand at the same step
                for key in ("exp_avg", "exp_avg_sq"):
                    model_slice(name, state[key], i, self.n).copy_(entry[key])

    def model_state(self, i: int) -> dict:
        return self.net.model_state_dict(i)

    def optimizer_state(self, i: int) -> dict:
        """Model i's Adam state as a one-model ``torch.optim.Adam(model.parameters())`` state_dict."""
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        state = {}
        for j, (name, p) in enumerate(zip(self.names, self.params)):
            if s := self.optimizer.state.get(p):
                state[j] = {"step": s["step"].detach().to("cpu", copy=True),
                            **{k: model_slice(name, s[k], i, self.n).detach().to("cpu", copy=True)
                               for k in ("exp_avg", "exp_avg_sq")}}
        return {"state": state, "param_groups": [group]}

    def final_models(self) -> list:
        """The n trained models as separate resnet50s (eval mode, on the training device)."""
        models = []
        for i in range(self.n):
            model = build_model(empty=True).to(self.device, memory_format=self.memory_format)
            model.load_state_dict(self.net.model_state_dict(i))
            models.append(model.eval())
        return models


class _Teachers:
    """Each distinct teacher (by identity: at step 2 every chain's is the shared step-1 model) run once per batch,
    as a copy: batch norms folded for ``bn_mode`` "eval" (eval-mode batch norm is affine), unfolded for "train"
    (batch statistics), cast to bf16 where the students train under bf16 autocast. Returns per member (B, C)
    probabilities or None (alpha = 1), or for batched students one (n, B, C) (alpha = 1 rows: placeholders)."""

    def __init__(self, alphas, teachers, *, bn_mode: str, memory_format, use_bf16: bool, batched: bool):
        distinct = list({id(t): t for a, t in zip(alphas, teachers) if a != 1.0}.values())
        ids = [id(t) for t in distinct]
        self.index = [None if a == 1.0 else ids.index(id(t)) for a, t in zip(alphas, teachers)]
        self.bn_mode, self.batched = bn_mode, batched
        if batched and len(distinct) > 1:  # the distinct teachers as one batched network too
            distinct = [stack_models(distinct)]
        self.models = []
        for teacher in distinct:
            teacher = fold_batch_norms(teacher) if bn_mode == "eval" else copy.deepcopy(teacher)
            teacher = teacher.to(memory_format=memory_format)
            self.models.append(teacher.to(torch.bfloat16) if use_bf16 else teacher)
        if batched and self.models:
            device = next(self.models[0].parameters()).device
            self.member_index = torch.tensor([i or 0 for i in self.index], device=device)

    def __call__(self, x: torch.Tensor):
        outs = [teacher_probs(t, x, self.bn_mode) for t in self.models]
        if not self.batched:
            return [None if i is None else outs[i] for i in self.index]
        if not outs:
            return None
        return (outs[0] if outs[0].dim() == 3 else outs[0].unsqueeze(0)).index_select(0, self.member_index)


class LeanStep:
    """The training step of the models of one (seed, step): ``write_batch`` writes a batch (augmented images,
    one-hot labels) into the static buffers ``x``, ``onehot``; calling the step runs the teachers, every student's
    forward, loss, backward, L2 gradient and Adam, and advances the lr.

    models : the students (fresh or resumed), one per entry of ``alphas`` and ``teachers`` (None where alpha is 1).
    y_train : (N,) the training labels. batched : one :class:`sdlib.batched.BatchedResNet50` or separate networks.
    For the epoch loop: ``loss_sums`` (per model, the objective summed since zeroed), ``networks`` (to evaluate),
    ``schedule``, ``bf16``, ``channels_last``; per model ``load_optimizer``, ``model_state``, ``optimizer_state``.
    """

    def __init__(self, config: TrainConfig, models: list, alphas: Sequence[float], teachers: Sequence,
                 y_train: torch.Tensor, device: str | torch.device, *, batched: bool = False):
        device = torch.device(device)
        if config.capture == "graph" and device.type != "cuda":
            raise ValueError(f"TrainConfig.capture='graph' needs CUDA; the run is on {device.type} "
                             "(use 'auto' or 'none')")
        self.bf16, self.channels_last = device_precision(config, device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        models = [m.to(device, memory_format=memory_format) for m in models]
        alphas = [float(a) for a in alphas]
        self.schedule = _Schedule(config, max(1, len(y_train) // config.batch_size), device)
        if batched:
            self.students = _Batched(models, alphas, config.l2_coef, self.schedule.lr, self.bf16, memory_format)
        else:
            self.students = _Separate(models, alphas, config.l2_coef, self.schedule.lr, self.bf16)
        self.teachers = _Teachers(alphas, teachers, bn_mode=config.teacher_bn, memory_format=memory_format,
                                  use_bf16=self.bf16, batched=batched)
        self.networks, self.loss_sums = self.students.networks, self.students.loss_sums
        self.load_optimizer, self.model_state = self.students.load_optimizer, self.students.model_state
        self.final_models = self.students.final_models
        dtype = next(models[0].parameters()).dtype  # float32 (float64: the tests' exact comparisons)
        self.x = torch.zeros((config.batch_size, 3, 32, 32), dtype=torch.bfloat16 if self.bf16 else dtype,
                             device=device).contiguous(memory_format=memory_format)
        self.onehot = torch.zeros((config.batch_size, NUM_CLASSES), dtype=dtype, device=device)
        self.onehot_train = F.one_hot(y_train, NUM_CLASSES).to(dtype)
        self.device, self.graph, self.warmup_calls = device, None, 0
        self.capture = config.capture == "graph" or (config.capture == "auto" and device.type == "cuda")

    def write_batch(self, x_train: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> None:
        """Outside the step: ``x_train[index]`` augmented (drawing from ``generator``), their one-hot labels."""
        self.x.copy_(augment(x_train[index], generator=generator))
        self.onehot.copy_(self.onehot_train[index])

    def step(self) -> None:
        """The step on the static buffers (what a CUDA graph captures)."""
        self.students.step(self.x, self.onehot, self.teachers(self.x))
        self.schedule.advance()

    def __call__(self) -> None:
        """One step: eagerly, or (``capture``) 3 warm-up steps on a side stream, then captured as one CUDA graph
        (capturing does not run the work, so that call replays it) and replayed ever after."""
        if self.graph is not None:
            return self.graph.replay()
        if not self.capture:
            return self.step()
        main = torch.cuda.current_stream(self.device)
        if self.warmup_calls < 3:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.step()
            main.wait_stream(side)
            self.warmup_calls += 1
            return
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.graph.replay()

    def train(self) -> None:
        for net in self.networks:
            net.train()

    def optimizer_state(self, i: int, iteration: int) -> dict:
        """Model i's Adam state, with the lr at ``iteration`` as a float (as torch.optim writes it)."""
        state = self.students.optimizer_state(i)
        for group in state["param_groups"]:
            group["lr"] = self.schedule.value(iteration)
        return state
