"""Several ResNet-50s as one network: the chains of one self-distillation step, batched for throughput.

At a step every chain of a seed trains a ResNet-50 from the same initialization on the same batches; n ResNet-50s
at batch 16 each leave a GPU mostly idle, fused into one network with grouped convolutions they run as one set
of kernels. Model ``i`` owns channels ``[i*c, (i+1)*c)`` of every activation: ``Conv2d(in, out, k, groups=g)``
becomes ``Conv2d(n*in, n*out, k, groups=n*g)``, ``BatchNorm2d(c)`` becomes ``BatchNorm2d(n*c)`` (exactly n batch
norms); the stem reads the shared (B, 3, H, W) images, the classifier is a grouped linear, logits (n, B, K).
Every batched tensor is model-major along dim 0 (:func:`model_slice`). The models share no parameter, so the
gradient of the sum of their losses is each model's own, and one Adam over the batched parameters is exactly n
Adams (:mod:`sdlib.lean_step`); grouped and dense convolutions round differently, so results agree with n
separate models to rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision
from torch import nn

__all__ = ["BatchedResNet50", "stack_models", "model_slice"]

IN_CHANNELS = 3


def _batch_modules(module: nn.Module, n: int, factory: dict) -> None:
    """Replace, in place and recursively, every Conv2d / BatchNorm2d by its n-model grouped version."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            new = nn.Conv2d(n * child.in_channels, n * child.out_channels, child.kernel_size, stride=child.stride,
                            padding=child.padding, dilation=child.dilation, groups=n * child.groups,
                            bias=child.bias is not None, padding_mode=child.padding_mode, **factory)
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm2d(n * child.num_features, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine, track_running_stats=child.track_running_stats, **factory)
        elif isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm3d)):
            raise TypeError(f"cannot batch {type(child).__name__} at {name!r}")  # not in a ResNet-50 body
        else:
            _batch_modules(child, n, factory)
            continue
        setattr(module, name, new)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class BatchedResNet50(nn.Module):
    """``n_models`` torchvision ResNet-50s (ImageNet stem, ``num_classes`` outputs) as one grouped network.

    ``BatchedResNet50(n)`` initializes the n models independently, one after the other, from the global RNG:
    it equals ``stack_models([resnet50(num_classes=K) for _ in range(n)])`` under the same RNG state. Use
    :func:`stack_models` to batch given models (e.g. n copies of ``build_model(seed, step)``).

    forward(x): x (B, 3, H, W) images shared by every model
    -> logits (n, B, num_classes). Train/eval mode, ``.to()``, ``channels_last`` and autocast work as for one
    ResNet-50. State-dict keys are those of one resnet50; tensors are model-major along dim 0 (``fc.weight`` is
    (n*K, 2048, 1, 1), the per-model weights stacked).
    """

    def __init__(self, n_models: int, num_classes: int = 10, *, init: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.n_models, self.num_classes = _positive_int("n_models", n_models), _positive_int("num_classes", num_classes)
        # The structure comes from a template built on the meta device: no memory, no RNG draws.
        with torch.device("meta"):
            template = torchvision.models.resnet50(num_classes=num_classes)
            factory = {"device": "meta"}
            c = template.conv1  # the stem reads the shared images: its (n*64, 3, 7, 7) weight is the n stems stacked
            stem = nn.Conv2d(c.in_channels, n_models * c.out_channels, c.kernel_size, stride=c.stride,
                             padding=c.padding, bias=False, **factory)
            # the classifier, n linear layers on the pooled (B, n*2048, 1, 1) features: a grouped 1x1 convolution
            fc = nn.Conv2d(n_models * template.fc.in_features, n_models * num_classes, 1, groups=n_models, **factory)
            body = nn.Sequential(template.bn1, template.layer1, template.layer2, template.layer3, template.layer4)
            _batch_modules(body, n_models, factory)
        self.conv1, self.bn1, self.relu, self.maxpool = stem, body[0], template.relu, template.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = body[1], body[2], body[3], body[4]
        self.avgpool, self.fc = template.avgpool, fc
        self.to_empty(device=device if device is not None else "cpu")
        if dtype is not None:
            self.to(dtype)
        with torch.no_grad():
            for t in self.state_dict().values():  # defined values: to_empty leaves the memory uninitialized
                t.zero_()
            for i in range(n_models if init else 0):  # n fresh resnet50s, one after the other (global RNG)
                self.load_model_state_dict(i, torchvision.models.resnet50(num_classes=num_classes).state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == IN_CHANNELS and x.shape[0] >= 1):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {IN_CHANNELS}, H, W) with B >= 1, the images shared by the "
                             f"{self.n_models} models, got {shape}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(self.avgpool(x))  # (B, n*K, 1, 1), model-major
        return logits.reshape(x.shape[0], self.n_models, self.num_classes).transpose(0, 1)  # (n, B, K)

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
    part = tensor.unflatten(0, (n_models, -1))[index]
    return part[..., 0, 0] if key == "fc.weight" else part  # the 1x1 convolution's (K, F, 1, 1): nn.Linear's (K, F)


def stack_models(models: Sequence[nn.Module]) -> BatchedResNet50:
    """Fuse n torchvision resnet50 models (same num_classes; the same module may repeat) into one
    :class:`BatchedResNet50` on the first one's device and dtype, in train mode; the inputs are not modified."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise ValueError(f"models must be a non-empty list of resnet50 modules, got {models!r:.80}")
    fc = getattr(models[0], "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError("models[0] must be a torchvision resnet50 (with an nn.Linear fc layer)")
    first = next(models[0].parameters())
    batched = BatchedResNet50(len(models), fc.out_features, init=False, device=first.device, dtype=first.dtype)
    for i, m in enumerate(models):
        try:
            batched.load_model_state_dict(i, m.state_dict())
        except (AttributeError, ValueError) as error:
            raise ValueError(f"models[{i}] must be a torchvision resnet50(num_classes={fc.out_features}): "
                             f"{error}") from None
    return batched
