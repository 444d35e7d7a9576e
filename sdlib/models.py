"""The networks a self-distillation step can train (``TrainConfig.model``), each built from a seeded stream.

- ``"resnet50"``: torchvision's ResNet-50 with 10 outputs and its ImageNet stem (7x7 stride-2 conv + max-pool),
  as the authors used it on 32x32 images: the paper's network, and the default.
- ``"cnn4"``: a small network written for 32x32 images: four blocks of a 3x3 convolution (32, 64, 128, 128
  channels), batch norm, ReLU and 2x2 max-pooling (32 -> 16 -> 8 -> 4 -> 2 pixels), then global max-pooling and
  one linear layer: 0.24 M parameters, 12.7 M multiply-adds per image. Chosen for the cpu profile by
  ``benchmarks/cpu_throughput.py`` (``benchmarks/results/cpu_throughput.json``), against a CIFAR ResNet-20
  (He et al., 2016, Sec. 4.2): the test accuracy each reaches in the same minute of this 2-core CPU.

Both are plain ``torch.nn`` modules whose batch norms sit in attributes ``conv<k>``/``bn<k>``, so the lean step
folds a frozen teacher's batch norms the same way (:func:`sdlib.step.fold_batch_norms`).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from sdlib.config import INIT, MODELS, NUM_CLASSES, derive_seed

__all__ = ["build_model", "CNN4"]


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


def build_model(seed: int | None = None, step: int = 1, model: str = "resnet50") -> nn.Module:
    """A fresh ``model`` (a name of :data:`sdlib.config.MODELS`) with 10 outputs, initialized on the CPU from a
    stream seeded by ``(seed, step)`` when ``seed`` is given (same seed and step: bit-identical weights; the
    global RNG is left untouched), else from the global RNG."""
    if model not in _BUILDERS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    if seed is None:
        return _BUILDERS[model]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, step, INIT))
        return _BUILDERS[model]()
