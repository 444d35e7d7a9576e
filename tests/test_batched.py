"""Tests of sdlib.batched: n ResNet-50s fused into one grouped network must behave exactly like n separate ones.

Every reference is the plain path of sdlib.train: separate torchvision resnet50 models, ``distillation_loss``,
``l2_penalty`` and one Adam per model. The networks run in float64 on 32x32 inputs with batches of 4, so that
the grouped and the dense kernels agree to ~1e-12 and any layout error (a channel of model i read by model j, a
misplaced residual, a transposed classifier) shows up as an O(1) difference.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torchvision  # noqa: E402

from sdlib.batched import (  # noqa: E402
    BatchedResNet50,
    batched_distillation_loss,
    batched_l2_penalty,
    evaluate_batched,
    model_slice,
    stack_models,
    unstack,
)
from sdlib.train import build_model, distillation_loss, l2_penalty  # noqa: E402

N_MODELS, BATCH, NUM_CLASSES = 3, 4, 10
ALPHAS = (0.0, 0.4, 1.0)  # pure teacher, mixed, labels only (its teacher row is ignored)
L2_COEF = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    # Other jobs share the CI cores; one thread also keeps the float64 reductions deterministic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models(seed: int = 0) -> list[torch.nn.Module]:
    """Three differently initialized float64 resnet50s with non-trivial batch-norm running statistics."""
    models = []
    for i in range(N_MODELS):
        model = build_model(seed=seed, step=i + 1).double()
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen,
                                                                dtype=torch.float64))
                    module.running_var.copy_(1.0 + torch.rand(module.num_features, generator=gen,
                                                              dtype=torch.float64))
                    module.num_batches_tracked.fill_(7)
        models.append(model)
    return models


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    teacher_probs = torch.softmax(torch.randn(N_MODELS, BATCH, NUM_CLASSES, generator=gen, dtype=torch.float64), 2)
    return x, labels, teacher_probs


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    """|actual - expected| <= rtol * max(|expected|) (+ a float64 floor), elementwise; NaN fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


def _assert_state_dicts_close(actual: dict, expected: dict, what: str, rtol: float = 1e-9) -> None:
    assert set(actual) == set(expected), f"{what}: keys differ"
    for key, value in expected.items():
        if value.dtype == torch.int64:
            assert torch.equal(actual[key], value), f"{what}[{key}]: {actual[key]} != {value}"
        else:
            _assert_close(actual[key], value, f"{what}[{key}]", rtol)


# ------------------------------------------------------------------------------------------------ construction


def test_unstack_round_trip_loads_into_build_model():
    models = _models()
    batched = stack_models(models)
    assert batched.n_models == N_MODELS and next(batched.parameters()).dtype == torch.float64
    assert batched.fc.weight.shape == (N_MODELS, 2048, NUM_CLASSES)
    states = unstack(batched)
    assert len(states) == N_MODELS
    for i, (state, model) in enumerate(zip(states, models)):
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), f"model {i}, {key}: not copied exactly"
        fresh = build_model().double()
        fresh.load_state_dict(state, strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value)
    # the unstacked state_dicts are copies: changing one does not touch the batched network
    states[0]["conv1.weight"].zero_()
    assert torch.equal(batched.model_state_dict(0)["conv1.weight"], models[0].conv1.weight)


def test_default_init_equals_separately_initialized_models():
    torch.manual_seed(123)
    batched = BatchedResNet50(2, num_classes=7)
    torch.manual_seed(123)
    separate = [torchvision.models.resnet50(num_classes=7) for _ in range(2)]
    for state, model in zip(unstack(batched), separate):
        _assert_state_dicts_close(state, model.state_dict(), "init", rtol=0.0)
    assert not torch.equal(separate[0].conv1.weight, separate[1].conv1.weight)


# ------------------------------------------------------------------------------------------------ forward pass


def test_forward_train_and_eval_match_separate_models():
    models = _models()
    batched = stack_models(models)
    x, _, _ = _batch()

    batched.train()
    for m in models:
        m.train()
    logits = batched(x)
    assert logits.shape == (N_MODELS, BATCH, NUM_CLASSES)
    expected = torch.stack([m(x) for m in models])
    _assert_close(logits, expected, "train-mode logits")
    # models differ, so a mixed-up channel layout could not pass by symmetry
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    # the train-mode forward updated the running statistics exactly as n separate batch norms would
    for i, state in enumerate(unstack(batched)):
        _assert_state_dicts_close(state, models[i].state_dict(), f"state after train forward, model {i}")

    batched.eval()
    for m in models:
        m.eval()
    with torch.no_grad():
        _assert_close(batched(x), torch.stack([m(x) for m in models]), "eval-mode logits")
        # per-model inputs (n, B, 3, H, W): model i sees only x_per_model[i]
        x_per_model = torch.stack([x, x.flip(0), 2.0 * x])
        _assert_close(batched(x_per_model), torch.stack([m(xi) for m, xi in zip(models, x_per_model)]),
                      "per-model-input logits")
        # channels_last changes the memory layout only
        batched_cl = stack_models(models).eval().to(memory_format=torch.channels_last)
        _assert_close(batched_cl(x.contiguous(memory_format=torch.channels_last)),
                      torch.stack([m(x) for m in models]), "channels_last logits")


# ---------------------------------------------------------------------------------------- losses and training


def test_batched_loss_matches_distillation_loss_per_model():
    gen = torch.Generator().manual_seed(5)
    logits = 3.0 * torch.randn(N_MODELS, 8, NUM_CLASSES, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
    teacher = torch.softmax(torch.randn(N_MODELS, 8, NUM_CLASSES, generator=gen), 2)
    losses = batched_distillation_loss(logits, labels, ALPHAS, teacher)
    assert losses.shape == (N_MODELS,) and losses.dtype == torch.float32
    logits_req = logits.clone().requires_grad_(True)
    grads, = torch.autograd.grad(batched_distillation_loss(logits_req, labels, ALPHAS, teacher).sum(), logits_req)
    for i, alpha in enumerate(ALPHAS):
        logits_i = logits[i].clone().requires_grad_(True)
        expected = distillation_loss(logits_i, labels, alpha, None if alpha == 1.0 else teacher[i])
        _assert_close(losses[i], expected, f"loss of model {i}", rtol=1e-6)
        # same gradient up to float32 rounding (mse_loss's backward groups 2/N differently)
        _assert_close(grads[i], torch.autograd.grad(expected, logits_i)[0], f"logit gradient of model {i}", 1e-6)
    # alpha == 1 rows ignore their teacher row, even a NaN placeholder (value and gradient stay finite)
    teacher_nan = teacher.clone()
    teacher_nan[2] = float("nan")
    logits_req = logits.clone().requires_grad_(True)
    losses_nan = batched_distillation_loss(logits_req, labels, torch.tensor(ALPHAS), teacher_nan)
    _assert_close(losses_nan.detach(), losses, "loss with a NaN placeholder teacher row", rtol=0.0)
    losses_nan.sum().backward()
    assert torch.isfinite(logits_req.grad).all()
    # all alphas 1: no teacher needed
    only_labels = batched_distillation_loss(logits, labels, [1.0] * N_MODELS)
    for i in range(N_MODELS):
        _assert_close(only_labels[i], distillation_loss(logits[i], labels, 1.0), f"alpha=1 loss {i}", rtol=1e-6)
    # an unbounded alpha-hat (alpha_hat_bounds=None) may lie outside [0, 1]: the same objective per model
    outside = (1.7, -0.4, 0.3)  # N_MODELS = 3
    losses_out = batched_distillation_loss(logits, labels, outside, teacher)
    for i, alpha in enumerate(outside):
        _assert_close(losses_out[i], distillation_loss(logits[i], labels, alpha, teacher[i]),
                      f"loss of model {i} at alpha={alpha}", rtol=1e-6)


def test_l2_penalty_per_group_slice_equals_separate_models():
    models = _models()
    batched = stack_models(models)
    penalties = batched_l2_penalty(batched, L2_COEF)
    assert penalties.shape == (N_MODELS,)
    for i, model in enumerate(models):
        _assert_close(penalties[i], l2_penalty(model, L2_COEF), f"l2 penalty of model {i}", rtol=1e-12)


def test_gradients_and_three_adam_steps_match_separate_models():
    """One Adam on sum_i loss_i over the batched parameters == one Adam per model on its own loss.

    Conditioning. A ResNet-50 trained on batches of 4 is chaotic: Adam's update lr * g / (|g| + eps) has slope
    lr / eps at near-zero entries (1e4 for the defaults), and batch norm over 4 values at layer4 amplifies
    further, so rounding noise in the gradients (float32 in distillation_loss, or the ~1e-15 of float64 grouped
    vs. dense kernels) grows to O(1e-5) weight differences within three steps. The test therefore uses float64
    throughout (the separate models use the batched loss with n = 1, which equals distillation_loss to float32
    rounding, tested above, and computes in float64 for float64 logits) and Adam's eps = 1e-3, so rounding
    stays at rounding level and any real difference (a gradient reaching the wrong model, a coupled update)
    shows up as O(lr).
    """
    models = _models()
    batched = stack_models(models)
    initial = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    lr = 1e-4  # the paper's
    optimizer = torch.optim.Adam(batched.parameters(), lr=lr, eps=1e-3)
    optimizers = [torch.optim.Adam(m.parameters(), lr=lr, eps=1e-3) for m in models]
    batched.train()
    for m in models:
        m.train()
    names = [name for name, _ in batched.named_parameters()]
    for step in range(3):
        x, labels, teacher_probs = _batch(seed=step + 1)
        losses = batched_distillation_loss(batched(x), labels, ALPHAS, teacher_probs)
        losses = losses + batched_l2_penalty(batched, L2_COEF)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        separate_losses = []
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            alpha = ALPHAS[i]
            logits = model(x)
            loss = batched_distillation_loss(logits[None], labels, [alpha], teacher_probs[i][None])[0]
            reference = distillation_loss(logits.detach(), labels, alpha, None if alpha == 1.0 else teacher_probs[i])
            _assert_close(loss.detach(), reference, f"n = 1 loss of model {i}", rtol=1e-6)
            loss = loss + l2_penalty(model, L2_COEF)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            separate_losses.append(loss.detach())
        _assert_close(losses.detach(), torch.stack(separate_losses), f"losses at step {step}", rtol=1e-7)
        if step == 0:
            grads = dict(zip(names, (p.grad for p in batched.parameters())))
            for i, model in enumerate(models):
                for name, p in model.named_parameters():
                    assert torch.isfinite(p.grad).all(), f"non-finite reference gradient {name}"
                    _assert_close(model_slice(name, grads[name], i, N_MODELS), p.grad,
                                  f"gradient of model {i}, {name}", rtol=1e-9)
        optimizer.step()
        for opt in optimizers:
            opt.step()
    for i, (state, model) in enumerate(zip(unstack(batched), models)):
        _assert_state_dicts_close(state, model.state_dict(), f"weights after 3 Adam steps, model {i}", rtol=1e-7)
        moved = max((state[k] - initial[i][k]).abs().max().item() for k in state if state[k].is_floating_point())
        assert moved > 0.5 * lr, f"model {i} barely moved ({moved:.3g}): the comparison would be vacuous"
    # the optimizer state is laid out like the parameters: model i's Adam moments are its slices
    for i, opt in enumerate(optimizers):
        for (name, p_batched), p in zip(batched.named_parameters(), models[i].parameters()):
            _assert_close(model_slice(name, optimizer.state[p_batched]["exp_avg_sq"], i, N_MODELS),
                          opt.state[p]["exp_avg_sq"], f"Adam exp_avg_sq of model {i}, {name}", rtol=1e-6)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_batched():
    torch.manual_seed(0)
    return BatchedResNet50(2)


def test_evaluate_batched_on_an_empty_split_gives_none(small_batched):
    """n_val = 0 (no validation split): every model's acc and loss are None, as sdlib.step.evaluate gives."""
    from sdlib.step import evaluate

    empty_x, empty_y = torch.zeros((0, 3, 32, 32), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    results = evaluate_batched(small_batched, empty_x, empty_y, return_probs=True)
    assert len(results) == 2
    assert all(r["acc"] is None and r["loss"] is None and r["probs"].shape == (0, NUM_CLASSES) for r in results)
    single = evaluate(build_model(), empty_x, empty_y, return_probs=True)
    assert (single["acc"], single["loss"], single["probs"].shape) == (None, None, (0, NUM_CLASSES))


def test_bad_construction_raises_value_error():
    with pytest.raises(ValueError, match="models"):
        stack_models([])
    with pytest.raises(ValueError, match="models"):
        stack_models(build_model())  # a module, not a list of modules
    with pytest.raises(ValueError, match=r"models\[1\]"):
        stack_models([build_model(), torchvision.models.resnet18(num_classes=10)])
    with pytest.raises(ValueError, match=r"models\[1\]"):
        stack_models([build_model(), "resnet50"])
    with pytest.raises(ValueError, match="n_models"):
        BatchedResNet50(0)
    with pytest.raises(ValueError, match="num_classes"):
        BatchedResNet50(2, num_classes=0)
    with pytest.raises(ValueError, match="batched"):
        unstack(build_model())


def test_bad_forward_input_raises_value_error(small_batched):
    for bad in (torch.zeros(4, 1, 32, 32), torch.zeros(3, 32, 32), torch.zeros(3, 4, 3, 32, 32),
                torch.zeros(2, 4, 1, 32, 32), torch.zeros(0, 3, 32, 32)):
        with pytest.raises(ValueError, match="x (with 5 dims )?must"):
            small_batched(bad)
    with pytest.raises(ValueError, match="index"):
        small_batched.model_state_dict(2)
    with pytest.raises(ValueError, match="state_dict"):
        small_batched.load_model_state_dict(0, {"conv1.weight": torch.zeros(64, 3, 7, 7)})


def test_bad_loss_input_raises_value_error():
    logits = torch.zeros(N_MODELS, BATCH, NUM_CLASSES)
    labels = torch.zeros(BATCH, dtype=torch.int64)
    teacher = torch.full((N_MODELS, BATCH, NUM_CLASSES), 1.0 / NUM_CLASSES)
    with pytest.raises(ValueError, match="alphas"):
        batched_distillation_loss(logits, labels, (0.5, 0.5), teacher)  # n = 3 models, 2 alphas
    with pytest.raises(ValueError, match="alphas"):
        batched_distillation_loss(logits, labels, (0.5, math.inf, 0.0), teacher)
    with pytest.raises(ValueError, match="alphas"):
        batched_distillation_loss(logits, labels, (0.5, math.nan, 0.0), teacher)
    with pytest.raises(ValueError, match="logits"):
        batched_distillation_loss(logits[0], labels, (0.5,) * N_MODELS, teacher)
    with pytest.raises(ValueError, match="labels"):
        batched_distillation_loss(logits, labels[:2], (0.5,) * N_MODELS, teacher)
    with pytest.raises(ValueError, match="labels"):
        batched_distillation_loss(logits, labels.float(), (0.5,) * N_MODELS, teacher)
    with pytest.raises(ValueError, match="teacher_probs"):
        batched_distillation_loss(logits, labels, (0.5,) * N_MODELS, teacher[:2])
    with pytest.raises(ValueError, match="teacher_probs"):
        batched_distillation_loss(logits, labels, (1.0, 0.5, 1.0), None)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_matmul_network_equals_the_grouped_convolution_one(channels_last):
    """pointwise="matmul" (1x1 convolutions, strided downsamples included, as batched matrix products) is the
    same function with the same weights and gradients as the grouped-convolution network."""
    models = _models()
    conv = stack_models(models)
    matmul = stack_models(models, pointwise="matmul")
    assert sum(type(m).__name__ == "_PointwiseMatmulConv2d" for m in matmul.modules()) == 36  # 1x1 convs
    assert set(conv.state_dict()) == set(matmul.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    conv, matmul = conv.to(memory_format=memory_format), matmul.to(memory_format=memory_format)
    x, labels, teacher_probs = _batch()
    x = x.contiguous(memory_format=memory_format)
    outputs = []
    for net in (conv, matmul):
        logits = net(x)
        batched_distillation_loss(logits, labels, ALPHAS, teacher_probs).sum().backward()
        outputs.append((logits.detach(), {k: p.grad for k, p in net.named_parameters()}))
    _assert_close(outputs[1][0], outputs[0][0], "logits")
    for key, grad in outputs[0][1].items():
        _assert_close(outputs[1][1][key], grad, f"grad {key}")
    with pytest.raises(ValueError, match="pointwise must be one of"):
        BatchedResNet50(2, pointwise="gemm")
