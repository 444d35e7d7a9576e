"""Shared by the training, sweep and step tests: the tiny real-image configuration and seeded networks built
once (imported, not a test module)."""

import copy
import functools
from pathlib import Path

import torch

from sdlib.models import build_model
from sdlib.train import TrainConfig


def tiny_config(root: Path, data_root: Path, **overrides) -> TrainConfig:
    """Paper profile, 2 epochs of 64 real images, 2 steps, alphas 0 and 1 plus alpha-hat, on the CPU."""
    settings = dict(epochs=2, batch_size=32, seeds=(0,), steps=2, alphas=(0.0, 1.0), include_alpha_hat=True,
                    n_val=40, subset=64, eval_batch_size=128, data_root=str(data_root),
                    results_dir=str(root / "results"), checkpoint_dir=str(root / "checkpoints"), device="cpu")
    settings.update(overrides)
    return TrainConfig.from_profile("paper", **settings)


@functools.cache
def _built(seed: int, step: int, dtype: torch.dtype) -> torch.nn.Module:
    return build_model(seed=seed, step=step)


def seeded_model(seed: int, step: int) -> torch.nn.Module:
    """build_model(seed=seed, step=step) in the default dtype: a copy of one built once (a ResNet-50's seeded
    init takes about 0.7 s, a copy 0.06 s; the copies are bit-identical). A module that uses it drops the built
    ones when it is done (:func:`drop_seeded_models`, about 1 GB in float64)."""
    return copy.deepcopy(_built(seed, step, torch.get_default_dtype()))


def drop_seeded_models() -> None:
    _built.cache_clear()
