"""The cpu profile of chapter 7: the small network (TrainConfig.model), label noise (TrainConfig.label_noise) and
the profile's contents, on real CIFAR-10 images through run_chains."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdlib.chains  # noqa: E402
from sdlib.chains import noisy_splits, run_chains  # noqa: E402
from sdlib.config import MODELS, PROFILES, TrainConfig, device_precision  # noqa: E402
from sdlib.data import load_splits, symmetric_label_noise  # noqa: E402
from sdlib.models import build_model, fold_batch_norms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMING = ("wall_time_s", "images_per_s", "provenance")


def cpu_config(root: Path, data_root: Path, **overrides) -> TrainConfig:
    """The cpu profile cut to the tiny real-image copy: 60 training images in batches of 20, 40 held out, 2
    epochs, steps 1-2 (3 with ``steps=3``), alphas 0 and 1 plus alpha-hat."""
    settings = dict(epochs=2, test_every=2, batch_size=20, seeds=(0,), steps=2, alphas=(0.0, 1.0), n_val=40,
                    subset=60, eval_batch_size=128, data_root=str(data_root), results_dir=str(root / "results"),
                    checkpoint_dir=str(root / "checkpoints"), device="cpu")
    settings.update(overrides)
    return TrainConfig.from_profile("cpu", **settings)


# ------------------------------------------------------------------------------------------ profile and model


def test_cpu_profile_contents():
    config = TrainConfig.from_profile("cpu")
    assert (config.model, config.epochs, config.batch_size, config.lr, config.lr_schedule, config.warmup_epochs) == \
        ("cnn4", 20, 256, 2e-3, "step", 1)
    assert (config.subset, config.n_val, config.eval_every, config.test_every) == (10000, 5000, 1, 20)
    assert (config.bf16, config.channels_last, config.label_noise) == (True, True, 0.0)
    assert config.alphas == (0.0, 0.25, 0.5, 0.75, 1.0) and config.seeds == (0, 1, 2) and config.steps == 5
    assert config.include_alpha_hat and config.alpha_hat_bounds == (0.0, 1.0)
    # The other profiles keep ResNet-50 and no noise.
    for name in ("paper", "official", "fast", "paper-bf16"):
        assert TrainConfig.from_profile(name).model == "resnet50"
        assert "model" not in PROFILES[name]


def test_model_and_label_noise_enter_config_hash_only_when_set():
    paper = TrainConfig.from_profile("paper")
    assert "model" not in paper.hashed_fields() and "label_noise" not in paper.hashed_fields()
    fp = "0123456789abcdef"
    assert TrainConfig.from_profile("paper", label_noise=0.0).config_hash(fp) == paper.config_hash(fp)
    assert TrainConfig.from_profile("paper", model="cnn4").config_hash(fp) != paper.config_hash(fp)
    cpu = TrainConfig.from_profile("cpu")
    noisy = TrainConfig.from_profile("cpu", label_noise=0.4)
    assert noisy.hashed_fields()["label_noise"] == 0.4 and cpu.hashed_fields()["model"] == "cnn4"
    assert noisy.config_hash(fp) != cpu.config_hash(fp)
    # test_every, like eval_every, changes no result
    assert TrainConfig.from_profile("cpu", test_every=1).config_hash(fp) == cpu.config_hash(fp)


def test_committed_resnet50_records_keep_their_config_hash():
    lines = (REPO / "results" / "cifar10" / "records.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        config = TrainConfig(**record["config"])
        assert config.model == "resnet50" and config.label_noise == 0.0
        assert config.config_hash(record["data"]["fingerprint"]) == record["config_hash"]


@pytest.mark.parametrize("model", MODELS)
def test_build_model_is_seeded_and_folds(model):
    a, b, c = build_model(3, 2, model), build_model(3, 2, model), build_model(3, 3, model)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    if model == "cnn4":  # the lean step folds a teacher's batch norms: the same function in eval mode
        with torch.no_grad():
            for m in a.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        a.eval()
        x = torch.randn(4, 3, 32, 32)
        assert a(x).shape == (4, 10)
        torch.testing.assert_close(fold_batch_norms(a)(x), a(x), rtol=1e-4, atol=1e-5)


def test_bf16_on_the_cpu_only_for_the_small_network():
    cpu = torch.device("cpu")
    assert device_precision(TrainConfig.from_profile("fast"), cpu) == (False, False)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert device_precision(TrainConfig.from_profile("cpu"), cpu) == (native, True)


@pytest.mark.parametrize("field, value, expected", [
    ("label_noise", 1.0, "a finite number >= 0 and < 1"),
    ("label_noise", -0.1, "a finite number >= 0 and < 1"),
    ("label_noise", "0.2", "a finite number >= 0 and < 1"),
    ("label_noise", True, "a finite number >= 0 and < 1"),
    ("model", "resnet18", "one of 'resnet50', 'cnn4'"),
    ("chains_in_flight", "batched", "the batched network (sdlib.batched) is ResNet-50 only"),
    ("chains_in_flight", "batched-matmul", "one of 'off', 'streams', 'batched'"),  # removed: named, not run
    ("test_every", 0, "an integer >= 1"),
])
def test_bad_values_are_named_before_any_work(field, value, expected):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be") as error:
        TrainConfig.from_profile("cpu", **{field: value})
    assert expected in str(error.value)


# -------------------------------------------------------------------------------------------------- label noise


def test_symmetric_label_noise_exact_rate_other_class_seeded():
    labels = np.repeat(np.arange(10), 37)  # 370 labels
    for rate in (0.0, 0.1, 0.4, 0.9):
        noisy = symmetric_label_noise(labels, rate, 10, seed=5)
        changed = noisy != labels
        assert changed.sum() == round(rate * labels.size)
        assert np.array_equal(noisy, symmetric_label_noise(labels, rate, 10, seed=5))
    assert not np.array_equal(symmetric_label_noise(labels, 0.4, 10, seed=5),
                              symmetric_label_noise(labels, 0.4, 10, seed=6))
    # a changed label is another class, every other class reachable
    big = np.zeros(20000, dtype=np.int64)
    noisy = symmetric_label_noise(big, 0.5, 10, seed=0)
    counts = np.bincount(noisy[noisy != 0], minlength=10)[1:]
    assert counts.sum() == 10000 and counts.min() > 1000


def test_noisy_splits_per_seed(tiny_cifar_root):
    data = load_splits(tiny_cifar_root, n_val=40, subset=60, progress=False)
    a, b, other = noisy_splits(data, 0.4, seed=0), noisy_splits(data, 0.4, seed=0), noisy_splits(data, 0.4, seed=1)
    for part in ("train", "val"):
        clean, noisy = getattr(data, f"y_{part}"), getattr(a, f"y_{part}")
        assert int((clean != noisy).sum()) == round(0.4 * len(clean)) == a.meta["label_noise"][f"{part}_changed"]
        assert torch.equal(noisy, getattr(b, f"y_{part}"))
        assert not torch.equal(noisy, getattr(other, f"y_{part}"))
    assert torch.equal(a.y_test, data.y_test) and a.x_train is data.x_train
    assert a.meta["label_noise"]["rate"] == 0.4 and "label_noise" not in data.meta
    clean = noisy_splits(data, 0.0, seed=0)
    assert torch.equal(clean.y_train, data.y_train)
    assert clean.meta["label_noise"] == {"rate": 0.0, "seed": 0, "train_changed": 0, "val_changed": 0}


# ----------------------------------------------------------------------------------- run_chains on real images


@pytest.fixture(scope="module")
def noisy_run(tiny_cifar_root, tmp_path_factory):
    """The tiny cpu-profile grid at label noise 0.4, steps 1-3, recording the labels every model trained on."""
    root = tmp_path_factory.mktemp("cpu_noisy")
    config = cpu_config(root, tiny_cifar_root, label_noise=0.4, steps=3)
    seen = []
    original = sdlib.chains.distill_group

    def spy(config, data, **kwargs):
        seen.append((kwargs["step"], [m.chain for m in kwargs["members"]], data.y_train.clone(), data.y_val.clone(),
                     data.y_test.clone()))
        return original(config, data, **kwargs)

    sdlib.chains.distill_group = spy
    try:
        records = run_chains(config, progress=False)
    finally:
        sdlib.chains.distill_group = original
    return config, records, seen


def test_noisy_grid_trains_every_chain_and_step_on_one_set_of_noisy_labels(noisy_run, tiny_cifar_root):
    config, records, seen = noisy_run
    assert [(r["chain"], r["step"]) for r in records] == [
        ("shared", 1), ("alpha=0", 2), ("alpha=1", 2), ("alpha_hat", 2), ("alpha=0", 3), ("alpha=1", 3),
        ("alpha_hat", 3)]
    clean = load_splits(tiny_cifar_root, n_val=40, subset=60, progress=False)
    steps = sorted({s[0] for s in seen})
    assert steps == [1, 2, 3] and any("alpha_hat_probe" in s[1] for s in seen)
    for _, _, y_train, y_val, y_test in seen:
        assert torch.equal(y_train, seen[0][2]) and torch.equal(y_val, seen[0][3])
        assert int((y_train != clean.y_train).sum()) == round(0.4 * 60)
        assert int((y_val != clean.y_val).sum()) == round(0.4 * 40)
        assert torch.equal(y_test, clean.y_test)
    for record in records:
        assert record["config"]["model"] == "cnn4" and record["config"]["label_noise"] == 0.4
        assert record["data"]["label_noise"] == {"rate": 0.4, "seed": 0, "train_changed": 24, "val_changed": 16}
        assert record["config_hash"] == config.config_hash()
        assert 0.0 <= record["test_acc"] <= 1.0
    hat = [r for r in records if r["chain"] == "alpha_hat"]
    assert all(r["alpha_hat_unconstrained"] is not None and 0.0 <= r["alpha_hat"] <= 1.0 for r in hat)


def _comparable(record):
    out = {k: v for k, v in record.items() if k not in TIMING}
    out["config"] = {k: v for k, v in record["config"].items() if k not in ("results_dir", "checkpoint_dir")}
    return out


def test_interrupted_noisy_chain_resumes_to_the_same_records(noisy_run, tiny_cifar_root, tmp_path_factory):
    reference_config, reference, _ = noisy_run
    root = tmp_path_factory.mktemp("cpu_noisy_resume")
    config = cpu_config(root, tiny_cifar_root, label_noise=0.4, steps=3)
    assert config.config_hash() == reference_config.config_hash()

    class Interrupt(Exception):
        pass

    def stop(event):  # mid-step: after the first epoch of step 3
        if (event["event"], event["step"], event["epoch"]) == ("epoch_end", 3, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_chains(config, progress=False, callback=stop)
    assert len((root / "results" / "records.jsonl").read_text().splitlines()) == 4  # steps 1 and 2 done
    records = run_chains(config, progress=False)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    assert [_comparable(r) for r in records] == [_comparable(r) for r in reference]


def test_clean_small_network_learns_on_real_images(tiny_cifar_root, tmp_path):
    """Step 1 of the cpu profile on 60 real images, 6 epochs: the training loss falls and the records are the
    small network's (a regression guard that the profile trains at all, not an accuracy claim)."""
    config = cpu_config(tmp_path, tiny_cifar_root, steps=1, epochs=6, test_every=6, lr=5e-3)
    records = run_chains(config, progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "results" / "epochs.jsonl").read_text().splitlines()]
    assert len(records) == 1 and len(epochs) == 6
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all(e["val_acc"] is not None for e in epochs)  # validation every epoch (eval_every=1)
    assert [e["test_acc"] is not None for e in epochs] == [False] * 5 + [True]  # test at the last (test_every)
    assert math.isclose(records[0]["test_acc"], epochs[-1]["test_acc"])


def test_step_schedule_divides_by_ten_at_half_and_three_quarters_on_host_and_device():
    """The cpu profile's schedule: warmup, then lr, lr/10 from half, lr/100 from three quarters of the iterations
    after the warmup; the device tensor the step reads follows the host value the logs record."""
    import torch

    from sdlib.lean_step import _Schedule, lr_factor as _lr_factor

    config = TrainConfig(epochs=9, lr=2e-3, lr_schedule="step", warmup_epochs=1)
    schedule = _Schedule(config, iters_per_epoch=4, device=torch.device("cpu"))  # 4 warmup + 32 iterations
    schedule.start_at(0)
    factors = []
    for iteration in range(36):
        factors.append(_lr_factor(iteration, 4, 36, "step"))
        assert math.isclose(schedule.lr.item(), 2e-3 * factors[-1], rel_tol=1e-6), iteration
        schedule.advance()
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:20] == [1.0] * 16 and factors[20:28] == [0.1] * 8
    assert [round(f, 12) for f in factors[28:]] == [0.01] * 8
    schedule.start_at(30)  # a resumed run
    assert math.isclose(schedule.lr.item(), 2e-3 * 0.01, rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"lr_schedule.*one of 'constant', 'cosine', 'step'"):
        TrainConfig(lr_schedule="linear")
