"""The three training protocols (the profiles in sdlib.config, compared by the helpers of book/reproduce_cifar10.md),
torch-free where the book needs it: the comparison table against the profiles, the committed teacher-BatchNorm
measurement and the benchmark that writes it (on real images), the profiles' sweep files, and the book pages that
list the profiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

from types import SimpleNamespace

import pytest

from pages import page_functions, run_without_torch
from sdlib.config import PROFILES, TrainConfig

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "book" / "reproduce_cifar10.md"
# the page's own helpers (a hidden cell): protocol_table, teacher_bn_effect, PROTOCOLS, TEACHER_BN_RESULTS
protocols = SimpleNamespace(**page_functions(PAGE, "protocol_table", "teacher_bn_effect"))


def test_protocol_table_is_read_from_the_profiles():
    table = protocols.protocol_table()
    assert list(table.columns) == ["official", "paper", "fast", "cpu", "differs"]
    cpu = TrainConfig.from_profile("cpu")
    assert table.loc["training images", "cpu"] == cpu.subset == 10_000
    assert table.loc["validation images (held out)", "cpu"] == cpu.n_val == 5_000
    assert table.loc["network", "cpu"].startswith("cnn4") and table.loc["network", "paper"].startswith("ResNet-50")
    assert table.loc["precision", "cpu"] == "bf16 autocast (CUDA, or a CPU with native bf16)"
    for name in ("official", "paper", "fast"):
        config = TrainConfig.from_profile(name)
        column = table[name]
        assert column["epochs per step"] == config.epochs and column["batch size"] == config.batch_size
        assert column["training images"] == 50_000 - config.n_val
        assert column["validation images (held out)"] == config.n_val
        assert column["teacher BatchNorm"].startswith(config.teacher_bn + ":")
        assert column["alpha-hat chain (Algorithm 1)"] == ("yes" if config.include_alpha_hat else "no")
        assert f"{config.lr:g}" in column["optimizer"] and column["learning-rate schedule"].startswith(config.lr_schedule)
    assert table.loc["training images", "official"] == 50_000 and table.loc["training images", "paper"] == 45_000
    assert table.loc["data order", "official"] == "one permutation for every epoch and step"
    assert table.loc["alpha-hat bounds", "paper"] == "none (all reals)"
    assert table.loc["alpha-hat bounds", "fast"] == "[0, 1]"
    assert table.loc["alpha-hat bounds", "official"] == "(no alpha-hat chain)"
    # the rows where the official and the paper protocols agree are exactly the ones the issue found matching
    agree = table.index[table["official"].astype(str) == table["paper"].astype(str)]
    assert set(agree) == {"network", "epochs per step", "batch size", "optimizer", "learning-rate schedule",
                          "precision"}
    assert table.loc["epochs per step", "differs"] and table.loc["teacher BatchNorm", "differs"]  # cpu: 20 epochs
    assert not protocols.protocol_table(("official", "paper")).loc["epochs per step", "differs"]
    assert list(protocols.protocol_table(("fast",)).columns) == ["fast", "differs"]
    with pytest.raises(ValueError, match="profiles must be names from"):
        protocols.protocol_table(("paper", "turbo"))


def test_config_and_protocols_import_without_torch():
    """The book's environment has no torch: config (PROFILES, TrainConfig, config_hash) and the page's protocol
    helpers import and compute the same hashes without it."""
    printed = run_without_torch(
        "from pages import page_functions\n"
        "from sdlib.config import TrainConfig\n"
        f"page = page_functions({str(PAGE)!r}, 'protocol_table', 'teacher_bn_effect')\n"
        "page['protocol_table'](); page['teacher_bn_effect']()\n"
        "print(' '.join(TrainConfig.from_profile(p, device='cpu').config_hash() for p in page['PROTOCOLS']))\n")
    assert printed.split() == [TrainConfig.from_profile(p, device="cpu").config_hash() for p in protocols.PROTOCOLS]


def _check_effect(frame, run: dict):
    assert list(frame.index) == list(run["results"]) == ["test", "targets"]
    for name, row in frame.iterrows():
        measured = run["results"][name]
        assert row["images"] == measured["images"] and row["images"] > 0
        assert row["mean_abs_diff"] == measured["mean_abs_diff"] and 0 < row["mean_abs_diff"] <= row["max_abs_diff"]
        # total variation per image = half the sum over the 10 classes of |p_train - p_eval|
        assert math.isclose(row["mean_total_variation"], 5 * row["mean_abs_diff"], rel_tol=1e-5)
        for column in ("argmax_agreement", "accuracy_eval", "accuracy_train", "max_abs_diff"):
            assert 0.0 <= row[column] <= 1.0
        # agreement counts whole images
        assert math.isclose(row["argmax_agreement"] * row["images"], round(row["argmax_agreement"] * row["images"]),
                            abs_tol=1e-3)  # a float32 mean
    assert {"git_commit", "device_name", "torch", "date"} <= set(frame.attrs["provenance"])
    last = run["teacher"]["epochs"][-1]
    assert (frame["teacher_epochs"] == last["epoch"]).all() and (frame["teacher_test_acc"] == last["test_acc"]).all()


def test_committed_teacher_bn_measurement():
    path = REPO / protocols.TEACHER_BN_RESULTS
    run = json.loads(path.read_text())
    frame = protocols.teacher_bn_effect()
    _check_effect(frame, run)
    settings = frame.attrs["settings"]
    assert settings["batch_size"] == 16 and settings["epochs"] >= 1 and settings["train_images_used"] >= 1000
    assert len(frame.attrs["teacher"]["epochs"]) == settings["epochs"]
    assert frame.attrs["provenance"]["git_dirty"] is False and len(frame.attrs["provenance"]["git_commit"]) == 40
    assert "/" not in json.dumps(settings)  # no machine path in the committed settings
    with pytest.raises(FileNotFoundError, match="benchmarks/teacher_bn.py"):
        protocols.teacher_bn_effect(REPO / "no_such_file.json")


def test_teacher_bn_benchmark_on_real_images(tiny_cifar_root, tmp_path):
    pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("teacher_bn", REPO / "benchmarks" / "teacher_bn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "teacher_bn.json"
    returned = bench.main(["--data-root", str(tiny_cifar_root), "--out", str(out), "--train-images", "40",
                           "--test-images", "32", "--epochs", "1", "--batch-size", "8"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["results"]["test"]["images"] == 32 and written["results"]["targets"]["images"] == 40
    _check_effect(protocols.teacher_bn_effect(out), written)


def test_every_profile_has_a_sweep_file_and_the_book_lists_it():
    pytest.importorskip("torch")  # load_sweep_config builds the config through sdlib.train
    from sdlib import sweep

    by_profile = {}
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        config, options = sweep.load_sweep_config(path)
        by_profile.setdefault(config.profile, []).append(path.name)
    assert set(by_profile) == set(protocols.PROTOCOLS)
    # every profile is a protocol but paper-bf16: the paper profile in bf16 autocast and channels_last (no sweep
    # file of its own; benchmarks/train_throughput.py --ab compares it with the paper profile)
    assert set(PROFILES) - set(protocols.PROTOCOLS) == {"paper-bf16"}
    assert PROFILES["paper-bf16"] == {**PROFILES["paper"], "bf16": True, "channels_last": True}
    official, options = sweep.load_sweep_config(REPO / "sweeps" / "official-slurm.yaml")
    assert (official.teacher_bn, official.n_val, official.data_order, official.include_alpha_hat) == \
           ("train", 0, "fixed", False)
    assert len(sweep.job_configs(official)) == 4 * (1 + 11) and options["executor"] == "slurm"
    assert not official.results_dir.startswith("results/cifar10/")  # never the committed results
    scale = (REPO / "book" / "reproduce_at_scale.md").read_text()
    reproduce = (REPO / "book" / "reproduce_cifar10.md").read_text()
    assert "protocol_table(tuple(PROFILES))" in reproduce  # the profile table, computed
    for profile, files in by_profile.items():
        assert all(name in scale for name in files), files
        assert f"`{profile}` " in reproduce, profile  # and each profile said in words
