"""The lean training step against the plain autograd formulation it replaces (float64, so that agreement is to
~1e-12 and any mistake shows as an O(1) difference), its parts (L2 gradient, folded teacher, device schedule,
batch-norm counters), and the CUDA graph capture path where CUDA exists."""

from __future__ import annotations

import math
import types

import pytest

torch = pytest.importorskip("torch")

from sdlib import step as step_module  # noqa: E402
from sdlib.config import TrainConfig  # noqa: E402
from sdlib.step import (  # noqa: E402
    GroupStep,
    Member,
    _lr_factor,
    _Schedule,
    _step_runner,
    add_l2_grad_,
    build_model,
    distill_step,
    distillation_loss,
    fold_batch_norms,
    l2_norms,
    l2_penalty,
    teacher_probs,
)

BATCH = 4


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _images(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def _assert_close(actual, expected, what, rtol=1e-10):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-15, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


def test_l2_gradient_without_autograd_equals_autograds(float64):
    model = build_model(seed=0, step=1)
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


def test_lean_step_equals_a_plain_autograd_step(float64):
    """One GroupStep step (teacher with folded batch norms, L2 gradient added after backward, fused Adam with a
    device learning rate, one-hot targets from a table) = the plain loop's step: loss + l2_penalty through
    autograd, teacher in eval mode, torch.optim.Adam."""
    config = TrainConfig(batch_size=BATCH, lr=1e-3, l2_coef=1e-2)
    teacher = build_model(seed=7, step=1).eval()
    with torch.no_grad():  # non-trivial running statistics, so that folding them matters
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x_train, y_train = _images(16)
    index = torch.tensor([3, 1, 4, 15])
    lean_model, plain_model = build_model(seed=0, step=2), build_model(seed=0, step=2)
    group = GroupStep(config, [lean_model], [Member(chain="c", alpha=0.3, teacher=teacher)], y_train,
                      torch.device("cpu"), use_bf16=False, memory_format=torch.contiguous_format, batched=False)
    group.schedule.start_at(0)
    generator = torch.Generator().manual_seed(11)
    group.write_batch(x_train, index, generator)
    x = group.x.clone()
    group.step()
    group.students.final_models(1)

    optimizer = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    plain_model.train()
    loss = distillation_loss(plain_model(x), y_train[index], 0.3, teacher_probs(teacher, x)) \
        + l2_penalty(plain_model, 1e-2)
    loss.backward()
    optimizer.step()
    assert math.isclose(group.students.loss_sums[0].item(), loss.item(), rel_tol=1e-12)
    # The gradients Adam used (left in .grad by both): main term + L2 term, to float64 rounding.
    for (name, p), q in zip(lean_model.named_parameters(), plain_model.parameters()):
        _assert_close(p.grad, q.grad, f"grad {name}", rtol=1e-10)
    lean, plain = lean_model.state_dict(), plain_model.state_dict()
    assert set(lean) == set(plain)
    for key in plain:
        if plain[key].dtype == torch.int64:  # num_batches_tracked: restored to the batches trained
            assert torch.equal(lean[key], plain[key]), key
        else:  # Adam's first step moves each weight by lr * g / (|g| + eps): where |g| is near eps the rounding
            # of g is amplified (and the lean lr is float32(1e-3)), so the weights agree to 1e-6 * lr.
            torch.testing.assert_close(lean[key], plain[key], rtol=0, atol=1e-9, msg=key)


def test_folded_teacher_computes_the_eval_mode_network(float64):
    teacher = build_model(seed=3, step=1)
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


def _teacher_with_statistics(seed: int):
    teacher = build_model(seed=seed, step=1)
    with torch.no_grad():  # running statistics far from any batch's, so that the two modes differ clearly
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return teacher.eval()


@pytest.mark.parametrize("batched", [False, True])
def test_lean_step_teachers_follow_teacher_bn(float64, batched):
    """The lean step's teacher targets are teacher_probs(teacher, x, config.teacher_bn) of each member's own
    teacher: "eval" through folded batch norms, "train" (batch statistics, unfoldable) unfolded, one at a time or
    as one batched network; an alpha above 1 (an unbounded alpha-hat) gets its teacher too; the teachers (their
    running statistics and num_batches_tracked included) stay exactly as they were."""
    teachers = [_teacher_with_statistics(3), _teacher_with_statistics(4)]
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    members = [Member(chain="alpha=0.3", alpha=0.3, teacher=teachers[0]),
               Member(chain="alpha_hat", alpha=1.4, teacher=teachers[1]),
               Member(chain="alpha=1", alpha=1.0)]
    x_train, y_train = _images(16)
    x = step_module.cifar.normalize(x_train[:8]).to(torch.float64)
    for mode in ("eval", "train"):
        config = TrainConfig(batch_size=8, lr=1e-3, teacher_bn=mode, chains_in_flight="batched" if batched
                             else "streams")
        models = [build_model(seed=0, step=2) for _ in members]
        group = GroupStep(config, models, members, y_train, torch.device("cpu"), use_bf16=False,
                          memory_format=torch.contiguous_format, batched=batched)
        targets = group.teachers(x)
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
        expected = 2e-3 * _lr_factor(iteration, 4, 12, "cosine")
        assert math.isclose(schedule.lr.item(), expected, rel_tol=1e-6), iteration
        assert schedule.value(iteration) == expected
        schedule.advance()
    schedule.start_at(6)  # a resumed run
    assert math.isclose(schedule.lr.item(), 2e-3 * _lr_factor(6, 4, 12, "cosine"), rel_tol=1e-6)
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

    model = build_model(seed=0, step=1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    counter = Count()
    with counter:
        add_l2_grad_(params, l2_norms(params), 1e-4)
    assert len(params) == 161 and len(counter.names) <= 8, counter.names


def test_capture_graph_needs_cuda():
    config = TrainConfig(capture="graph")
    with pytest.raises(ValueError, match="capture='graph' needs CUDA"):
        _step_runner(config, torch.device("cpu"), lambda: None, [])
    with pytest.raises(ValueError, match="TrainConfig.capture must be one of"):
        TrainConfig(capture="cudagraph")
    with pytest.raises(ValueError, match="TrainConfig.chains_in_flight must be one of"):
        TrainConfig(chains_in_flight="parallel")
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
    teacher = build_model(seed=7, step=1).to(device).eval()
    n = 3 if batched else 1
    results = {}
    for capture in ("none", "graph"):
        config = TrainConfig(batch_size=8, capture=capture, chains_in_flight="batched" if batched else "streams")
        members = [Member(chain=f"m{i}", alpha=[0.0, 0.5, 1.0][i % 3], teacher=teacher) for i in range(n)]
        models = [build_model(seed=0, step=2).to(device) for _ in members]
        group = GroupStep(config, models, members, y_train, device, use_bf16=False,
                          memory_format=torch.contiguous_format, batched=batched)
        group.schedule.start_at(0)
        run = _step_runner(config, device, group.step, group.networks)
        generator = torch.Generator(device=device).manual_seed(0)
        for i in range(8):
            group.write_batch(x_train, torch.arange(8 * i, 8 * i + 8, device=device) % 64, generator)
            run()
        torch.cuda.synchronize()
        if capture == "graph":
            assert run.graph is not None  # steps 4.. were graph replays
        results[capture] = [m.state_dict() for m in group.students.final_models(8)]
    for eager, graphed in zip(results["none"], results["graph"]):
        for key, value in eager.items():
            if value.is_floating_point():
                torch.testing.assert_close(graphed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_step_module_reads_top_to_bottom():
    """The chapter's reading order: the model (imported from sdlib.models, the networks' own module), loss, L2
    term, teacher, order, evaluation, then the step and loop."""
    source = open(step_module.__file__).read()
    assert source.index("from sdlib.models import build_model") < source.index("\ndef distillation_loss(")
    names = ["distillation_loss", "l2_penalty", "add_l2_grad_", "teacher_probs", "epoch_order",
             "evaluate", "GroupStep", "distill_step", "distill_group"]
    source = open(step_module.__file__).read()
    positions = [source.index(f"\ndef {name}(") if f"\ndef {name}(" in source else source.index(f"\nclass {name}")
                 for name in names]
    assert positions == sorted(positions)
