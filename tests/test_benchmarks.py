"""The training-throughput benchmark runs end to end on real images (CPU, tiny sizes) and reports consistently."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from pages import page_functions

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--device", "cpu", "--n-val", "100", "--reference-iters", "2", "--paper-iters", "2", "--fast-iters", "1",
        "--inflight-iters", "2", "--warmup", "1", "--chains", "2", "--batch-size", "4", "--workers", "0",
        "--eval-images", "20"]


@pytest.fixture(scope="module")
def benchmark_run(tiny_cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    bench = _load_benchmark()
    returned = bench.main(["--data-root", str(tiny_cifar_root), "--out", str(out), *TINY])
    return bench, returned, json.loads(out.read_text()), out


def test_every_variant_is_measured_and_written(benchmark_run):
    bench, returned, written, _ = benchmark_run
    assert written == json.loads(json.dumps(returned))
    assert list(written["variants"]) == list(bench.VARIANTS)
    for name, r in written["variants"].items():
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, name
        assert math.isclose(r["images_per_s"], r["images"] / r["seconds"], rel_tol=1e-9)
        assert math.isclose(r["per_model_images_per_s"] * r["n_models"], r["images_per_s"], rel_tol=1e-12)
        assert math.isfinite(r["mean_loss"]) and r["mean_loss"] > 0
    variants = written["variants"]
    assert variants["reference"]["ratio_to_reference"] == 1.0
    assert variants["paper"]["batch_per_model"] == 16 and variants["fast"]["batch_per_model"] == 256
    for name in ("streams", "batched"):  # the models in flight: run_chains' own path, 2 chains of batch 4
        assert variants[name]["n_models"] == 2 and variants[name]["batch_per_model"] == 4
    # On the CPU the bf16 profiles run in float32 (bf16 and channels_last are CUDA-only), and eagerly.
    for name in ("fast", "paper-bf16"):
        assert variants[name]["precision"] == "float32" and variants[name]["channels_last"] is False
    assert {r["capture"] for name, r in variants.items() if name != "reference"} == {"none"}


def test_grid_hours_follow_the_grid_and_the_measured_rates(benchmark_run):
    _, _, written, _ = benchmark_run
    rates = written["eval_images_per_s"]
    for name, r in written["variants"].items():
        grid = r["grid"]
        per_epoch = 44_800 if grid["profile"] == "fast" else 44_992  # 45,000 cut to whole batches of 256 / 16
        assert grid["profile"] == (name if name in ("paper", "paper-bf16", "fast") else "paper")
        assert grid["models"] == 212 and grid["epochs"] == 75
        assert grid["train_images"] == 212 * 75 * per_epoch
        assert math.isclose(grid["train_hours"], grid["train_images"] / r["images_per_s"] / 3600, rel_tol=1e-12)
        assert grid["evaluated_epochs"] == 15  # every 5th epoch (the 75th among them)
        assert grid["eval_images"] == 212 * 15 * 15_000
        assert math.isclose(grid["eval_hours"], grid["eval_images"] / rates["float32"] / 3600, rel_tol=1e-12)
        assert math.isclose(grid["total_hours"], grid["train_hours"] + grid["eval_hours"], rel_tol=1e-12)


def test_results_carry_provenance_and_settings(benchmark_run):
    _, _, written, _ = benchmark_run
    prov = written["provenance"]
    assert prov["torch"] and prov["device_name"] and prov["git_commit"]
    assert written["settings"]["chains"] == 2 and written["settings"]["variants"] == list(_load_benchmark().VARIANTS)
    assert written["data"]["sizes"]["train"] == 300 and written["command"].startswith("python benchmarks/")


@pytest.mark.parametrize("argv, message", [
    (["--variants", "reference,warp"], "unknown: warp"),
    (["--chains", "0"], "expected an integer >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--capture", "always"], "invalid choice: 'always'"),
    (["--ab-steps", "0"], "expected an integer >= 1"),
])
def test_bad_arguments_are_rejected_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        _load_benchmark().parse_args(argv)
    assert message in capsys.readouterr().err


def test_load_throughput_reads_the_written_file(benchmark_run, tmp_path):
    """book/reproduce_at_scale.md's table reader (a hidden cell of that page) on what the benchmark wrote."""
    load_throughput = page_functions(ROOT / "book" / "reproduce_at_scale.md", "load_throughput")["load_throughput"]
    _, _, written, out = benchmark_run
    table = load_throughput([out, out])
    assert len(table) == 2 * len(written["variants"])
    first = table.iloc[: len(written["variants"])]
    assert list(first["variant"]) == list(written["variants"])
    for row in first.itertuples():
        r = written["variants"][row.variant]
        assert row.images_per_s == r["images_per_s"] and row.grid_total_hours == r["grid"]["total_hours"]
        assert row.device == written["provenance"]["device_name"] and row.file == out.name
    with pytest.raises(FileNotFoundError, match="run benchmarks/train_throughput.py"):
        load_throughput(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text('{"benchmark": "krr"}')
    with pytest.raises(ValueError, match="not a result of benchmarks/train_throughput.py"):
        load_throughput(tmp_path / "other.json")
    with pytest.raises(ValueError, match="at least one"):
        load_throughput([])


def test_ab_trains_float32_and_bf16_from_the_same_start(tiny_cifar_root, tmp_path):
    """--ab on the CPU (bf16 by CPU autocast): both curves from the same first step, their gap tabulated."""
    out = tmp_path / "ab.json"
    written = _load_benchmark().main(["--data-root", str(tiny_cifar_root), "--out", str(out), "--device", "cpu",
                                      "--n-val", "100", "--ab", "--ab-steps", "3", "--ab-window", "2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(written))
    ab = written["ab"]
    assert len(ab["float32"]) == len(ab["bf16"]) == 3 and ab["bf16_on_device"] is False
    assert all(math.isfinite(v) and v > 0 for v in ab["float32"] + ab["bf16"])
    # Same initialization, teacher and batch: the first losses differ by bf16 rounding only, but they differ.
    assert ab["bf16"][0] != ab["float32"][0]
    assert math.isclose(ab["bf16"][0], ab["float32"][0], rel_tol=0.05)
    assert [w["steps"] for w in ab["windows"]] == ["1-2", "3-3"]
    first = ab["windows"][0]
    assert math.isclose(first["float32"], sum(ab["float32"][:2]) / 2, rel_tol=1e-12)
    assert math.isclose(first["gap"], first["bf16"] - first["float32"], rel_tol=1e-9)
    assert written["provenance"]["git_commit"] and written["benchmark"] == "train_throughput_ab"


def test_step_ops_counts_the_step_by_phase(tmp_path):
    """benchmarks/step_ops.py on two modes (batch 2: the counts do not depend on it), written with provenance."""
    spec = importlib.util.spec_from_file_location("step_ops", ROOT / "benchmarks" / "step_ops.py")
    step_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_ops)
    out = tmp_path / "ops.json"
    written = step_ops.main(["--modes", "paper-before,paper", "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(written))
    assert written["provenance"]["torch"] and written["benchmark"] == "step_ops"
    before, lean = written["modes"]["paper-before"], written["modes"]["paper"]
    for r in (before, lean):
        assert sum(r["by_phase"].values()) == r["ops_per_step"] == r["ops_per_model_step"]
        assert 0 < r["compute_ops_per_step"] < r["ops_per_step"]
    # The L2 term differentiated by autograd, one parameter tensor at a time, was most of the old backward.
    assert before["by_phase"]["backward"] > 161 * 4 > lean["by_phase"]["backward"]
    assert lean["by_phase"]["update"] <= 20 and lean["host_ops_per_step_when_captured"] == lean["by_phase"]["batch"]
    with pytest.raises(SystemExit):
        step_ops.parse_args(["--modes", "paper,warp"])
