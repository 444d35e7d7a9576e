"""The chains of a (seed, step) trained in flight give the records of one model at a time, on real images.

run_chains on the tiny real-image grid of tests/tiny.py, extended to 3 steps (so that the alpha-hat chain's
probe trains in flight with the fixed chains at step 3, while at step 2 the alpha = 0 chain is the probe), one
epoch per step, with ``chains_in_flight`` "off" (the reference), "streams" and "batched". The runs are in
float64 (the default dtype while this module runs: build_model, the static batch buffers, the loss and the
evaluation follow it), so that the batched network's grouped convolutions, which round differently from the
separate networks' dense ones, agree with them to ~1e-10 rather than to float32's 1e-7 amplified by Adam's
normalized steps; "streams" on the CPU runs exactly the ops of separate runs, so its records are equal bit
for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sdlib.chains import run_chains  # noqa: E402
from tiny import tiny_config  # noqa: E402

TIMING = ("wall_time_s", "images_per_s")
EXACT_ACROSS_MODES = ("seed", "chain", "step", "epochs", "profile", "config_hash", "data")


@pytest.fixture(scope="module")
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def data_root(tiny_cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("inflight_data") / "cifar10"
    shutil.copytree(tiny_cifar_root, root)
    return root


def _config(root, data_root, mode, **overrides):
    # 20 training images in 2 batches of 10, 20 validation and 20 test images: 8 models per run (probe included).
    return tiny_config(root, data_root, steps=3, epochs=1, subset=20, n_val=20, batch_size=10,
                       chains_in_flight=mode, **overrides)


def _run(tmp_path_factory, data_root, mode, keep_checkpoints=False):
    root = tmp_path_factory.mktemp(mode)
    config = _config(root, data_root, mode)
    events = []
    records = run_chains(config, progress=False, callback=events.append)
    if not keep_checkpoints:
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
    return config, records, events


@pytest.fixture(scope="module")
def one_at_a_time(float64, data_root, tmp_path_factory):
    config, records, events = _run(tmp_path_factory, data_root, "off", keep_checkpoints=True)
    yield config, records, events
    shutil.rmtree(config.checkpoint_dir, ignore_errors=True)


def _comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in TIMING and k != "provenance"}
    out["config"] = {k: v for k, v in record["config"].items() if k not in ("chains_in_flight", "results_dir",
                                                                             "checkpoint_dir")}
    return out


def test_streams_records_equal_one_at_a_time_exactly(one_at_a_time, data_root, tmp_path_factory):
    _, reference, reference_events = one_at_a_time
    _, records, events = _run(tmp_path_factory, data_root, "streams")
    assert [_comparable(r) for r in records] == [_comparable(r) for r in reference]
    # The same models were trained (the probe of step 3 among them), in flight: epoch events interleaved.
    trained = sorted(e["chain"] + str(e["step"]) for e in events if e["event"] == "step_end")
    assert trained == sorted(e["chain"] + str(e["step"]) for e in reference_events if e["event"] == "step_end")
    assert "alpha_hat_probe3" in trained
    ends = [(e["chain"], e["step"]) for e in events if e["event"] == "step_end"]
    # step 3: the fixed chains and the probe finish together, then the alpha-hat step
    assert ends[-4:] == [("alpha=0", 3), ("alpha=1", 3), ("alpha_hat_probe", 3), ("alpha_hat", 3)]
    # the three trained together share one training time: each event says so, and the command line's throughput
    # charges that time once (36.7 images/s for a run as fast as one at 86.0 with chains off, before)
    group = [e for e in events if e["event"] == "step_end"][-4:-1]
    assert [e["in_flight"] for e in group] == [3, 3, 3]
    assert [e["in_flight"] for e in events if e["event"] == "step_end"][-1] == 1
    assert len({e["train_time_s"] for e in group}) == 1
    assert [e["in_flight"] for e in reference_events if e["event"] == "step_end"] == [1] * len(trained)


def test_batched_records_equal_one_at_a_time_to_rounding(one_at_a_time, data_root, tmp_path_factory):
    _, reference, _ = one_at_a_time
    _, records, _ = _run(tmp_path_factory, data_root, "batched")
    assert len(records) == len(reference)
    for ours, theirs in zip(records, reference):
        a, b = _comparable(ours), _comparable(theirs)
        assert {k: a[k] for k in EXACT_ACROSS_MODES} == {k: b[k] for k in EXACT_ACROSS_MODES}
        assert a["config"] == b["config"]
        for field in ("val_acc", "test_acc", "probe_val_acc", "probe_test_acc"):  # counts of images: exact
            assert a[field] == b[field], (ours["chain"], ours["step"], field)
        for field in ("alpha", "alpha_hat", "val_loss", "test_loss", "train_loss"):
            if b[field] is None:
                assert a[field] is None
            else:  # float64 rounding of grouped vs dense convolutions, through one epoch of Adam steps
                assert math.isclose(a[field], b[field], rel_tol=1e-8, abs_tol=1e-10), \
                    (ours["chain"], ours["step"], field, a[field], b[field])


def test_interrupted_in_flight_group_resumes_to_the_same_records(one_at_a_time, data_root, tmp_path_factory):
    reference_config, reference, _ = one_at_a_time
    root = tmp_path_factory.mktemp("resume")
    config = _config(root, data_root, "streams")
    assert config.config_hash() == reference_config.config_hash()
    # Steps 1 and 2 as the reference left them (records, epochs, final weights hard-linked), step 3 to train.
    (root / "results").mkdir()
    for name in ("records.jsonl", "epochs.jsonl"):
        lines = (Path(reference_config.results_dir) / name).read_text().splitlines(keepends=True)
        (root / "results" / name).write_text("".join(line for line in lines if json.loads(line)["step"] < 3))
    source = Path(reference_config.checkpoint_dir)
    for path in source.rglob("step[12].pt"):
        target = root / "checkpoints" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)

    class Interrupt(Exception):
        pass

    def stop(event):  # the step-3 group has saved its first model's final weights and record, not the others'
        if (event["event"], event["chain"], event["step"]) == ("step_end", "alpha=0", 3):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_chains(config, progress=False, callback=stop)
    events = []
    records = run_chains(config, progress=False, callback=events.append)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    # Only what was left trains, in flight: alpha=1 and the probe of step 3, then the alpha-hat step.
    assert [(e["chain"], e["step"]) for e in events if e["event"] == "step_end"] == \
           [("alpha=1", 3), ("alpha_hat_probe", 3), ("alpha_hat", 3)]
    assert [_comparable(r) for r in records] == [_comparable(r) for r in reference]
