"""Several ResNet-50s trained as one network: the self-distillation chains of one step, batched for throughput.

At a step of the protocol every chain of a seed trains a ResNet-50 from the *same* initialization
(``build_model(seed, step)``) on the *same* data order and augmentation; the chains differ only by their alpha
and their teacher. On a GPU, n small ResNet-50s at batch B each leave the device mostly idle; fused into one
network with grouped convolutions they run as one set of kernels at n times the work per launch.

Layout. Model ``i`` owns channels ``[i*c, (i+1)*c)`` of every activation with ``c`` channels per model, so

* every ``Conv2d(in, out, k, groups=g)`` becomes ``Conv2d(n*in, n*out, k, groups=n*g)`` with the n weights
  concatenated along dim 0 (group ``i`` sees exactly model ``i``'s input channels and writes its outputs);
* every ``BatchNorm2d(c)`` becomes ``BatchNorm2d(n*c)``: batch norm is per channel, so this *is* n separate
  batch norms (same batch statistics, same running statistics, same momentum and eps);
* ReLU, max-pool, the residual additions and the global average pool are elementwise or per channel, so they
  need no change (a block's input and its downsample path have the same layout);
* the stem convolution reads the shared (B, 3, H, W) images with ``groups=1`` (its (n*64, 3, 7, 7) weight is
  exactly the n stems stacked), or per-model images (n, B, 3, H, W) with ``groups=n``;
* the classifier is a grouped linear: weight (n, 2048, K) (model i's ``fc.weight`` transposed), bias (n, K),
  output logits (n, B, K).

Every batched tensor is model-major along dim 0 (``t.unflatten(0, (n, -1))[i]`` is model i's slice), which is
what :func:`unstack`, :meth:`BatchedResNet50.l2_norms` and the optimizer state rely on.

Training. The models share no parameter, so the gradient of ``losses.sum()`` with respect to model i's slice is
the gradient of ``losses[i]`` alone: minimize the SUM of the per-model losses (not the mean, which would scale
every gradient by 1/n). Adam (and AdamW, and SGD with momentum) update each parameter element from that element's
own gradient history only, so one Adam over the batched parameters is exactly n separate Adams with the same
hyper-parameters and step count (an lr schedule is shared, as it is between the chains of a step). Anything that
couples elements across models would break this: gradient clipping by a global norm, a loss averaged over models
with an eps-sensitive optimizer, LARS/LAMB-style per-tensor trust ratios.

Numerically the batched network is the same computation in a different kernel (grouped vs. dense convolution),
so results agree with n separate models to floating-point rounding, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sdlib.models import build_model

__all__ = ["BatchedResNet50", "stack_models", "unstack", "model_slice", "batched_distillation_loss",
           "batched_l2_penalty", "BatchedStudents", "evaluate_batched"]

IN_CHANNELS = 3
FEATURES = 2048  # ResNet-50's penultimate width


class _StemConv2d(nn.Conv2d):
    """The first convolution of n models: weight (n*out, in, k, k) = the n stems stacked along dim 0.

    Shared input (B, in, H, W): one dense convolution (``groups=1``) gives all n models' outputs, model-major.
    Per-model input, already laid out as (B, n*in, H, W): a grouped convolution (``groups=n``).
    """

    def __init__(self, n_models: int, conv: nn.Conv2d, **factory):
        super().__init__(n_models * conv.in_channels, n_models * conv.out_channels, conv.kernel_size,
                         stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=n_models,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode, **factory)
        self.n_models = n_models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = 1 if x.shape[1] == self.in_channels // self.n_models else self.groups
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


class _GroupedLinear(nn.Module):
    """n linear layers on model-major features (B, n*F) -> (n, B, K); weight (n, F, K), bias (n, K)."""

    def __init__(self, n_models: int, in_features: int, out_features: int, **factory):
        super().__init__()
        self.n_models, self.in_features, self.out_features = n_models, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_models, in_features, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(n_models, out_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.reshape(x.shape[0], self.n_models, self.in_features).transpose(0, 1)  # (n, B, F)
        return torch.baddbmm(self.bias.unsqueeze(1), features, self.weight)

    def extra_repr(self) -> str:
        return f"n_models={self.n_models}, in_features={self.in_features}, out_features={self.out_features}"


class _PointwiseMatmulConv2d(nn.Conv2d):
    """A grouped 1x1 convolution of n models (weight (n*out, in, 1, 1), ``groups=n``: the layout of the grouped
    convolution it replaces) computed as one batched matrix product: (n, B*H*W, in) @ (n, in, out). For channels-
    last activations the reshapes are views; whether it beats cuDNN's grouped kernels is a measurement
    (``TrainConfig.chains_in_flight = "batched-matmul"``). A stride s subsamples first (a 1x1 convolution with
    stride s and no padding sees every s-th pixel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, (s_h, s_w) = self.groups, self.stride
        if (s_h, s_w) != (1, 1):
            x = x[:, :, ::s_h, ::s_w]
        batch, channels, height, width = x.shape
        c_in, c_out = channels // n, self.out_channels // n
        pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, n, c_in).transpose(0, 1)  # (n, BHW, in)
        weight = self.weight.reshape(n, c_out, c_in).transpose(1, 2)  # (n, in, out)
        out = torch.bmm(pixels, weight)  # (n, BHW, out)
        out = out.transpose(0, 1).reshape(batch, height, width, n * c_out).permute(0, 3, 1, 2)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


POINTWISE = ("conv", "matmul")


def _batch_modules(module: nn.Module, n: int, factory: dict, pointwise: str = "conv") -> None:
    """Replace, in place and recursively, every Conv2d / BatchNorm2d by its n-model grouped version (1x1
    convolutions as batched matrix products where ``pointwise == "matmul"``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            matmul = (pointwise == "matmul" and child.kernel_size == (1, 1) and child.groups == 1
                      and child.padding == (0, 0) and child.dilation == (1, 1))
            new = (_PointwiseMatmulConv2d if matmul else nn.Conv2d)(n * child.in_channels, n * child.out_channels, child.kernel_size, stride=child.stride,
                            padding=child.padding, dilation=child.dilation, groups=n * child.groups,
                            bias=child.bias is not None, padding_mode=child.padding_mode, **factory)
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm2d(n * child.num_features, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine, track_running_stats=child.track_running_stats, **factory)
        elif isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm3d)):
            raise TypeError(f"cannot batch {type(child).__name__} at {name!r}")  # not in a ResNet-50 body
        else:
            _batch_modules(child, n, factory, pointwise)
            continue
        setattr(module, name, new)


def _check_n_models(n_models) -> int:
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
        raise ValueError(f"n_models must be an int >= 1, got {n_models!r}")
    return n_models


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def _reference_shapes(num_classes: int) -> dict[str, torch.Size]:
    """The state_dict keys and shapes of one torchvision resnet50(num_classes) (built on the meta device)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in torchvision.models.resnet50(num_classes=num_classes).state_dict().items()}


class BatchedResNet50(nn.Module):
    """``n_models`` torchvision ResNet-50s (ImageNet stem, ``num_classes`` outputs) as one grouped network.

    ``BatchedResNet50(n)`` initializes the n models independently, one after the other, from the global RNG:
    it equals ``stack_models([resnet50(num_classes=K) for _ in range(n)])`` under the same RNG state. Use
    :func:`stack_models` to batch given models (e.g. n copies of ``build_model(seed, step)``).

    forward(x): x (B, 3, H, W) images shared by every model, or (n, B, 3, H, W) one batch per model
    -> logits (n, B, num_classes). Train/eval mode, ``.to()``, ``channels_last`` and autocast work as for one
    ResNet-50. State-dict keys are those of one resnet50; tensors are model-major along dim 0 (``fc.weight`` is
    (n, 2048, K), the transposed per-model weights stacked).
    """

    def __init__(self, n_models: int, num_classes: int = 10, *, init: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 pointwise: str = "conv"):
        super().__init__()
        if pointwise not in POINTWISE:
            raise ValueError(f"pointwise must be one of {list(POINTWISE)}, got {pointwise!r}")
        self.n_models = _check_n_models(n_models)
        self.num_classes = _check_num_classes(num_classes)
        # The structure comes from a template built on the meta device: no memory, no RNG draws.
        with torch.device("meta"):
            template = torchvision.models.resnet50(num_classes=num_classes)
            factory = {"device": "meta"}
            stem = _StemConv2d(n_models, template.conv1, **factory)
            fc = _GroupedLinear(n_models, template.fc.in_features, num_classes, **factory)
            body = nn.Sequential(template.bn1, template.layer1, template.layer2, template.layer3, template.layer4)
            _batch_modules(body, n_models, factory, pointwise)
        self.conv1 = stem
        self.bn1, self.relu, self.maxpool = body[0], template.relu, template.maxpool
        template.layer1, template.layer2, template.layer3, template.layer4 = body[1], body[2], body[3], body[4]
        self.layer1, self.layer2, self.layer3, self.layer4 = (template.layer1, template.layer2, template.layer3,
                                                              template.layer4)
        self.avgpool = template.avgpool
        self.fc = fc
        self.to_empty(device=device if device is not None else "cpu")
        if dtype is not None:
            self.to(dtype)
        if init:
            with torch.no_grad():
                for i in range(n_models):
                    self.load_model_state_dict(i, torchvision.models.resnet50(num_classes=num_classes).state_dict())
        else:  # defined values until the caller loads its models (to_empty leaves memory uninitialized)
            with torch.no_grad():
                for t in self.state_dict().values():
                    t.zero_()

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n_models
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4:
            if x.shape[1] != IN_CHANNELS or x.shape[0] < 1:
                raise ValueError(f"x must have shape (B, {IN_CHANNELS}, H, W) with B >= 1 (shared by the {n} models) "
                                 f"or (n_models={n}, B, {IN_CHANNELS}, H, W), got {tuple(x.shape)}")
        elif x.dim() == 5:
            if x.shape[0] != n or x.shape[2] != IN_CHANNELS or x.shape[1] < 1:
                raise ValueError(f"x with 5 dims must have shape (n_models={n}, B, {IN_CHANNELS}, H, W) with B >= 1, "
                                 f"got {tuple(x.shape)}")
            # (n, B, 3, H, W) -> (B, n*3, H, W), model-major channels, for the grouped stem.
            x = x.transpose(0, 1).reshape(x.shape[1], n * IN_CHANNELS, x.shape[3], x.shape[4])
        else:
            raise ValueError(f"x must have shape (B, {IN_CHANNELS}, H, W) or (n_models={n}, B, {IN_CHANNELS}, H, W), "
                             f"got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # (B, n*2048), model-major
        return self.fc(x)  # (n, B, K)

    # ------------------------------------------------------------------------------------ per-model access

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_models:
            raise ValueError(f"index must be an int in [0, {self.n_models}), got {index!r}")
        return index

    def model_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Model ``index``'s weights as a state_dict of one torchvision resnet50 (copies, same device/dtype),
        loadable with ``build_model().load_state_dict(...)``."""
        index = self._check_index(index)
        return {key: model_slice(key, t, index, self.n_models).clone() for key, t in self.state_dict().items()}

    @torch.no_grad()
    def load_model_state_dict(self, index: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy one resnet50 state_dict (same num_classes) into model ``index``'s slices."""
        index = self._check_index(index)
        own = self.state_dict()
        if set(state_dict) != set(own):
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            raise ValueError(f"state_dict must hold the keys of resnet50(num_classes={self.num_classes}); "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, t in own.items():
            target = model_slice(key, t, index, self.n_models)
            source = state_dict[key]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"state_dict[{key!r}] must have shape {tuple(target.shape)}, "
                                 f"got {tuple(source.shape)}")
            if t.dim() == 0:  # num_batches_tracked: one counter shared by the n batch norms
                t.copy_(source)
            else:
                target.copy_(source)

    def l2_norms(self) -> torch.Tensor:
        """(n,) per model: the sum over its parameter tensors of their L2 norms (= ``l2_penalty`` of model i).

        One norm kernel per batched parameter (dims 1.. of the model-major view), whatever n; the gradient at a
        zero slice (batch-norm biases at initialization) is 0, not NaN.
        """
        n = self.n_models
        norms = [torch.linalg.vector_norm(p.unflatten(0, (n, -1)), dim=tuple(range(1, p.dim() + 1)))
                 for p in self.parameters() if p.requires_grad]
        return torch.stack(norms).sum(0)

    def extra_repr(self) -> str:
        return f"n_models={self.n_models}, num_classes={self.num_classes}"


def model_slice(key: str, tensor: torch.Tensor, index: int, n_models: int) -> torch.Tensor:
    """Model ``index``'s part of a batched state_dict entry ``key``, shaped like the single-model entry (a view).

    Works for anything laid out like the parameters, e.g. Adam's ``exp_avg`` / ``exp_avg_sq`` of a parameter,
    so per-chain optimizer state can be cut out the same way. Scalars (``num_batches_tracked``, Adam's ``step``)
    are shared and returned as is.
    """
    if tensor.dim() == 0:
        return tensor
    if key in ("fc.weight", "fc.bias"):  # the grouped linear stores one (F, K) weight / (K,) bias per model
        return tensor[index].transpose(0, 1) if key == "fc.weight" else tensor[index]  # -> nn.Linear's (K, F)
    return tensor.unflatten(0, (n_models, -1))[index]


def _check_models(models) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ValueError(f"models must be a non-empty list of resnet50 modules, got {type(models).__name__}")
    models = list(models)
    if not models:
        raise ValueError("models must be a non-empty list of resnet50 modules, got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ValueError(f"models[{i}] must be a torch.nn.Module (a torchvision resnet50), got {type(m).__name__}")
    return models


def stack_models(models: Sequence[nn.Module], pointwise: str = "conv") -> BatchedResNet50:
    """Fuse n torchvision resnet50 models (same num_classes; the same module may repeat) into one
    :class:`BatchedResNet50` on their device and dtype, in train mode; the inputs are not modified.
    ``pointwise="matmul"``: its 1x1 convolutions as batched matrix products (same weights, same function)."""
    models = _check_models(models)
    fc = getattr(models[0], "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError("models[0] must be a torchvision resnet50 (with an nn.Linear fc layer)")
    num_classes = fc.out_features
    expected = _reference_shapes(num_classes)
    first = next(models[0].parameters())
    for i, m in enumerate(models):
        shapes = {k: v.shape for k, v in m.state_dict().items()}
        if shapes != expected:
            raise ValueError(f"models[{i}] must be a torchvision resnet50(num_classes={num_classes}) "
                             f"(its state_dict keys/shapes differ)")
        p = next(m.parameters())
        if p.device != first.device or p.dtype != first.dtype:
            raise ValueError(f"models must share one device and dtype: models[0] is {first.device}/{first.dtype}, "
                             f"models[{i}] is {p.device}/{p.dtype}")
    batched = BatchedResNet50(len(models), num_classes, init=False, device=first.device, dtype=first.dtype,
                              pointwise=pointwise)
    for i, m in enumerate(models):
        batched.load_model_state_dict(i, m.state_dict())
    return batched


def unstack(batched: BatchedResNet50) -> list[dict[str, torch.Tensor]]:
    """The n models' weights as n resnet50 state_dicts (copies), each loadable into ``build_model()``."""
    if not isinstance(batched, BatchedResNet50):
        raise ValueError(f"batched must be a BatchedResNet50, got {type(batched).__name__}")
    return [batched.model_state_dict(i) for i in range(batched.n_models)]


def batched_l2_penalty(batched: BatchedResNet50, coef: float = 1.0) -> torch.Tensor:
    """(n,) ``coef * l2_norms()``: per model, :func:`sdlib.train.l2_penalty` of that model alone."""
    if not isinstance(batched, BatchedResNet50):
        raise ValueError(f"batched must be a BatchedResNet50, got {type(batched).__name__}")
    return coef * batched.l2_norms()


def batched_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, alphas,
                              teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) per model i: ``alphas[i] * MSE(softmax(s_i), onehot(y)) + (1 - alphas[i]) * MSE(softmax(s_i), t_i)``,
    i.e. :func:`sdlib.train.distillation_loss` of model i (MSE = mean over batch x classes).

    logits : (n, B, K) student outputs (any float dtype). With autocast disabled, the loss is computed in float32,
        as distillation_loss does (bf16/fp16/fp32 logits), or in float64 for float64 logits, so that float64
        equivalence tests are not seeded with float32 noise. Returns (n,) of that dtype.
    labels : (B,) int64 class indices, shared by the n models.
    alphas : (n,) weights of the labels, finite (in [0, 1] for fixed chains; an unbounded alpha-hat may lie
        outside), a sequence or tensor.
    teacher_probs : (n, B, K) teacher softmax outputs, or None when every alpha is 1. Rows of models with
        alpha == 1 are ignored (any placeholder, even NaN, is fine there).
    Minimize ``losses.sum()`` (plus the L2 terms): each model then gets exactly its own gradient.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor of shape (n_models, B, K), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    n, batch, k = logits.shape
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape (B,) = ({batch},), got "
                         f"{(tuple(labels.shape), labels.dtype) if isinstance(labels, torch.Tensor) else labels!r}")
    alpha_values = alphas.detach().cpu().tolist() if isinstance(alphas, torch.Tensor) else alphas
    if isinstance(alpha_values, (str, bytes)) or not isinstance(alpha_values, Sequence):
        raise ValueError(f"alphas must be a sequence of {n} finite floats, got {alphas!r}")
    alpha_values = list(alpha_values)
    if len(alpha_values) != n:
        raise ValueError(f"alphas must have one entry per model (n_models = {n} from logits), "
                         f"got {len(alpha_values)}")
    for a in alpha_values:
        # fixed alphas lie in [0, 1]; an unbounded alpha-hat (TrainConfig.alpha_hat_bounds=None) may not
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alphas must be finite numbers, got {alpha_values!r}")
    needs_teacher = any(a != 1.0 for a in alpha_values)
    if teacher_probs is None:
        if needs_teacher:
            raise ValueError(f"teacher_probs is required when some alpha != 1, got alphas={alpha_values!r}")
    elif not isinstance(teacher_probs, torch.Tensor) or teacher_probs.shape != logits.shape:
        got = tuple(teacher_probs.shape) if isinstance(teacher_probs, torch.Tensor) else repr(teacher_probs)
        raise ValueError(f"teacher_probs must have the shape of logits {tuple(logits.shape)}, got {got}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.to(dtype), dim=2)
        # 1 - alpha in float64 before rounding, as Python does for distillation_loss: float32(1 - 0.4) is one ulp
        # away from 1 - float32(0.4).
        alpha64 = torch.tensor(alpha_values, dtype=torch.float64)
        alpha = alpha64.to(device=logits.device, dtype=dtype)
        onehot = F.one_hot(labels, k).to(dtype)
        losses = alpha * (probs - onehot).square().mean(dim=(1, 2))
        if needs_teacher:
            # alpha == 1 rows are zeroed so a placeholder (even NaN) cannot leak into the value or the gradient.
            target = teacher_probs.detach().to(dtype).masked_fill((alpha == 1.0).view(n, 1, 1), 0.0)
            teacher_weight = (1.0 - alpha64).to(device=logits.device, dtype=dtype)
            losses = losses + teacher_weight * (probs - target).square().mean(dim=(1, 2))
    return losses


# ----------------------------------------------------------------------------------- the in-flight network

class BatchedStudents:
    """The students of one (seed, step) trained in flight as one :class:`BatchedResNet50`
    (``TrainConfig.chains_in_flight = "batched"``), with the interface of the step's lockstep engine
    (:func:`sdlib.step.distill_group` drives both).

    models : n resnet50s (their initial or resumed weights, on the training device and memory format).
    alphas : their alphas. l2_coef : the L2 term's coefficient. lr : the schedule's 0-dim device tensor.
    pointwise : "conv" (grouped 1x1 convolutions) or "matmul" (batched matrix products), see stack_models.
    The step minimizes the SUM of the n objectives (each model gets exactly its own gradient); the L2 term's
    value and its gradient ``coef * W_i / ||W_i||`` per model slice W_i are computed without autograd, by
    multi-tensor ops over views made once (gradients live in persistent buffers, so the views stay valid);
    one fused Adam updates the n models (exactly n Adams, see the module's docstring).
    """

    def __init__(self, models: Sequence[nn.Module], alphas: Sequence[float], l2_coef: float, lr: torch.Tensor,
                 *, use_bf16: bool = False, memory_format=torch.contiguous_format, pointwise: str = "conv"):
        from sdlib.step import _BatchCounters  # noqa: PLC0415 (sdlib.step imports this module lazily)
        self.n, self.memory_format = len(models), memory_format
        self.net = stack_models(models, pointwise).to(memory_format=memory_format)
        self.device = next(self.net.parameters()).device
        self.on_cuda = self.device.type == "cuda"
        self.use_bf16, self.coef, self.lr = use_bf16, float(l2_coef), lr
        self.counters = _BatchCounters(self.net)
        self.names = [name for name, p in self.net.named_parameters() if p.requires_grad]
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        n = self.n
        # Model-major views, p-major order: slices[j * n + i] is model i's part of parameter j.
        self.param_slices = [s for p in self.params for s in p.detach().unflatten(0, (n, -1)).unbind(0)]
        self.grad_slices = [s for p in self.params for s in p.grad.unflatten(0, (n, -1)).unbind(0)]
        self.grads = [p.grad for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, fused=True, capturable=self.on_cuda)
        alpha64 = torch.tensor([float(a) for a in alphas], dtype=torch.float64)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        self.alpha = alpha64.to(self.device, dtype).view(n, 1, 1)
        # 1 - alpha rounded from float64, as Python does for distillation_loss.
        self.teacher_weight = (1.0 - alpha64).to(self.device, dtype).view(n, 1, 1)
        self.needs_teacher = bool((alpha64 < 1.0).any())
        self.loss_sum = torch.zeros(n, device=self.device)
        self.loss_sums = list(self.loss_sum.unbind(0))

    def __len__(self):
        return self.n

    def networks(self) -> list[nn.Module]:
        return [self.net]

    def train(self):
        self.net.train()

    def step(self, x: torch.Tensor, onehot: torch.Tensor, targets: torch.Tensor | None) -> None:
        """One optimizer step of the n models on the static batch x (B, 3, H, W), one-hot labels (B, C) and
        the teachers' probabilities (n, B, C) (None when every alpha is 1)."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.net(x)  # (n, B, C)
        with torch.autocast(device_type=self.device.type, enabled=False):
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=2)
            per_element = self.alpha * (probs - onehot).square()
            if self.needs_teacher:
                per_element = per_element + self.teacher_weight * (probs - targets).square()
            losses = per_element.mean(dim=(1, 2))  # (n,) the distillation losses
        torch._foreach_zero_(self.grads)
        losses.sum().backward()
        with torch.no_grad():
            self.loss_sum.add_(losses)
            if self.coef:
                norms = torch.stack(torch._foreach_norm(self.param_slices))  # (P * n,)
                scales = norms.clamp_min(torch.finfo(norms.dtype).tiny).reciprocal_().mul_(self.coef).unbind()
                torch._foreach_addcmul_(self.grad_slices, self.param_slices, list(scales))
                self.loss_sum.add_(norms.view(-1, self.n).sum(0), alpha=self.coef)
        self.optimizer.step()

    def evaluate(self, x_uint8, y, batch_size, bf16, channels_last, return_probs) -> list[dict]:
        return evaluate_batched(self.net, x_uint8, y, batch_size, bf16=bf16, channels_last=channels_last,
                                return_probs=return_probs)

    def model_state(self, i: int, batches: int) -> dict:
        self.counters.restore(batches)
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.model_state_dict(i).items()}
        self.counters.detach()
        return state

    def load(self, i: int, optimizer_state: dict) -> None:
        """Model i's Adam state (a one-model ``torch.optim.Adam`` state_dict) into its slices."""
        saved = optimizer_state["state"]
        if len(saved) != len(self.params):
            raise ValueError(f"optimizer state of model {i} holds {len(saved)} parameters, expected "
                             f"{len(self.params)}")
        with torch.no_grad():
            for j, (name, p) in enumerate(zip(self.names, self.params)):
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=self.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                entry = saved[j] if j in saved else saved[str(j)]
                state["step"].copy_(entry["step"])  # shared by the n models: they stand at the same step
                for key in ("exp_avg", "exp_avg_sq"):
                    model_slice(name, state[key], i, self.n).copy_(entry[key])

    def optimizer_state(self, i: int, lr: float) -> dict:
        """Model i's Adam state as a one-model ``torch.optim.Adam(model.parameters())`` state_dict."""
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        group.update(lr=lr, params=list(range(len(self.params))))
        state = {}
        for j, (name, p) in enumerate(zip(self.names, self.params)):
            s = self.optimizer.state.get(p)
            if s:
                state[j] = {"step": s["step"].detach().to("cpu", copy=True),
                            **{k: model_slice(name, s[k], i, self.n).detach().to("cpu", copy=True)
                               for k in ("exp_avg", "exp_avg_sq")}}
        return {"state": state, "param_groups": [group]}

    def final_models(self, batches: int) -> list[nn.Module]:
        """The n trained models as separate resnet50s (eval mode, on the training device)."""
        self.counters.restore(batches)
        models = []
        for i in range(self.n):
            model = build_model().to(self.device, memory_format=self.memory_format)
            model.load_state_dict(self.net.model_state_dict(i))
            models.append(model.eval())
        return models


@torch.inference_mode()
def evaluate_batched(net: BatchedResNet50, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
                     bf16: bool = False, channels_last: bool = False, return_probs: bool = False) -> list[dict]:
    """:func:`sdlib.step.evaluate` of each of the n models of ``net`` (put in eval mode) at once: a list of n
    ``{"acc", "loss"}`` (plus ``"probs"``, float32 (N, C) on the CPU, with ``return_probs``). With N = 0 (no
    validation split: ``n_val=0``) acc and loss are None, as evaluate gives."""
    from sdlib import data as cifar  # noqa: PLC0415
    net.eval()
    device, n = x_uint8.device, net.n_models
    if len(x_uint8) == 0:
        return [{"acc": None, "loss": None, **({"probs": torch.zeros(0, net.num_classes)} if return_probs else {})}
                for _ in range(n)]
    dtype = next(net.parameters()).dtype
    correct = torch.zeros(n, device=device, dtype=torch.int64)
    squared = torch.zeros(n, device=device, dtype=torch.float64)
    probs_out = []
    for start in range(0, len(x_uint8), batch_size):
        x = cifar.normalize(x_uint8[start:start + batch_size]).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = y[start:start + batch_size]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        probs = torch.softmax(logits.float(), dim=2)  # (n, B, C)
        correct += (probs.argmax(dim=2) == labels).sum(dim=1)
        onehot = F.one_hot(labels, probs.shape[2]).float()
        squared += (probs - onehot).square().sum(dim=(1, 2), dtype=torch.float64)
        if return_probs:
            probs_out.append(probs)
    count = len(x_uint8)
    acc, sq = correct.tolist(), squared.tolist()
    results = [{"acc": acc[i] / count, "loss": sq[i] / (count * net.num_classes)} for i in range(n)]
    if return_probs:
        probs = torch.cat(probs_out, dim=1).cpu()
        for i in range(n):
            results[i]["probs"] = probs[i].clone()
    return results
