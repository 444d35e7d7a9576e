"""The command line of sdlib.train: every option explained with its default, and --dry-run (no training, no
files), on tiny real images where data are needed."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from sdlib import train  # noqa: E402
from sdlib.chains import grid_cost  # noqa: E402
from sdlib.config import field_docs  # noqa: E402
from sdlib.train import TrainConfig, main  # noqa: E402


def test_every_option_has_help_with_its_default():
    """Old: 14 of the 23 options had no help text or shown default."""
    parser = train._parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 27
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"
        assert re.search(r"\(default: [^)]+\)|default: ", action.help), f"{action.option_strings}: no default shown"
    text = " ".join(parser.format_help().split())
    assert "runs/cifar10" in text and "the committed results/cifar10 only when named here" in text


def test_every_field_is_an_option_explained_by_its_docstring():
    """The options are generated from TrainConfig: one per field (booleans with --no-), its help the field's
    docstring and each profile's default."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(field_docs()) == sorted(fields)
    actions = {a.dest: a for a in train._parser()._actions}
    for name in fields:
        assert actions[name].help.startswith(field_docs()[name]), name
    assert actions["epochs"].help == ("epochs per step (default: the profile's, paper 75, official 75, fast 75, "
                                      "paper-bf16 75, cpu 20)")
    assert {"--no-alpha-hat", "--no-bf16", "--no-channels-last", "--download"} <= set(
        actions["include_alpha_hat"].option_strings + actions["bf16"].option_strings
        + actions["channels_last"].option_strings + actions["download"].option_strings)


def test_dry_run_prints_config_pending_tasks_and_cost_and_writes_nothing(tmp_path, tiny_cifar_root, capsys):
    data_root = tmp_path / "cifar10"
    shutil.copytree(tiny_cifar_root, data_root, ignore=shutil.ignore_patterns(".sdlib_cache"))
    argv = ["--epochs", "2", "--seeds", "0", "1", "--steps", "2", "--alphas", "0,1", "--subset", "64", "--n-val", "40",
            "--batch-size", "32", "--data-root", str(data_root), "--results-dir", str(tmp_path / "r"),
            "--checkpoint-dir", str(tmp_path / "c"), "--device", "cpu", "--dry-run"]
    assert main(argv) == []
    out = capsys.readouterr().out
    config = TrainConfig.from_profile("paper", epochs=2, seeds=(0, 1), steps=2, alphas=(0.0, 1.0), subset=64,
                                      n_val=40, batch_size=32, data_root=str(data_root),
                                      results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"),
                                      device="cpu")
    assert f"config_hash: {config.config_hash()}" in out
    assert "  batch_size: 32" in out and "  bf16: False" in out
    assert "pending: 8 of 8 (seed, chain, step)" in out and "  seed 1, alpha_hat, step 2" in out
    assert f"grid cost: 8 sweep jobs; {grid_cost(config)['formula']}" in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
    assert not (data_root / ".sdlib_cache").exists()  # nothing decoded either


def test_dry_run_fingerprints_the_data_once(tmp_path, tiny_cifar_root, capsys, monkeypatch):
    """A fingerprint lists and stats every image (0.2 s for CIFAR-10): the dry run takes one, for the config it
    shows, its hash, the pending steps and the "no data" note alike (it took three)."""
    from sdlib import data

    calls = []
    fingerprint = data.data_fingerprint
    monkeypatch.setattr(data, "data_fingerprint", lambda root: calls.append(root) or fingerprint(root))
    main(["--data-root", str(tiny_cifar_root), "--results-dir", str(tmp_path / "r"), "--checkpoint-dir",
          str(tmp_path / "c"), "--device", "cpu", "--dry-run"])
    out = capsys.readouterr().out
    assert calls == [str(tiny_cifar_root)], calls
    assert f"  data_fingerprint: {fingerprint(tiny_cifar_root)}" in out and "no data under" not in out
    config = TrainConfig.from_profile("paper", data_root=str(tiny_cifar_root), results_dir=str(tmp_path / "r"),
                                      checkpoint_dir=str(tmp_path / "c"), device="cpu")
    assert f"config_hash: {config.config_hash()}\n" in out and "pending: 196 of 196" in out


def test_dry_run_without_data_says_so(tmp_path, capsys):
    main(["--data-root", str(tmp_path / "none"), "--results-dir", str(tmp_path / "r"), "--dry-run", "--device",
          "cpu"])
    out = capsys.readouterr().out
    assert f"(no data under {tmp_path / 'none'}: a run would stop)" in out
    assert "pending: 196 of 196" in out  # the paper's grid: 4 seeds x (step 1 + 12 chains x steps 2..5)
    assert not Path(tmp_path / "r").exists()
