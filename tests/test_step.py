"""The lean training step (sdlib.lean_step) against the readable step it makes fast (sdlib.step.train_on_batch),
in float64 so that agreement is to ~1e-12 and any mistake shows as an O(1) difference; its parts (L2 gradient,
folded teacher, device schedule), and the CUDA graph capture path where CUDA exists."""

from __future__ import annotations

import math
import types

import pytest

torch = pytest.importorskip("torch")

from sdlib import step as step_module  # noqa: E402
from sdlib.augment import normalize  # noqa: E402
from sdlib.config import TrainConfig  # noqa: E402
from sdlib.lean_step import LeanStep, _Schedule, add_l2_grad_, l2_norms, lr_factor  # noqa: E402
from sdlib.models import build_model, fold_batch_norms, teacher_probs  # noqa: E402
from sdlib.step import distill_step, l2_penalty, train_on_batch  # noqa: E402
from tiny import drop_seeded_models, seeded_model  # noqa: E402

BATCH = 4


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module", autouse=True)
def _drop_built_models():
    yield
    drop_seeded_models()


def _images(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def _assert_close(actual, expected, what, rtol=1e-10):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-15, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


def test_l2_gradient_without_autograd_equals_autograds(float64):
    model = seeded_model(0, 1)
    params = list(model.parameters())
    assert any(float(p.detach().abs().max()) == 0.0 for p in params)  # batch-norm biases start at 0: the W = 0 case
    with torch.no_grad():  # a few other zero tensors and tiny ones, anywhere
        params[3].zero_()
        params[7].mul_(1e-30)
    coef = 3e-4
    l2_penalty(model, coef).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 0.25)  # the gradient is added to what backward() left
    norms = l2_norms(params)
    assert norms.shape == (len(params),) and not norms.requires_grad
    assert math.isclose(coef * norms.sum().item(), l2_penalty(model, coef).item(), rel_tol=1e-14)
    add_l2_grad_(params, norms, coef)
    for i, (p, g) in enumerate(zip(params, expected)):
        _assert_close(p.grad - 0.25, g, f"parameter {i}", rtol=1e-12)
        assert torch.isfinite(p.grad).all()


def _teacher_with_statistics(seed: int):
    teacher = seeded_model(seed, 1)
    with torch.no_grad():  # running statistics far from any batch's, so that folding them (and the modes) matter
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return teacher.eval()


@pytest.mark.parametrize("batched", [False, True])
def test_lean_step_equals_the_readable_step(float64, batched):
    """Two LeanStep steps (teachers with folded batch norms, the authors' two-term loss, L2 gradient added after
    backward, fused Adam with a device learning rate, one-hot targets from a table; one model, or three as one
    batched network) = train_on_batch for each model: the MSE to the mixed targets, the L2 term through
    autograd, torch.optim.Adam. The recorded objective (two-term loss + L2) agrees to 1e-10 at both steps, the
    weights after the first to float64 rounding amplified by Adam."""
    lr = 2.0 ** -10  # a float32 number: the lean step's learning rate is a float32 device tensor
    config = TrainConfig(batch_size=BATCH, lr=lr, l2_coef=1e-2)
    teachers = [_teacher_with_statistics(7), _teacher_with_statistics(8)]
    alphas, member_teachers = ([0.3, 1.0, 1.4], [teachers[0], None, teachers[1]]) if batched else ([0.3], teachers[:1])
    x_train, y_train = _images(16)
    lean = LeanStep(config, [seeded_model(0, 2) for _ in alphas], alphas, member_teachers, y_train, "cpu",
                    batched=batched)
    plain = [seeded_model(0, 2) for _ in alphas]
    optimizers = [torch.optim.Adam(m.parameters(), lr=lr) for m in plain]
    lean.schedule.start_at(0)
    generator = torch.Generator().manual_seed(11)
    for step, index in enumerate((torch.tensor([3, 1, 4, 15]), torch.tensor([9, 2, 6, 5]))):
        lean.train()
        lean.write_batch(x_train, index, generator)
        x = lean.x.clone()
        for loss_sum in lean.loss_sums:
            loss_sum.zero_()
        lean()
        for k, (model, optimizer) in enumerate(zip(plain, optimizers)):
            objective = train_on_batch(model, optimizer, x, y_train[index], alphas[k], member_teachers[k], 1e-2)
            assert math.isclose(lean.loss_sums[k].item(), objective.item(), rel_tol=1e-10), (step, k)
        if step > 0:  # the second objective is that of the weights after the first step: Adam's state, the lr
            break
        for k, (lean_model, plain_model) in enumerate(zip(lean.final_models(), plain)):
            ours, theirs = lean_model.state_dict(), plain_model.state_dict()
            assert set(ours) == set(theirs)
            for key in theirs:
                if theirs[key].dtype == torch.int64:  # num_batches_tracked: the batches trained
                    assert torch.equal(ours[key], theirs[key]), key
                else:  # Adam's first step moves each weight by lr * g / (|g| + eps): where |g| is near eps the
                    # rounding of g is amplified, so the weights agree to 1e-6 * lr (and later steps, through
                    # batch norm over 4 images, amplify it further: the second step is compared by its objective).
                    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-9, msg=f"model {k}: {key}")
            moved = (ours["fc.weight"] - seeded_model(0, 2).fc.weight).abs().max().item()
            assert moved > 0.5 * lr, f"model {k} barely moved: the comparison would be vacuous"


def test_folded_teacher_computes_the_eval_mode_network(float64):
    teacher = seeded_model(3, 1)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    x = torch.randn(BATCH, 3, 32, 32)
    folded = fold_batch_norms(teacher)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(not p.requires_grad for p in folded.parameters())
    teacher.eval()
    with torch.no_grad():
        _assert_close(folded(x), teacher(x), "logits", rtol=1e-10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())  # the original is untouched


@pytest.mark.parametrize("batched", [False, True])
def test_lean_step_teachers_follow_teacher_bn(float64, batched):
    """The lean step's teacher targets are teacher_probs(teacher, x, config.teacher_bn) of each member's own
    teacher: "eval" through folded batch norms, "train" (batch statistics, unfoldable) unfolded, one at a time or
    as one batched network; an alpha above 1 (an unbounded alpha-hat) gets its teacher too; the teachers (their
    running statistics and num_batches_tracked included) stay exactly as they were."""
    teachers = [_teacher_with_statistics(3), _teacher_with_statistics(4)]
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    members = [(0.3, teachers[0]), (1.4, teachers[1]), (1.0, None)]  # (alpha, teacher)
    x_train, y_train = _images(16)
    x = normalize(x_train[:8]).to(torch.float64)
    for mode in ("eval", "train"):
        config = TrainConfig(batch_size=8, lr=1e-3, teacher_bn=mode, chains_in_flight="batched" if batched
                             else "streams")
        models = [seeded_model(0, 2) for _ in members]
        lean = LeanStep(config, models, [m[0] for m in members], [m[1] for m in members], y_train, "cpu",
                        batched=batched)
        targets = lean.teachers(x)
        for k, teacher in enumerate(teachers):
            expected = teacher_probs(teacher, x, mode)
            _assert_close(targets[k], expected, f"{mode} targets of member {k}", rtol=1e-9)
        if batched:  # the alpha = 1 row is a placeholder the loss ignores
            assert targets.shape == (3, 8, 10)
        else:
            assert targets[2] is None
        # the modes differ (the running statistics are far from the batch's), so the mode was really applied
        other = teacher_probs(teachers[0], x, "train" if mode == "eval" else "eval")
        assert (targets[0] - other).abs().max().item() > 1e-3
    for teacher, saved in zip(teachers, before):
        assert not teacher.training
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, saved[key]), key


def test_device_schedule_follows_the_host_schedule():
    config = TrainConfig(epochs=3, lr=2e-3, lr_schedule="cosine", warmup_epochs=1)
    schedule = _Schedule(config, iters_per_epoch=4, device=torch.device("cpu"))
    schedule.start_at(0)
    for iteration in range(12):
        expected = 2e-3 * lr_factor(iteration, 4, 12, "cosine")
        assert math.isclose(schedule.lr.item(), expected, rel_tol=1e-6), iteration
        assert schedule.value(iteration) == expected
        schedule.advance()
    schedule.start_at(6)  # a resumed run
    assert math.isclose(schedule.lr.item(), 2e-3 * lr_factor(6, 4, 12, "cosine"), rel_tol=1e-6)
    constant = _Schedule(TrainConfig(lr=1e-4), iters_per_epoch=4, device=torch.device("cpu"))
    constant.start_at(0)
    constant.advance()
    assert constant.lr.item() == torch.tensor(1e-4, dtype=torch.float32).item()


def test_lean_step_update_is_a_handful_of_multi_tensor_ops():
    """After backward, the L2 gradient, Adam and the bookkeeping dispatch O(1) ops, not O(parameters)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    model = seeded_model(0, 1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    counter = Count()
    with counter:
        add_l2_grad_(params, l2_norms(params), 1e-4)
    assert len(params) == 161 and len(counter.names) <= 8, counter.names


def test_capture_graph_needs_cuda_and_removed_modes_are_named():
    _, y_train = _images(16)
    with pytest.raises(ValueError, match="capture='graph' needs CUDA"):
        LeanStep(TrainConfig(capture="graph", batch_size=BATCH), [build_model()], [1.0], [None], y_train, "cpu")
    with pytest.raises(ValueError, match="TrainConfig.capture must be one of"):
        TrainConfig(capture="cudagraph")
    with pytest.raises(ValueError, match="TrainConfig.chains_in_flight must be one of"):
        TrainConfig(chains_in_flight="parallel")
    # removed without a measurement that chose them: an old config naming one fails, naming the field
    for field, removed in (("capture", "reduce-overhead"), ("capture", "max-autotune"),
                           ("chains_in_flight", "batched-matmul")):
        with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be one of '.*', got '{removed}'"):
            TrainConfig(**{field: removed})
    with pytest.raises(ValueError, match="TrainConfig.eval_every must be an integer >= 1"):
        TrainConfig(eval_every=0)


def test_evaluation_every_eval_every_epochs_and_at_the_last():
    x, y = _images(48)
    data = types.SimpleNamespace(x_train=x[:32], y_train=y[:32], x_val=x[32:40], y_val=y[32:40],
                                 x_test=x[40:], y_test=y[40:])
    config = TrainConfig(epochs=3, batch_size=16, eval_every=2, eval_batch_size=64)
    result = distill_step(config, data, seed=0, step=1, alpha=1.0)
    evaluated = [log["epoch"] for log in result.epochs if log["val_acc"] is not None]
    assert evaluated == [2, 3]
    assert all(log["test_loss"] is None for log in result.epochs if log["epoch"] == 1)
    assert result.summary()["val_acc"] == result.epochs[-1]["val_acc"] is not None
    # The final model's state has the batch-norm counters a plain loop leaves: one per batch trained.
    assert int(result.model.bn1.num_batches_tracked) == 3 * 2


def _cuda_reason() -> str:
    return "CUDA graph capture needs a CUDA device; this machine has none (benchmarks/gpu_check.sh runs it on a GPU)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=_cuda_reason())
@pytest.mark.parametrize("batched", [False, True])
def test_graph_captured_step_equals_the_eager_step_on_cuda(batched):
    """Warm-up, capture and replays of the whole step train the same weights as the eager step, and the step
    is really replayed from a graph."""
    device = torch.device("cuda")
    x_train, y_train = (t.to(device) for t in _images(64))
    teacher = seeded_model(7, 1).to(device).eval()
    n = 3 if batched else 1
    results = {}
    for capture in ("none", "graph"):
        config = TrainConfig(batch_size=8, capture=capture, chains_in_flight="batched" if batched else "streams")
        alphas = [[0.0, 0.5, 1.0][i % 3] for i in range(n)]
        lean = LeanStep(config, [seeded_model(0, 2) for _ in alphas], alphas, [teacher] * n, y_train,
                        device, batched=batched)
        lean.schedule.start_at(0)
        generator = torch.Generator(device=device).manual_seed(0)
        for i in range(8):
            lean.write_batch(x_train, torch.arange(8 * i, 8 * i + 8, device=device) % 64, generator)
            lean()
        torch.cuda.synchronize()
        if capture == "graph":
            assert lean.graph is not None  # steps 4.. were graph replays
        results[capture] = [m.state_dict() for m in lean.final_models()]
    for eager, graphed in zip(results["none"], results["graph"]):
        for key, value in eager.items():
            if value.is_floating_point():
                torch.testing.assert_close(graphed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_step_module_opens_with_the_readable_step_then_the_epoch_loop():
    """The chapter's reading order: after the docstring and imports, the step as a reader writes it (under 40
    lines), the mixed targets, the loss, the unsquared L2 term and the optimizer step within the first 120
    lines; then the epoch loop. The fast path lives in sdlib.lean_step."""
    source = open(step_module.__file__).read()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def train_on_batch("))
    assert not any(line.startswith(("def ", "class ")) for line in lines[:start])
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("def ", "class ", "@")))
    assert end - start < 40 + 4  # the step and the blank lines after it
    head = "\n".join(lines[:120])
    for text in ("z = alpha * onehot + (1 - alpha) * t", "F.mse_loss(p, z)", "torch.linalg.vector_norm(w)",
                 "(loss + l2).backward()", "optimizer.step()"):
        assert text in head, text
    names = ["train_on_batch", "l2_penalty", "distill_step", "distill_group", "evaluate"]
    positions = [source.index(f"\ndef {name}(") for name in names]
    assert positions == sorted(positions)
