"""Tests of sdlib.batched: n ResNet-50s fused into one grouped network must behave exactly like n separate ones.

Every reference is the plain path: separate torchvision resnet50 models, ``distillation_loss``, ``l2_penalty``
and one Adam per model. (The batched network in the training step is tested against the readable step in
tests/test_step.py.) The networks run in float64 on 32x32 inputs with batches of 4, so that
the grouped and the dense kernels agree to ~1e-12 and any layout error (a channel of model i read by model j, a
misplaced residual, a transposed classifier) shows up as an O(1) difference.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest

torch = pytest.importorskip("torch")
import torchvision  # noqa: E402

from sdlib.batched import BatchedResNet50, model_slice, stack_models  # noqa: E402
from sdlib.lean_step import distillation_loss, l2_norms  # noqa: E402
from sdlib.step import evaluate, l2_penalty  # noqa: E402
from sdlib.train import build_model  # noqa: E402
from tiny import drop_seeded_models, seeded_model  # noqa: E402

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
    """Three differently initialized float64 resnet50s with non-trivial batch-norm running statistics (copies of
    the ones built at the first call: a ResNet-50's seeded init takes about 0.5 s, a copy a tenth of that)."""
    return copy.deepcopy(_built_models(seed))


@pytest.fixture(scope="module", autouse=True)
def _drop_built_models():
    yield
    _built_models.cache_clear()
    drop_seeded_models()


@functools.cache
def _built_models(seed: int) -> list[torch.nn.Module]:
    models = []
    for i in range(N_MODELS):
        model = seeded_model(seed, i + 1).double()
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


def unstack(batched: BatchedResNet50) -> list[dict[str, torch.Tensor]]:
    """The n models' weights as n resnet50 state_dicts (copies)."""
    return [batched.model_state_dict(i) for i in range(batched.n_models)]


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
    assert batched.fc.weight.shape == (N_MODELS * NUM_CLASSES, 2048, 1, 1)
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
        # channels_last changes the memory layout only
        batched_cl = stack_models(models).eval().to(memory_format=torch.channels_last)
        _assert_close(batched_cl(x.contiguous(memory_format=torch.channels_last)),
                      torch.stack([m(x) for m in models]), "channels_last logits")


# ---------------------------------------------------------------------------------------- losses and training


def _slices(batched: BatchedResNet50) -> list[torch.Tensor]:
    """Model-major views, p-major order: slices[j * n + i] is model i's part of parameter j."""
    return [s for p in batched.parameters() for s in p.unflatten(0, (batched.n_models, -1)).unbind(0)]


def _batched_l2_penalty(batched: BatchedResNet50, coef: float) -> torch.Tensor:
    """(n,) per model: coef * the sum of the norms of its slices, through autograd."""
    return coef * torch.stack([torch.linalg.vector_norm(s) for s in _slices(batched)]).view(-1, N_MODELS).sum(0)


def _batched_loss(logits: torch.Tensor, labels: torch.Tensor, alphas, teacher_probs: torch.Tensor) -> torch.Tensor:
    return torch.stack([distillation_loss(logits[i], labels, a, None if a == 1.0 else teacher_probs[i])
                        for i, a in enumerate(alphas)])


def test_l2_norms_of_the_model_slices_equal_separate_models():
    models = _models()
    batched = stack_models(models)
    penalties = L2_COEF * l2_norms(_slices(batched)).view(-1, N_MODELS).sum(0)
    for i, model in enumerate(models):
        _assert_close(penalties[i], l2_penalty(model, L2_COEF), f"l2 penalty of model {i}", rtol=1e-12)


def test_gradients_and_three_adam_steps_match_separate_models():
    """One Adam on sum_i loss_i over the batched parameters == one Adam per model on its own loss.

    Conditioning. A ResNet-50 trained on batches of 4 is chaotic: Adam's update lr * g / (|g| + eps) has slope
    lr / eps at near-zero entries (1e4 for the defaults), and batch norm over 4 values at layer4 amplifies
    further, so rounding noise in the gradients (float32 in distillation_loss, or the ~1e-15 of float64 grouped
    vs. dense kernels) grows to O(1e-5) weight differences within three steps. The test therefore uses float64
    throughout (distillation_loss computes in float64 for float64 logits) and Adam's eps = 1e-3, so rounding
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
        losses = _batched_loss(batched(x), labels, ALPHAS, teacher_probs)
        losses = losses + _batched_l2_penalty(batched, L2_COEF)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        separate_losses = []
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            alpha = ALPHAS[i]
            loss = distillation_loss(model(x), labels, alpha, None if alpha == 1.0 else teacher_probs[i])
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


def test_one_evaluate_for_one_model_and_for_the_batched_network():
    """sdlib.step.evaluate of a batched network is evaluate of each of its models (a list of n results); on an
    empty split (n_val = 0) every acc and loss is None, as for one model."""
    models = _models()
    batched = stack_models(models)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (12,), generator=gen)
    together = evaluate(batched, x, y, batch_size=5, return_probs=True)
    assert len(together) == N_MODELS
    for result, model in zip(together, models):
        alone = evaluate(model, x, y, batch_size=5, return_probs=True)
        assert result["acc"] == alone["acc"]
        assert math.isclose(result["loss"], alone["loss"], rel_tol=1e-6)
        _assert_close(result["probs"], alone["probs"], "probs", rtol=1e-6)
    empty_x, empty_y = x[:0], y[:0]
    results = evaluate(batched, empty_x, empty_y, return_probs=True)
    assert len(results) == N_MODELS
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


def test_bad_forward_input_raises_value_error(small_batched):
    for bad in (torch.zeros(4, 1, 32, 32), torch.zeros(3, 32, 32), torch.zeros(2, 4, 3, 32, 32),
                torch.zeros(0, 3, 32, 32), [0.0]):  # one batch per model (n, B, 3, H, W): not taken either
        with pytest.raises(ValueError, match="x must have shape"):
            small_batched(bad)
    with pytest.raises(ValueError, match="index"):
        small_batched.model_state_dict(2)
    with pytest.raises(ValueError, match="state_dict"):
        small_batched.load_model_state_dict(0, {"conv1.weight": torch.zeros(64, 3, 7, 7)})
