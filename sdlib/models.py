"""The networks a self-distillation step can train (``TrainConfig.model``), each built from a seeded stream.

- ``"resnet50"``: torchvision's ResNet-50 with 10 outputs and its ImageNet stem (7x7 stride-2 conv + max-pool),
  as the authors used it on 32x32 images: the paper's network, and the default.
- ``"cnn4"``: a small network written for 32x32 images: four blocks of a 3x3 convolution (32, 64, 128, 128
  channels), batch norm, ReLU and 2x2 max-pooling (32 -> 16 -> 8 -> 4 -> 2 pixels), then global max-pooling and
  one linear layer: 0.24 M parameters, 12.7 M multiply-adds per image. Chosen for the cpu profile by
  ``benchmarks/cpu_throughput.py`` (``benchmarks/results/cpu_throughput.json``), against a CIFAR ResNet-20
  (He et al., 2016, Sec. 4.2): the test accuracy each reaches in the same minute of this 2-core CPU.

Both are plain ``torch.nn`` modules whose batch norms sit in attributes ``conv<k>``/``bn<k>``, so a frozen
teacher's batch norms fold the same way (:func:`fold_batch_norms`). :func:`teacher_probs` runs a teacher.
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from sdlib.config import INIT, MODELS, NUM_CLASSES, TEACHER_BN_MODES, derive_seed

__all__ = ["build_model", "CNN4", "teacher_probs", "fold_batch_norms"]


class _ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU, 2x2 max-pooling."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn1(self.conv1(x))))


class CNN4(nn.Sequential):
    """(B, 3, 32, 32) normalized images -> (B, num_classes) logits; see the module docstring."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (32, 64, 128, 128)):
        blocks = [_ConvBlock(c_in, c_out) for c_in, c_out in zip((3,) + widths[:-1], widths)]
        super().__init__(*blocks, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


_BUILDERS = {
    "resnet50": lambda: torchvision.models.resnet50(num_classes=NUM_CLASSES),
    "cnn4": CNN4,
}
assert set(_BUILDERS) == set(MODELS), "sdlib.config.MODELS and sdlib.models._BUILDERS must name the same networks"


def build_model(seed: int | None = None, step: int = 1, model: str = "resnet50", *, empty: bool = False) -> nn.Module:
    """A fresh ``model`` (a name of :data:`sdlib.config.MODELS`) with 10 outputs, initialized on the CPU from a
    stream seeded by ``(seed, step)`` when ``seed`` is given (same seed and step: bit-identical weights; the
    global RNG is left untouched), else from the global RNG. ``empty``: weights left uninitialized, no random
    draws (a ResNet-50's take about 0.7 s), for a model that a checkpoint is loaded into."""
    if model not in _BUILDERS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    if empty:
        with torch.device("meta"):
            return _BUILDERS[model]().to_empty(device="cpu")
    if seed is None:
        return _BUILDERS[model]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, step, INIT))
        return _BUILDERS[model]()


def teacher_probs(teacher: nn.Module, x: torch.Tensor, bn_mode: str = "eval") -> torch.Tensor:
    """Softmax outputs of the frozen ``teacher`` on the batch ``x`` the student sees: (B, C) float32 (float64 for
    a float64 teacher; (m, B, C) for a batched network of m teachers), no grad; the teacher is left in eval mode.

    bn_mode : ``TrainConfig.teacher_bn``. "eval": batch norms use their running statistics. "train": they
    normalize by this batch's statistics, as the authors' teacher did (PyTorch Lightning 1.1.1 ran it in train
    mode, see book/reproduce_cifar10.md), without updating the running statistics or num_batches_tracked, so the
    teacher stays bit-identical to its checkpoint (in train mode batch norm never reads them: same outputs).
    """
    if bn_mode not in TEACHER_BN_MODES:
        raise ValueError(f"bn_mode must be one of {TEACHER_BN_MODES}, got {bn_mode!r}")
    if teacher.training or bn_mode == "train":  # no walk over the modules per batch where nothing changes
        teacher.eval()
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
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


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` (a network of :data:`MODELS` or a batched ResNet-50) with every batch
    norm folded into the convolution before it (torch's ``fuse_conv_bn_weights``, in float64): the same function
    in eval mode up to rounding, 53 fewer ops per ResNet-50 forward."""
    folded = copy.deepcopy(model).eval()

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d):
        bias = None if conv.bias is None else conv.bias.double()
        weight, bias = fuse_conv_bn_weights(conv.weight.double(), bias, bn.running_mean.double(),
                                            bn.running_var.double(), bn.eps, bn.weight.double(), bn.bias.double())
        dtype = conv.weight.dtype
        conv.weight, conv.bias = nn.Parameter(weight.to(dtype)), nn.Parameter(bias.to(dtype))

    for module in list(folded.modules()):
        for k in ("1", "2", "3"):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fold(conv, bn)
                setattr(module, f"bn{k}", nn.Identity())
        if (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
                and isinstance(module[1], nn.BatchNorm2d)):  # a ResNet's downsample path
            fold(module[0], module[1])
            module[1] = nn.Identity()
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(f"fold_batch_norms: batch norms not preceded by a convolution: {left[:3]}")
    return folded.requires_grad_(False)
