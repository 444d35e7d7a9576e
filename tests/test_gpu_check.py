"""benchmarks/gpu_check.sh: its argument handling, and a dry run of its Python parts on the CPU (tiny sizes, the
tiny real-image set): the profile of every mode, one throughput run, the summary of medians and aims."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sh(*args, env_extra=None, timeout=1200):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--warp"], "unknown argument '--warp'"),
    (["--repeats", "0"], "--repeats must be an integer >= 1, got '0'"),
    (["--repeats", "x"], "--repeats must be an integer >= 1, got 'x'"),
    (["--data-root", "/nonexistent/cifar", "--tarball", "/nonexistent/c.tar.xz"],
     "no CIFAR-10 under /nonexistent/cifar and no tarball at /nonexistent/c.tar.xz"),
])
def test_bad_arguments_stop_before_any_work(args, message, tmp_path):
    done = _sh(*args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_describes_the_check():
    done = _sh("--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout and "8 minutes" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["profile", "--out", "x.json", "--modes", "paper,warp"], "unknown: warp"),
    (["profile", "--out", "x.json", "--capture", "always"], "invalid choice"),
    (["summarize", "absent.json", "--out", "x.json"], "no such file(s): absent.json"),
    (["profile"], "--out"),
])
def test_python_part_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        _load("gpu_check").parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry_run(tiny_cifar_root, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("gpu_check_data") / "cifar10"
    shutil.copytree(tiny_cifar_root, data_root)
    out = tmp_path_factory.mktemp("gpu_check_out")
    done = _sh("--dry-run", "--repeats", "1", "--data-root", str(data_root), "--out", str(out),
               env_extra={"SDLIB_GIT_COMMIT": "0" * 40})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_dry_run_profiles_every_mode_and_summarizes(dry_run):
    out, done = dry_run
    profile = json.loads((out / "profile.json").read_text())
    assert list(profile["modes"]) == list(_load("gpu_check").MODES)
    for name, mode in profile["modes"].items():
        assert mode["wall_ms_per_step"] > 0 and mode["aten_ops_per_step"] > 0, name
        assert mode["kernels_per_step"] is None and mode["gpu_busy_fraction"] is None  # no CUDA here
        assert mode["capture"] == "none"
    assert profile["modes"]["streams"]["models"] == 2 and profile["modes"]["paper"]["models"] == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["benchmark"] == "gpu_check" and summary["profile"] == profile
    assert summary["provenance"]["git_commit"] == "0" * 40
    assert set(summary["variants"]) == {"reference", "paper", "streams", "batched"}  # fast: GPU run only
    assert set(summary["aims"]) == {"paper_per_model_vs_reference", "in_flight_aggregate_vs_reference"}
    assert "gpu_check: done" in done.stdout


def test_summary_takes_medians_and_ratios_of_the_runs(dry_run, tmp_path):
    out, _ = dry_run
    run = json.loads((out / "throughput_1.json").read_text())
    paths = []
    for k, factor in enumerate((1.0, 3.0, 2.0)):  # the same run at three speeds: the median is the 2x one
        scaled = copy.deepcopy(run)
        for r in scaled["variants"].values():
            r["images_per_s"] *= factor if r["n_models"] > 1 else 1.0
        paths.append(tmp_path / f"run{k}.json")
        paths[-1].write_text(json.dumps(scaled))
    summary = _load("gpu_check").main(["summarize", *map(str, paths), "--out", str(tmp_path / "s.json")])
    reference = run["variants"]["reference"]["images_per_s"]
    for name, v in summary["variants"].items():
        base = run["variants"][name]["images_per_s"]
        factor = 2.0 if v["n_models"] > 1 else 1.0
        assert v["median_images_per_s"] == pytest.approx(statistics.median([base * f for f in (1, 3, 2)])
                                                         if factor == 2.0 else base)
        assert v["median_images_per_s"] == pytest.approx(base * factor)
        assert v["ratio_to_reference"] == pytest.approx(base * factor / reference)
        assert v["median_per_model_images_per_s"] == pytest.approx(base * factor / v["n_models"])
    aims = summary["aims"]
    assert aims["in_flight_aggregate_vs_reference"]["value"] == pytest.approx(
        max(summary["variants"][k]["ratio_to_reference"] for k in ("streams", "batched")))  # as dry-run ran
    assert aims["paper_per_model_vs_reference"]["met"] == (aims["paper_per_model_vs_reference"]["value"] >= 10)
    (tmp_path / "other.json").write_text('{"benchmark": "krr"}')
    with pytest.raises(ValueError, match="not a result of benchmarks/train_throughput.py"):
        _load("gpu_check").summarize([tmp_path / "other.json"], None)
