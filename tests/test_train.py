"""Tests of the ResNet-50 self-distillation pipeline (sdlib.train), on the CPU.

Unit tests check the loss and the regularizer against explicit formulas, seeding and resumption of one step on
synthetic images; the end-to-end tests run the real pipeline (torchvision ResNet-50, real CIFAR-10 images from
the shared tarball, see conftest.py) on a tiny subset: 64 training, 40 validation and 64 test images, batch 32,
2 epochs, 2 steps, chains alpha = 0, alpha = 1 and alpha-hat. One such run is the reference that the resume,
no-work and NaN tests compare against.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from sdlib import chains, train  # noqa: E402
from sdlib.augment import normalize  # noqa: E402
from sdlib.store import ResultsStore  # noqa: E402
from sdlib import results as results_module  # noqa: E402
from sdlib import lean_step  # noqa: E402
from sdlib import step as step_module  # noqa: E402
from sdlib.config import ORDER, derive_seed  # noqa: E402
from sdlib.train import (  # noqa: E402
    TrainConfig,
    build_model,
    distill_step,
    distillation_loss,
    evaluate,
    l2_penalty,
    run_chains,
)
from tiny import tiny_config  # noqa: E402

RECORD_FIELDS = {
    "seed", "chain", "step", "alpha", "alpha_hat", "alpha_hat_unconstrained", "probe_val_acc", "probe_test_acc",
    "epochs", "val_acc", "val_loss", "test_acc", "test_loss", "best_test_acc", "best_test_epoch", "train_loss",
    "wall_time_s", "images_per_s", "profile", "config_hash", "config", "provenance", "data",
}
# The fields added with teacher_bn / data_order / alpha_hat_bounds: what a results folder from before lacks.
NEW_RECORD_FIELDS = ("alpha_hat_unconstrained", "best_test_acc", "best_test_epoch")
# fields added after the first results, left out of config_hash at the values that reproduce the pipeline before them
NEW_CONFIG_FIELDS = ("teacher_bn", "data_order", "alpha_hat_bounds", "model", "label_noise")
PROVENANCE_FIELDS = {"git_commit", "git_dirty", "device_name", "torch", "torchvision", "cuda", "cudnn", "python",
                     "numpy", "platform", "date", "torch_threads"}
EPOCH_FIELDS = {"seed", "chain", "step", "epoch", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "lr",
                "wall_time_s", "images_per_s"}
# What must agree between an interrupted-and-resumed run and an uninterrupted one (timings may differ).
RESULT_FIELDS = ("alpha", "alpha_hat", "probe_val_acc", "probe_test_acc", "epochs", "val_acc", "val_loss",
                 "test_acc", "test_loss", "train_loss")
KEYS = [(0, "shared", 1), (0, "alpha=0", 2), (0, "alpha=1", 2), (0, "alpha_hat", 2)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train on one thread: on a shared 2-core machine (CI runners, other jobs) two OpenMP threads that spin on
    oversubscribed cores ran this file 5-10x slower; one thread costs little more on an idle machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_data(n_train=32, n_val=16, n_test=16, seed=0):
    """Random uint8 images and labels with the CIFAR10Splits attributes distill_step reads."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,),
                                                                                                     generator=g)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = part(n_train), part(n_val), part(n_test)
    return SimpleNamespace(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_matches_hand_computation(alpha):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 10)) * 3
    labels = rng.integers(0, 10, size=6)
    teacher = rng.dirichlet(np.ones(10), size=6)

    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(10)[labels]
    expected = alpha * np.mean((p - onehot) ** 2) + (1 - alpha) * np.mean((p - teacher) ** 2)

    got = distillation_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels),
                            alpha, torch.tensor(teacher, dtype=torch.float32))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_is_mse_to_mixed_targets_plus_a_constant():
    # alpha ||p - y||^2 + (1 - alpha) ||p - t||^2 = ||p - (alpha y + (1 - alpha) t)||^2 + alpha (1 - alpha) ||y - t||^2:
    # same minimiser and same gradient in the logits, the difference does not depend on them.
    alpha = 0.35
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (8,), generator=g)
    teacher = torch.softmax(torch.randn(8, 10, generator=g), dim=1)
    onehot = F.one_hot(labels, 10).float()
    constant = alpha * (1 - alpha) * F.mse_loss(onehot, teacher).item()
    for scale in (0.1, 1.0, 5.0):
        logits = (scale * torch.randn(8, 10, generator=g)).requires_grad_()
        ours = distillation_loss(logits, labels, alpha, teacher)
        (grad_ours,) = torch.autograd.grad(ours, logits)
        mixed = F.mse_loss(torch.softmax(logits, 1), alpha * onehot + (1 - alpha) * teacher)
        (grad_mixed,) = torch.autograd.grad(mixed, logits)
        assert (ours - mixed).item() == pytest.approx(constant, abs=1e-7)
        torch.testing.assert_close(grad_ours, grad_mixed, rtol=1e-5, atol=1e-8)


def test_distillation_loss_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 10, generator=g).bfloat16()
    labels = torch.randint(0, 10, (4,), generator=g)
    teacher = torch.softmax(torch.randn(4, 10, generator=g), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = distillation_loss(logits, labels, 0.5, teacher)
    plain = distillation_loss(logits.float(), labels, 0.5, teacher)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == plain.item()


def test_distillation_loss_needs_a_teacher_below_alpha_one():
    with pytest.raises(ValueError, match="teacher_probs"):
        distillation_loss(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), 0.5)


def test_l2_penalty_is_the_sum_of_unsquared_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10))
    params = list(model.parameters())
    expected = sum(np.sqrt(np.sum(p.detach().double().numpy() ** 2)) for p in params)
    penalty = l2_penalty(model, coef=1e-4)
    assert penalty.item() == pytest.approx(1e-4 * expected, rel=1e-6)

    penalty.backward()
    for p in params:
        norm = p.detach().norm()
        if norm == 0:  # the batch-norm bias starts at zero: subgradient 0, not NaN
            assert torch.equal(p.grad, torch.zeros_like(p))
        else:
            torch.testing.assert_close(p.grad, 1e-4 * p.detach() / norm)


# ------------------------------------------------------------------------------------------ model and one step


def test_build_model_is_resnet50_with_imagenet_stem_and_seeded():
    before = torch.get_rng_state()
    a, b = build_model(seed=0, step=1), build_model(seed=0, step=1)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert states_equal(a.state_dict(), b.state_dict())
    assert not torch.equal(a.conv1.weight, build_model(seed=1, step=1).conv1.weight)
    assert not torch.equal(a.conv1.weight, build_model(seed=0, step=2).conv1.weight)
    assert a.conv1.kernel_size == (7, 7) and a.conv1.stride == (2, 2) and isinstance(a.maxpool, torch.nn.MaxPool2d)
    assert a.fc.out_features == 10
    reference = torchvision.models.resnet50(num_classes=10).state_dict()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in reference.items()}


def test_distill_step_same_seed_same_weights_different_seed_different():
    data = synthetic_data()
    config = TrainConfig(epochs=1, batch_size=16, eval_batch_size=64)
    first = distill_step(config, data, seed=0, step=1, alpha=1.0)
    again = distill_step(config, data, seed=0, step=1, alpha=1.0)
    other = distill_step(config, data, seed=1, step=1, alpha=1.0)
    assert states_equal(first.model.state_dict(), again.model.state_dict())
    metrics = ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "lr")
    assert [{k: e[k] for k in metrics} for e in first.epochs] == [{k: e[k] for k in metrics} for e in again.epochs]
    assert not torch.equal(first.model.fc.weight, other.model.fc.weight)
    # The returned validation outputs are those of the returned model.
    probs = evaluate(first.model, data.x_val, data.y_val, return_probs=True)["probs"]
    torch.testing.assert_close(first.val_probs, probs)
    assert first.val_probs.shape == (16, 10) and first.train_images == 32


def test_distill_step_schedule_teacher_and_exact_resume(tmp_path):
    """Warmup + cosine as configured; an interrupted step resumes from its state file to the same weights."""
    data = synthetic_data()
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, lr_schedule="cosine", warmup_epochs=1,
                         eval_batch_size=64)
    teacher = build_model(seed=5, step=1).eval()
    kwargs = dict(seed=0, step=2, alpha=0.5, teacher=teacher, chain="alpha=0.5")
    full = distill_step(config, data, **kwargs)
    # 2 batches per epoch: warmup lr 1e-3 * (1/2, 2/2), then cosine over 2 batches: 1e-3 * (1, 1/2).
    # Each epoch logs the lr of its last batch.
    assert [log["lr"] for log in full.epochs] == pytest.approx([1e-3, 0.5e-3])

    class Stop(Exception):
        pass

    def stop_after_first_epoch(event):
        if event["event"] == "epoch_end" and event["epoch"] == 1:
            raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        distill_step(config, data, **kwargs, state_path=state, callback=stop_after_first_epoch)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and set(saved) >= {"model", "optimizer", "scheduler"}
    resumed = distill_step(config, data, **kwargs, state_path=state)
    assert states_equal(full.model.state_dict(), resumed.model.state_dict())
    assert [log["epoch"] for log in resumed.epochs] == [1, 2]
    for a, b in zip(full.epochs, resumed.epochs):
        assert {k: a[k] for k in ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "lr")} == \
               {k: b[k] for k in ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "lr")}


# --------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", 2.5), ("batch_size", -1), ("lr", 0.0), ("lr", float("nan")), ("l2_coef", -1e-4),
    ("lr_schedule", "linear"), ("warmup_epochs", 100), ("bf16", "yes"), ("seeds", ()), ("seeds", (-1,)),
    ("seeds", (0, 0)), ("steps", 0), ("alphas", (1.5,)), ("alphas", (0.1, 0.1 + 1e-12)), ("n_val", -1),
    ("n_val", 0),  # with the alpha-hat chain (the default): it has no validation images to estimate alpha on
    ("subset", 5), ("device", "gpu0"), ("data_root", ""), ("eval_batch_size", 0), ("checkpoint_every", 0),
    ("teacher_bn", "batch"), ("teacher_bn", None), ("data_order", "shuffle"), ("alpha_hat_bounds", (1.0, 0.0)),
    ("alpha_hat_bounds", (0.0,)), ("alpha_hat_bounds", "0,1"), ("alpha_hat_bounds", (0.0, float("inf"))),
    ("alpha_hat_bounds", (0.0, True)),
])
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_profiles_overrides_and_hash():
    paper = TrainConfig.from_profile("paper")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.l2_coef, paper.lr_schedule) == (75, 16, 1e-4, 1e-4,
                                                                                              "constant")
    assert paper.seeds == (0, 1, 2, 3) and paper.steps == 5 and len(paper.alphas) == 11
    assert paper.chains[0] == "alpha=0" and paper.chains[3] == "alpha=0.3" and paper.chains[-1] == "alpha_hat"
    fast = TrainConfig.from_profile("fast", epochs=3)
    assert (fast.batch_size, fast.lr, fast.lr_schedule, fast.bf16, fast.channels_last, fast.epochs) == \
           (256, 1e-3, "cosine", True, True, 3)
    with pytest.raises(ValueError, match="profile"):
        TrainConfig.from_profile("turbo")
    with pytest.raises(ValueError, match="unknown TrainConfig field.*epoch_count.*valid fields"):
        TrainConfig.from_profile("paper", epoch_count=3)
    assert json.loads(json.dumps(paper.to_dict())) == paper.to_dict()
    # The hash covers what changes results, not where or how much is run.
    same = TrainConfig(device="cpu", results_dir="x", checkpoint_dir="y", seeds=(7,), steps=2, alphas=(0.5,),
                       eval_batch_size=10)
    default = TrainConfig()  # the paper profile's values, but alpha-hat clipped to [0, 1]
    assert same.config_hash() == default.config_hash() != paper.config_hash()
    assert TrainConfig(alpha_hat_bounds=None).config_hash() == paper.config_hash()
    assert TrainConfig(lr=2e-4).config_hash() != default.config_hash()
    assert TrainConfig(subset=100).config_hash() != default.config_hash()
    # bf16 and channels_last are CUDA-only: switched off (and so recorded and hashed) elsewhere.
    with pytest.warns(RuntimeWarning, match="CUDA only"):
        on_cpu = train.effective_config(fast, torch.device("cpu"))
    assert (on_cpu.bf16, on_cpu.channels_last) == (False, False)
    assert on_cpu.config_hash() != fast.config_hash()


def _hash_before_the_protocol_fields(config: TrainConfig) -> str:
    """config_hash as computed before teacher_bn, data_order and alpha_hat_bounds existed (pipeline version 1)."""
    import hashlib

    payload = {k: v for k, v in config.to_dict().items() if k not in NEW_CONFIG_FIELDS
               and k not in ("profile", "seeds", "steps", "alphas", "include_alpha_hat", "data_root", "results_dir",
                             "checkpoint_dir", "device", "eval_batch_size", "download", "checkpoint_every",
                             "data_fingerprint", "eval_every", "test_every", "chains_in_flight", "capture")}
    payload["pipeline_version"] = 1
    payload["data"] = config.resolved_data_fingerprint()  # the data's identity, in the hash since the store
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def test_protocol_fields_defaults_profiles_and_hash():
    default = TrainConfig()
    assert (default.teacher_bn, default.data_order, default.alpha_hat_bounds) == ("eval", "reshuffle", (0.0, 1.0))
    official = TrainConfig.from_profile("official")
    assert (official.teacher_bn, official.n_val, official.data_order, official.include_alpha_hat) == \
           ("train", 0, "fixed", False)
    assert (official.epochs, official.batch_size, official.lr, official.lr_schedule, official.warmup_epochs,
            official.bf16, official.channels_last, official.l2_coef) == (75, 16, 1e-4, "constant", 0, False, False,
                                                                         1e-4)
    assert official.alphas == default.alphas and official.chains == tuple(f"alpha={a:g}" for a in official.alphas)
    paper = TrainConfig.from_profile("paper")
    assert (paper.teacher_bn, paper.n_val, paper.data_order, paper.include_alpha_hat, paper.alpha_hat_bounds) == \
           ("eval", 5000, "reshuffle", True, None)
    assert (paper.epochs, paper.batch_size, paper.lr, paper.lr_schedule, paper.bf16) == \
           (official.epochs, official.batch_size, official.lr, official.lr_schedule, official.bf16)
    fast = TrainConfig.from_profile("fast")
    assert (fast.teacher_bn, fast.n_val, fast.data_order, fast.alpha_hat_bounds) == ("eval", 5000, "reshuffle",
                                                                                     (0.0, 1.0))
    # n_val = 0 trains on everything once the alpha-hat chain is off (or there is no step 2 to run it at).
    assert TrainConfig(n_val=0, include_alpha_hat=False).n_val == 0 and TrainConfig(n_val=0, steps=1).n_val == 0
    with pytest.raises(ValueError, match=r"TrainConfig\.n_val .*alpha-hat.*never on the test set"):
        TrainConfig.from_profile("official", include_alpha_hat=True)
    assert TrainConfig(alpha_hat_bounds=[-1, 2]).alpha_hat_bounds == (-1.0, 2.0)  # lists (JSON, YAML) accepted
    assert json.loads(json.dumps(official.to_dict())) == official.to_dict()

    # The hash: unchanged for the values that reproduce the pipeline before these fields existed (so results
    # written before are found), changed by any other value.
    # (a paper-profile run from before the paper profile dropped the bounds: found with alpha_hat_bounds (0, 1))
    before = TrainConfig.from_profile("paper", alpha_hat_bounds=(0, 1))
    for config in (default, fast, before, TrainConfig(lr=2e-4, subset=100), TrainConfig(n_val=100)):
        assert config.config_hash() == _hash_before_the_protocol_fields(config)
    hashes = {default.config_hash()}
    for change in (dict(teacher_bn="train"), dict(data_order="fixed"), dict(alpha_hat_bounds=None),
                   dict(alpha_hat_bounds=(0.0, 2.0)), dict(n_val=0, include_alpha_hat=False)):
        hashes.add(TrainConfig(**change).config_hash())
    assert len(hashes) == 6
    assert len({paper.config_hash(), official.config_hash(), fast.config_hash()}) == 3


def test_committed_records_keep_their_config_hash():
    """The committed results/cifar10 records: their config, rebuilt through the profile, hashes as recorded."""
    path = Path(__file__).resolve().parents[1] / "results" / "cifar10" / "records.jsonl"
    records = read_jsonl(path)
    assert records
    for record in records:
        assert not set(NEW_CONFIG_FIELDS) & set(record["config"])  # written before the fields existed
        fields = {k: v for k, v in record["config"].items() if k != "profile"}
        config = TrainConfig.from_profile(record["config"]["profile"], **fields)
        assert config.config_hash() == record["config_hash"]


def test_teacher_probs_batch_statistics_by_hand():
    """"train": every BatchNorm normalizes with its batch's mean and biased variance (checked against an explicit
    computation in float64 through forward hooks), the running statistics stay untouched; "eval" is the plain
    eval-mode forward pass; the two differ."""
    teacher = build_model(seed=3, step=1)
    g = torch.Generator().manual_seed(0)
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:  # running statistics far from any batch's, as after training on other images
        m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = normalize(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g))

    batch_stats = step_module.teacher_probs(teacher, x, "train")
    running = step_module.teacher_probs(teacher, x, "eval")
    assert batch_stats.dtype == running.dtype == torch.float32 and batch_stats.shape == (8, 10)
    assert not batch_stats.requires_grad and not teacher.training
    assert states_equal(teacher.state_dict(), before)  # running stats and num_batches_tracked unchanged
    with torch.no_grad():
        torch.testing.assert_close(running, torch.softmax(teacher(x), dim=1), rtol=0, atol=0)

    def by_hand(module, inputs, output):
        z = inputs[0].double()
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        w, b = module.weight.double().view(1, -1, 1, 1), module.bias.double().view(1, -1, 1, 1)
        return ((z - mean) / torch.sqrt(var + module.eps) * w + b).float()

    hooks = [m.register_forward_hook(by_hand) for m in norms]
    with torch.no_grad():
        expected = torch.softmax(teacher(x), dim=1)  # eval mode, every BatchNorm output replaced by the hand one
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(batch_stats, expected, rtol=1e-3, atol=1e-4)  # float32 through 53 layers
    assert (batch_stats - running).abs().max() > 0.05
    with pytest.raises(ValueError, match="bn_mode"):
        step_module.teacher_probs(teacher, x, "running")


def test_epoch_order_reshuffle_and_fixed():
    reshuffle, fixed = TrainConfig(), TrainConfig(data_order="fixed")
    order = step_module.epoch_order(reshuffle, 0, 2, 3, 50, "cpu")
    # reshuffle: the permutation the loop drew before data_order existed, new every epoch and step
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(derive_seed(0, 2, 3, ORDER)))
    assert torch.equal(order, expected) and order.dtype == torch.int64
    assert not torch.equal(order, step_module.epoch_order(reshuffle, 0, 2, 4, 50, "cpu"))
    assert not torch.equal(order, step_module.epoch_order(reshuffle, 0, 3, 3, 50, "cpu"))
    # fixed: one permutation of the seed for every epoch and step, another for another seed
    first = step_module.epoch_order(fixed, 0, 1, 1, 50, "cpu")
    assert torch.equal(torch.sort(first).values, torch.arange(50))
    assert all(torch.equal(first, step_module.epoch_order(fixed, 0, step, epoch, 50, "cpu"))
               for step in (1, 2, 5) for epoch in (1, 2, 75))
    assert not torch.equal(first, step_module.epoch_order(fixed, 1, 1, 1, 50, "cpu"))
    assert not any(torch.equal(first, step_module.epoch_order(reshuffle, 0, s, e, 50, "cpu"))
                   for s in (1, 2) for e in (1, 2))


def test_distill_step_uses_the_configured_order_and_teacher_mode(monkeypatch):
    """The loop takes its order from epoch_order and its targets from teacher_probs with config.teacher_bn."""
    data = synthetic_data()
    config = TrainConfig(epochs=2, batch_size=16, eval_batch_size=64, teacher_bn="train", data_order="fixed",
                         eval_every=1)
    orders, modes = [], []
    real_order, real_probs = step_module.epoch_order, step_module.teacher_probs

    def spy_order(*args):
        orders.append(real_order(*args))
        return orders[-1]

    def spy_probs(teacher, x, bn_mode):
        modes.append(bn_mode)
        return real_probs(teacher, x, bn_mode)

    monkeypatch.setattr(step_module, "epoch_order", spy_order)
    monkeypatch.setattr(lean_step, "teacher_probs", spy_probs)  # what the lean step runs the teachers with
    teacher = build_model(seed=5, step=1).eval()
    result = distill_step(config, data, seed=0, step=2, alpha=0.5, teacher=teacher, chain="alpha=0.5")
    assert len(orders) == 2 and torch.equal(orders[0], orders[1])
    assert modes == ["train"] * 4  # 2 epochs x 2 batches
    assert all(log["val_acc"] is not None for log in result.epochs)
    summary = result.summary()
    best = max(result.epochs, key=lambda log: log["test_acc"])
    assert (summary["best_test_acc"], summary["best_test_epoch"]) == (best["test_acc"], best["epoch"])
    # alpha outside [0, 1] (an unbounded alpha-hat) is a valid weight; it needs a teacher, like any alpha != 1
    with pytest.raises(ValueError, match="teacher is required"):
        distill_step(config, data, seed=0, step=2, alpha=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        distill_step(config, data, seed=0, step=2, alpha=float("nan"), teacher=teacher)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), None, (0.0, 1.5)])
def test_alpha_hat_unconstrained_and_used(bounds, tmp_path):
    """Algorithm 1 in the chain runner: the least-squares alpha over all reals, and that value clipped to
    alpha_hat_bounds (None: not clipped), from one-hot validation labels and the step-1 and probe outputs."""
    config = TrainConfig(seeds=(0,), steps=2, alphas=(), alpha_hat_bounds=bounds, device="cpu",
                         results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"))
    runner = chains._ChainRunner(config, torch.device("cpu"), progress=False, callback=None,
                                 store=ResultsStore(config.results_dir), config_hash="0" * 12)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=30)
    onehot = np.eye(10)[y]
    g = rng.dirichlet(np.ones(10), size=30)
    f1 = g + (onehot - g) / 1.25  # the labels lie at alpha = 1.25 on the line through g and f1, plus noise
    f1 += 0.01 * rng.normal(size=f1.shape)
    runner.data = runner.clean_data = SimpleNamespace(y_val=torch.tensor(y))  # as if loaded for seed 0
    runner.data_seed = 0
    runner.summaries[(0, "shared", 1)] = {"val_probs": torch.tensor(f1, dtype=torch.float32)}
    runner.summaries[(0, "alpha_hat_probe", 2)] = {"val_probs": torch.tensor(g, dtype=torch.float32),
                                                   "val_acc": 0.5, "test_acc": 0.4}
    alpha, extra = runner.alpha_for((0, "alpha_hat", 2))
    f1_32, g_32 = (torch.tensor(a, dtype=torch.float32).double().numpy() for a in (f1, g))
    by_hand = np.sum((onehot - g_32) * (f1_32 - g_32)) / np.sum((f1_32 - g_32) ** 2)
    assert by_hand == pytest.approx(1.25, abs=0.05)
    assert extra["alpha_hat_unconstrained"] == pytest.approx(by_hand, rel=1e-12)
    used = by_hand if bounds is None else min(max(by_hand, bounds[0]), bounds[1])
    assert alpha == extra["alpha_hat"] == pytest.approx(used, rel=1e-12)
    assert (extra["probe_val_acc"], extra["probe_test_acc"]) == (0.5, 0.4)


def test_run_chains_rejects_bad_arguments_before_work(tmp_path):
    config = TrainConfig(device="cuda:99", results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="device"):
        run_chains(config, progress=False)
    with pytest.raises(ValueError, match="config must be a TrainConfig"):
        run_chains({"epochs": 1})
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_run_chains_without_data_raises_file_not_found(tmp_path):
    config = TrainConfig(epochs=1, seeds=(0,), steps=1, data_root=str(tmp_path / "no_cifar"),
                         results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"), device="cpu")
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        run_chains(config, progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "TrainConfig.epochs"),
    (["--profile", "turbo"], "--profile"),
    (["--alphas", "0,x"], "--alphas"),
    (["--alphas", "0,2"], "TrainConfig.alphas"),
    (["--bogus"], "unrecognized"),
    (["--teacher-bn", "batch"], "--teacher-bn"),
    (["--data-order", "random"], "--data-order"),
    (["--alpha-hat-bounds", "1", "0"], "TrainConfig.alpha_hat_bounds"),
    (["--alpha-hat-bounds", "0"], "TrainConfig.alpha_hat_bounds"),
    (["--alpha-hat-bounds", "none", "1"], "--alpha-hat-bounds"),
    (["--alpha-hat-bounds", "0,x"], "--alpha-hat-bounds"),
    (["--n-val", "0"], "TrainConfig.n_val"),  # the paper profile runs the alpha-hat chain
])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_protocol_options(capsys):
    parser = train._parser()
    args = parser.parse_args(["--profile", "official", "--teacher-bn", "eval", "--data-order", "reshuffle",
                              "--n-val", "100", "--alpha-hat-bounds", "none"])
    assert train.config_overrides(args) == {"teacher_bn": "eval", "data_order": "reshuffle", "n_val": 100,
                                            "alpha_hat_bounds": None}
    assert train.config_overrides(parser.parse_args(["--alpha-hat-bounds=-0.5,1.5"]))["alpha_hat_bounds"] == \
           (-0.5, 1.5)
    assert train.config_overrides(parser.parse_args(["--alpha-hat-bounds", "0", "2"]))["alpha_hat_bounds"] == (0, 2)
    assert "teacher_bn" not in train.config_overrides(parser.parse_args([]))  # not given: the profile's
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("official: the authors' code as it ran", "paper eval, official train, fast eval",
                  "paper reshuffle, official fixed, fast reshuffle", "paper none, official 0,1, fast 0,1",
                  "0 trains on all of it", "paper 5000, official 0, fast 5000"):
        assert words in text, words


# ------------------------------------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def tiny_data_root(tiny_cifar_root, tmp_path_factory):
    # A private copy: loading writes a decode cache into the data root.
    root = tmp_path_factory.mktemp("train_data") / "cifar10"
    shutil.copytree(tiny_cifar_root, root)
    return root


@pytest.fixture(scope="module")
def reference_run(tiny_data_root, tmp_path_factory):
    """One uninterrupted tiny run: (config, returned records, epoch-end events)."""
    root = tmp_path_factory.mktemp("reference")
    config = tiny_config(root, tiny_data_root)
    events = []
    records = run_chains(config, progress=False, callback=events.append)
    yield config, records, events
    shutil.rmtree(root, ignore_errors=True)  # ~0.4 GB of ResNet-50 checkpoints: don't leave them in /tmp


@pytest.fixture
def run_dir(tmp_path):
    """A scratch folder for one run, its checkpoints removed afterwards."""
    yield tmp_path
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


def test_run_chains_end_to_end(reference_run, tiny_data_root):
    config, records, events = reference_run
    results = Path(config.results_dir)

    # One record per (seed, chain, step), in training order, identical to the file's.
    assert [(r["seed"], r["chain"], r["step"]) for r in records] == KEYS
    assert read_jsonl(results / "records.jsonl") == records
    by_key = {(r["seed"], r["chain"], r["step"]): r for r in records}
    for record in records:
        assert set(record) == RECORD_FIELDS
        assert record["epochs"] == 2 and record["profile"] == "paper"
        assert record["config"] == config.to_dict() and record["config_hash"] == config.config_hash()
        for field in ("val_acc", "test_acc"):
            assert 0.0 <= record[field] <= 1.0
            # accuracies are fractions of 40 validation / 64 test images
            n = 40 if field == "val_acc" else 64
            assert record[field] * n == pytest.approx(round(record[field] * n))
        for field in ("val_loss", "test_loss", "train_loss", "wall_time_s", "images_per_s"):
            assert math.isfinite(record[field]) and record[field] > 0
        assert set(record["provenance"]) == PROVENANCE_FIELDS
        prov = record["provenance"]
        assert prov["torch"] == torch.__version__ and prov["device_name"]
        assert prov["git_commit"] == "unknown" or len(prov["git_commit"]) == 40
        assert record["data"]["sizes"] == {"train": 64, "val": 40, "test": 64}
    assert by_key[(0, "shared", 1)]["alpha"] == 1.0
    assert by_key[(0, "alpha=0", 2)]["alpha"] == 0.0 and by_key[(0, "alpha=1", 2)]["alpha"] == 1.0
    for key in KEYS[:3]:
        assert by_key[key]["alpha_hat"] is None and by_key[key]["probe_val_acc"] is None

    # alpha-hat chain: at step 2 the probe is the alpha = 0 chain's step 2 (same init, data order and teacher).
    hat = by_key[(0, "alpha_hat", 2)]
    assert config.alpha_hat_bounds is None  # the paper profile: Algorithm 1 as written, over all real alphas
    assert hat["alpha"] == hat["alpha_hat"] == hat["alpha_hat_unconstrained"]
    assert hat["probe_val_acc"] == by_key[(0, "alpha=0", 2)]["val_acc"]
    assert hat["probe_test_acc"] == by_key[(0, "alpha=0", 2)]["test_acc"]

    # Checkpoints: the final weights load with weights_only=True and reproduce the recorded metrics; from the
    # step-1 and probe validation outputs, alpha-hat is the least-squares mix <y-g, f1-g>/||f1-g||^2 (not clipped:
    # wherever it falls, the alpha-hat step trained with it, a weight outside [0, 1] included).
    from sdlib.data import load_splits

    data = load_splits(tiny_data_root, n_val=40, split_seed=0, subset=64)
    ckpt_dir = Path(config.checkpoint_dir) / config.config_hash() / "seed0"
    val_probs = {}
    for _, chain, step in KEYS:
        path = ckpt_dir / chain / f"step{step}.pt"
        checkpoint = torch.load(path, weights_only=True)
        model = build_model()
        model.load_state_dict(checkpoint["model"])
        val = evaluate(model, data.x_val, data.y_val, config.eval_batch_size, return_probs=True)
        test = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
        record = by_key[(0, chain, step)]
        assert (val["acc"], test["acc"]) == (record["val_acc"], record["test_acc"])
        assert val["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
        val_probs[chain] = val["probs"].double().numpy()
    assert not list(ckpt_dir.rglob("*.state.pt"))  # resumable states are removed once a step is final
    y = np.eye(10)[data.y_val.numpy()]
    f1, g = val_probs["shared"], val_probs["alpha=0"]
    unclipped = np.sum((y - g) * (f1 - g)) / np.sum((f1 - g) ** 2)
    assert hat["alpha_hat_unconstrained"] == pytest.approx(unclipped, abs=1e-6)
    assert all(by_key[key]["alpha_hat_unconstrained"] is None for key in KEYS[:3])

    # Per-epoch logs: one line per (seed, chain, step, epoch); the last epoch is the record.
    epochs = read_jsonl(results / "epochs.jsonl")
    assert sorted((e["chain"], e["step"], e["epoch"]) for e in epochs) == \
           sorted((chain, step, epoch) for _, chain, step in KEYS for epoch in (1, 2))
    for line in epochs:
        assert set(line) >= EPOCH_FIELDS and line["config_hash"] == config.config_hash()
        assert line["lr"] == config.lr
        if line["epoch"] == 2:
            record = by_key[(0, line["chain"], line["step"])]
            assert all(line[k] == record[k] for k in ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss"))
    # Beside the last epoch, the record holds the best test accuracy over the evaluated epochs (every
    # eval_every-th and the last; the others log None) and the first epoch with it.
    for key, record in by_key.items():
        logged = sorted((e["epoch"], e["test_acc"]) for e in epochs if (0, e["chain"], e["step"]) == key)
        curve = [(ep, acc) for ep, acc in logged if acc is not None]
        assert [ep for ep, _ in curve] == [ep for ep, _ in logged
                                            if ep % config.eval_every == 0 or ep == config.epochs]
        best = max(acc for _, acc in curve)
        assert (record["best_test_acc"], record["best_test_epoch"]) == (best, next(ep for ep, a in curve if a == best))

    # Events: one epoch_end per epoch of every trained model, a step_end per model (no probe at step 2).
    # (run_chains trains the chains of a step in flight by default: their epoch events interleave)
    epoch_ends = [(e["chain"], e["epoch"]) for e in events if e["event"] == "epoch_end"]
    assert sorted(epoch_ends) == sorted((chain, epoch) for _, chain, _ in KEYS for epoch in (1, 2))
    assert all([epoch for c, epoch in epoch_ends if c == chain] == [1, 2] for _, chain, _ in KEYS)
    assert [e["chain"] for e in events if e["event"] == "step_end"] == [chain for _, chain, _ in KEYS]
    images = sum(e["train_images"] for e in events if e["event"] == "step_end")
    seconds = sum(e["train_time_s"] for e in events if e["event"] == "step_end")
    print(f"\ntiny run on the CPU: {images / seconds:.1f} training images/s ({images} images, {seconds:.1f} s)")

    # The torch-free reader of the notebook accepts these files.
    results_module = pytest.importorskip("sdlib.results")
    frame = results_module.load_records(results)
    assert set(frame["chain"]) == {"alpha=0", "alpha=1", "alpha_hat"}


def test_finished_config_does_no_work(reference_run, monkeypatch, capsys):
    config, records, _ = reference_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished config must not train or load data")

    monkeypatch.setattr(chains, "distill_group", forbidden)
    monkeypatch.setattr(train.cifar, "load_splits", forbidden)
    events = []
    assert run_chains(config, progress=False, callback=events.append) == records
    assert events == []
    # The same through the command line.
    train.main(["--epochs", "2", "--batch-size", "32", "--seeds", "0", "--steps", "2", "--alphas", "0", "1",
                "--n-val", "40", "--subset", "64", "--data-root", config.data_root, "--results-dir",
                config.results_dir, "--checkpoint-dir", config.checkpoint_dir, "--device", "cpu", "--no-progress"])
    assert "nothing to train" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_records(reference_run, tiny_data_root, run_dir):
    tmp_path = run_dir
    reference_config, reference_records, _ = reference_run
    # One model at a time (tests/test_inflight.py resumes the chains in flight); the reference trained them in
    # flight: the records must be the same.
    config = tiny_config(tmp_path, tiny_data_root, chains_in_flight="off")
    assert config.config_hash() == reference_config.config_hash()

    class Interrupt(Exception):
        pass

    def interrupt_at(event_name, chain, epoch):
        def callback(event):
            if (event["event"], event["chain"], event["epoch"]) == (event_name, chain, epoch):
                raise Interrupt
        return callback

    # 1: stop right after the shared step-1 model is final; 2: stop in the middle of a step (after its first
    # epoch); 3: run to the end.
    with pytest.raises(Interrupt):
        run_chains(config, progress=False, callback=interrupt_at("step_end", "shared", 2))
    assert [r["chain"] for r in read_jsonl(tmp_path / "results" / "records.jsonl")] == ["shared"]
    with pytest.raises(Interrupt):
        run_chains(config, progress=False, callback=interrupt_at("epoch_end", "alpha=1", 1))
    state = tmp_path / "checkpoints" / config.config_hash() / "seed0" / "alpha=1" / "step2.state.pt"
    assert torch.load(state, weights_only=True)["epoch"] == 1
    events = []
    records = run_chains(config, progress=False, callback=events.append)

    # The last call trained only what was left: epoch 2 of alpha=1, then the alpha-hat step.
    assert [(e["chain"], e["epoch"]) for e in events if e["event"] == "epoch_end"] == \
           [("alpha=1", 2), ("alpha_hat", 1), ("alpha_hat", 2)]
    assert [(r["seed"], r["chain"], r["step"]) for r in records] == KEYS
    for ours, reference in zip(records, reference_records):
        assert {k: ours[k] for k in RESULT_FIELDS} == {k: reference[k] for k in RESULT_FIELDS}
    epochs = read_jsonl(tmp_path / "results" / "epochs.jsonl")
    assert len(epochs) == 8 and len({(e["chain"], e["step"], e["epoch"]) for e in epochs}) == 8


def test_nan_loss_stops_the_run_and_keeps_earlier_results(reference_run, tiny_data_root, run_dir, monkeypatch):
    tmp_path = run_dir
    reference_config, _, _ = reference_run
    # A copy of the finished run (checkpoints hard-linked: files are only ever replaced, never edited in place),
    # extended to step 3; its first step-3 model meets a NaN loss.
    shutil.copytree(reference_config.results_dir, tmp_path / "results")
    shutil.copytree(reference_config.checkpoint_dir, tmp_path / "checkpoints", copy_function=os.link)
    config = tiny_config(tmp_path, tiny_data_root, steps=3)
    before = (tmp_path / "results" / "records.jsonl").read_bytes()

    real_loss = train.distillation_loss

    def nan_loss(logits, labels, alpha, teacher_probs=None):
        return real_loss(logits, labels, alpha, teacher_probs) * float("nan")

    monkeypatch.setattr(lean_step, "distillation_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"seed=0, chain='alpha=0', step=3, epoch=1"):
        run_chains(config, progress=False)
    assert (tmp_path / "results" / "records.jsonl").read_bytes() == before
    assert len(read_jsonl(tmp_path / "results" / "epochs.jsonl")) == 8


def test_provenance_takes_the_commit_named_by_the_launcher(monkeypatch):
    monkeypatch.setenv("SDLIB_GIT_COMMIT", "a" * 40)  # overrides whatever git says
    prov = train.provenance(torch.device("cpu"))
    assert prov["git_commit"] == "a" * 40 and prov["git_dirty"] is None
    monkeypatch.delenv("SDLIB_GIT_COMMIT")
    monkeypatch.setattr(chains, "_git", lambda *args: None)
    prov = train.provenance(torch.device("cpu"))
    assert prov["git_commit"] == "unknown" and prov["git_dirty"] is None


def test_results_from_before_the_protocol_fields_are_reused(reference_run, tiny_data_root, run_dir, monkeypatch):
    """A results folder written before teacher_bn, data_order and alpha_hat_bounds existed: its config keeps its
    hash, its records are found, and a step whose final checkpoint exists but whose record does not (a run
    stopped in between) gets its record from the checkpoint, with nothing trained.

    The folder is made from the reference run's fixed-alpha steps, which do not depend on alpha_hat_bounds:
    relabeled with the hash of the same config with the bounds the pipeline had ([0, 1]), they are what a run
    of that config before the change wrote, less the new fields (stripped from records and checkpoints)."""
    tmp_path = run_dir
    reference_config, reference_records, _ = reference_run
    config = tiny_config(tmp_path, tiny_data_root, alpha_hat_bounds=(0.0, 1.0), include_alpha_hat=False)
    old_hash = config.config_hash()
    assert old_hash == _hash_before_the_protocol_fields(config) != reference_config.config_hash()
    for chain in ("shared", "alpha=0", "alpha=1"):
        shutil.copytree(Path(reference_config.checkpoint_dir) / reference_config.config_hash() / "seed0" / chain,
                        tmp_path / "checkpoints" / old_hash / "seed0" / chain, copy_function=os.link)
    old_config = {k: v for k, v in config.to_dict().items() if k not in NEW_CONFIG_FIELDS}
    old_records = [{**{k: v for k, v in r.items() if k not in NEW_RECORD_FIELDS}, "config": old_config,
                    "config_hash": old_hash} for r in reference_records[:3]]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_records[:2]))
    for path in (tmp_path / "checkpoints").rglob("step*.pt"):  # replaced, not edited: the links stay intact
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["summary"] = {k: v for k, v in checkpoint["summary"].items() if k not in NEW_RECORD_FIELDS}
        step_module.atomic_torch_save({**checkpoint, "config_hash": old_hash}, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("results written before the new fields must not be trained again")

    monkeypatch.setattr(chains, "distill_group", forbidden)
    records = run_chains(config, progress=False)
    assert [(r["seed"], r["chain"], r["step"]) for r in records] == KEYS[:3]
    assert records[:2] == old_records[:2]  # found as they were
    rewritten = records[2]  # alpha=1 step 2: from its final checkpoint
    assert {k: rewritten[k] for k in RESULT_FIELDS} == {k: reference_records[2][k] for k in RESULT_FIELDS}
    assert all(rewritten[k] is None for k in NEW_RECORD_FIELDS)  # unknown for a step finished before they existed
    assert results_module.load_records(tmp_path / "results")["best_test_acc"].isna().all()


@pytest.mark.parametrize("in_flight, alphas", [("streams", (0.0,)), ("batched", (0.0, 1.0))])
def test_official_protocol_on_all_training_images(tiny_data_root, run_dir, in_flight, alphas):
    """n_val = 0 (all training images), the teacher's BatchNorm on batch statistics and one fixed data order, on
    real images; the alpha-hat chain, which would need validation images, is refused before any work. Also with
    the chains of step 2 trained in flight as one batched network (evaluated on the empty validation split)."""
    tmp_path = run_dir
    with pytest.raises(ValueError, match=r"TrainConfig\.n_val"):
        tiny_config(tmp_path, tiny_data_root, n_val=0)
    assert not any(tmp_path.iterdir())
    config = tiny_config(tmp_path, tiny_data_root, n_val=0, include_alpha_hat=False, alphas=alphas,
                         teacher_bn="train", data_order="fixed", chains_in_flight=in_flight)
    teacher_file = tmp_path / "checkpoints" / config.config_hash() / "seed0" / "shared" / "step1.pt"
    teacher_bytes = []

    def snapshot(event):
        if event["event"] == "step_end" and event["chain"] == "shared":
            teacher_bytes.append(teacher_file.read_bytes())

    records = run_chains(config, progress=False, callback=snapshot)
    assert [(r["chain"], r["step"]) for r in records] == [("shared", 1)] + [(f"alpha={a:g}", 2) for a in alphas]
    for record in records:
        assert set(record) == RECORD_FIELDS
        assert record["data"]["sizes"] == {"train": 64, "val": 0, "test": 64}
        assert record["data"]["class_counts"]["val"] == [0] * 10
        assert record["val_acc"] is None and record["val_loss"] is None
        assert 0.0 <= record["best_test_acc"] <= 1.0 and record["best_test_epoch"] in (1, 2)
        assert record["best_test_acc"] >= record["test_acc"]
        assert (record["config"]["teacher_bn"], record["config"]["data_order"], record["config"]["n_val"]) == \
               ("train", "fixed", 0)
        assert record["config_hash"] == config.config_hash()
    # The teacher's checkpoint is not altered by a step that ran it on batch statistics.
    assert teacher_file.read_bytes() == teacher_bytes[0]
    frame = results_module.load_records(tmp_path / "results")
    assert frame["val_acc"].isna().all() and frame["test_acc"].between(0, 1).all()
