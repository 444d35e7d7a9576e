"""Shared by the training and sweep tests: the tiny real-image configuration (imported, not a test module)."""

from pathlib import Path

from sdlib.train import TrainConfig


def tiny_config(root: Path, data_root: Path, **overrides) -> TrainConfig:
    """Paper profile, 2 epochs of 64 real images, 2 steps, alphas 0 and 1 plus alpha-hat, on the CPU."""
    settings = dict(epochs=2, batch_size=32, seeds=(0,), steps=2, alphas=(0.0, 1.0), include_alpha_hat=True,
                    n_val=40, subset=64, eval_batch_size=128, data_root=str(data_root),
                    results_dir=str(root / "results"), checkpoint_dir=str(root / "checkpoints"), device="cpu")
    settings.update(overrides)
    return TrainConfig.from_profile("paper", **settings)
