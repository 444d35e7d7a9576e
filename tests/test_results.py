"""sdlib.results: loading, the step-1 expansion, aggregation over seeds and the book's figure style, checked against
a hand computation on a synthetic records.jsonl written here; and the runs table of book/reproduce_at_scale.md,
read from such records. (Chapter 5's own figures are tested in tests/test_cifar_notebook.py.)"""

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pages import page_functions, run_without_torch  # noqa: E402
from sdlib import results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SEEDS = (0, 1, 2)
FIXED_ALPHAS = (0.0, 0.5, 1.0)
CHAINS = ("alpha=0", "alpha=0.5", "alpha=1", "alpha_hat")
STEPS = (2, 3, 4)


def synthetic_records(seed=0):
    """Records as sdlib.train writes them: one shared step-1 record per seed, then steps 2.. per chain."""
    rng = np.random.default_rng(seed)
    config = {"alphas": list(FIXED_ALPHAS), "include_alpha_hat": True, "steps": max(STEPS), "profile": "paper"}
    records = []
    for s in SEEDS:
        records.append({
            "seed": s, "chain": "shared", "step": 1, "alpha": 1.0, "alpha_hat": None,
            "probe_val_acc": None, "probe_test_acc": None, "epochs": 3,
            "val_acc": round(float(rng.uniform(0.6, 0.9)), 4), "test_acc": round(float(rng.uniform(0.6, 0.9)), 4),
            "val_loss": 0.02, "test_loss": 0.02, "train_loss": 0.01, "wall_time_s": 1.0, "images_per_s": 100.0,
            "profile": "paper", "config_hash": "abc", "config": config, "provenance": {"torch": "x"}, "data": {},
        })
        for chain in CHAINS:
            for step in STEPS:
                alpha_hat = round(float(rng.uniform(0, 1)), 4) if chain == "alpha_hat" else None
                records.append({
                    "seed": s, "chain": chain, "step": step,
                    "alpha": alpha_hat if chain == "alpha_hat" else float(chain.split("=")[1]),
                    "alpha_hat": alpha_hat,
                    "probe_val_acc": 0.5 if chain == "alpha_hat" else None,
                    "probe_test_acc": 0.5 if chain == "alpha_hat" else None,
                    "epochs": 3,
                    "val_acc": round(float(rng.uniform(0.6, 0.9)), 4),
                    "test_acc": round(float(rng.uniform(0.6, 0.9)), 4),
                    "val_loss": 0.02, "test_loss": 0.02, "train_loss": 0.01, "wall_time_s": 1.0,
                    "images_per_s": 100.0, "profile": "paper", "config_hash": "abc", "config": config,
                    "provenance": {"torch": "x"}, "data": {},
                })
    rng.shuffle(records)  # the reader must not depend on the order of the lines
    return records


def write_jsonl(directory, objects, name="records.jsonl"):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w", encoding="utf-8") as handle:
        for obj in objects:
            handle.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return directory


def by_hand(records):
    """(chain, step) -> list of raw records of the seeds, with each seed's shared record as step 1."""
    table = {}
    shared = {r["seed"]: r for r in records if r["chain"] == "shared"}
    for r in records:
        if r["chain"] != "shared":
            table.setdefault((r["chain"], r["step"]), []).append(r)
    for chain in CHAINS:
        table[(chain, 1)] = [shared[s] for s in SEEDS]
    return table


@pytest.fixture
def records_dir(tmp_path):
    records = synthetic_records()
    return write_jsonl(tmp_path / "results", records), records


def test_load_records_expands_the_shared_step_into_every_chain(records_dir):
    directory, raw = records_dir
    df = results.load_records(directory)
    assert "shared" not in set(df["chain"])
    assert len(df) == len(SEEDS) * len(CHAINS) * (1 + len(STEPS))
    assert list(df["chain"].unique()) == list(CHAINS)  # fixed alphas ascending, then alpha-hat
    shared = {r["seed"]: r for r in raw if r["chain"] == "shared"}
    step1 = df[df["step"] == 1]
    assert len(step1) == len(SEEDS) * len(CHAINS)
    assert step1["from_shared"].all() and not df[df["step"] > 1]["from_shared"].any()
    for _, row in step1.iterrows():
        assert row["test_acc"] == shared[row["seed"]]["test_acc"]
        assert row["val_acc"] == shared[row["seed"]]["val_acc"]
        assert row["alpha"] == 1.0 and math.isnan(row["alpha_hat"])
    # every (seed, chain, step) once, with the values written
    raw_by_key = {(r["seed"], r["chain"], r["step"]): r for r in raw}
    assert not df.duplicated(["seed", "chain", "step"]).any()
    for _, row in df[df["step"] > 1].iterrows():
        original = raw_by_key[(row["seed"], row["chain"], row["step"])]
        assert row["test_acc"] == original["test_acc"] and row["alpha"] == original["alpha"]
    assert df.loc[df["chain"] == "alpha=0.5", "chain_alpha"].eq(0.5).all()
    assert df.loc[df["chain"] == "alpha_hat", "chain_alpha"].isna().all()


def test_shared_record_alone_expands_into_the_configured_chains(tmp_path):
    # A seed whose chains have not run yet still shows its step-1 model in every configured chain.
    shared = {"seed": 7, "chain": "shared", "step": 1, "alpha": 1.0, "val_acc": 0.5, "test_acc": 0.4,
              "config": {"alphas": [0.0, 0.25], "include_alpha_hat": True}}
    df = results.load_records(write_jsonl(tmp_path / "r", [shared]))
    assert sorted(df["chain"]) == sorted(["alpha=0", "alpha=0.25", "alpha_hat"])
    assert (df["step"] == 1).all() and (df["test_acc"] == 0.4).all()
    # optional fields absent from the file come back as NaN / None
    assert df["alpha_hat"].isna().all() and df["wall_time_s"].isna().all()


def test_summarize_matches_a_hand_computation(records_dir):
    directory, raw = records_dir
    summary = results.summarize(results.load_records(directory))
    table = by_hand(raw)
    assert len(summary) == len(table)
    assert list(summary["chain"].unique()) == list(CHAINS)
    for _, row in summary.iterrows():
        group = table[(row["chain"], row["step"])]
        test = [r["test_acc"] for r in group]
        val = [r["val_acc"] for r in group]
        assert row["n_seeds"] == len(SEEDS)
        assert row["test_acc_mean"] == pytest.approx(statistics.fmean(test), abs=1e-12)
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(test), abs=1e-12)
        assert row["test_acc_min"] == min(test) and row["test_acc_max"] == max(test)
        assert row["val_acc_mean"] == pytest.approx(statistics.fmean(val), abs=1e-12)
        assert row["val_acc_std"] == pytest.approx(statistics.stdev(val), abs=1e-12)
        assert row["val_acc_min"] == min(val) and row["val_acc_max"] == max(val)
        if row["chain"] == "alpha_hat" and row["step"] >= 2:
            hats = [r["alpha_hat"] for r in group]
            assert row["alpha_hat_mean"] == pytest.approx(statistics.fmean(hats), abs=1e-12)
            assert row["alpha_hat_std"] == pytest.approx(statistics.stdev(hats), abs=1e-12)
        else:
            assert math.isnan(row["alpha_hat_mean"]) and math.isnan(row["alpha_hat_std"])
    population = results.summarize(results.load_records(directory), ddof=0)
    group = table[("alpha=0.5", 3)]
    row = population[(population["chain"] == "alpha=0.5") & (population["step"] == 3)].iloc[0]
    assert row["test_acc_std"] == pytest.approx(statistics.pstdev([r["test_acc"] for r in group]), abs=1e-12)
    with pytest.raises(ValueError, match="ddof"):
        results.summarize(results.load_records(directory), ddof=2)


def test_summarize_single_seed_has_nan_std_and_uneven_seeds_count(tmp_path):
    raw = [r for r in synthetic_records() if r["seed"] == 0 or (r["seed"] == 1 and r["step"] <= 2)]
    summary = results.summarize(results.load_records(write_jsonl(tmp_path / "r", raw)))
    at3 = summary[summary["step"] == 3]
    assert (at3["n_seeds"] == 1).all() and at3["test_acc_std"].isna().all()
    assert (summary[summary["step"] <= 2]["n_seeds"] == 2).all()


def epoch_lines():
    """Two seeds' epochs of the shared step 1, alpha=0 at steps 2 and 3 and alpha-hat at step 2."""
    lines = []
    for seed in (0, 1):
        for chain, step in (("shared", 1), ("alpha=0", 2), ("alpha=0", 3), ("alpha_hat", 2)):
            for epoch in (1, 2):
                lines.append({"seed": seed, "chain": chain, "step": step, "epoch": epoch, "train_loss": 0.1,
                              "val_acc": 0.1 * step + 0.01 * epoch + 0.001 * seed, "val_loss": 0.0,
                              "test_acc": 0.1 * step + 0.02 * epoch, "test_loss": 0.0, "lr": 1e-4,
                              "wall_time_s": 1.0, "images_per_s": 10.0})
    return lines


def test_load_epochs_keeps_the_last_line_of_an_epoch(tmp_path):
    lines = epoch_lines()
    # a resumed step rewrites an epoch: the later line counts
    lines.append({**lines[0], "test_acc": 0.9})
    epochs = results.load_epochs(write_jsonl(tmp_path / "r", lines, name="epochs.jsonl"))
    assert len(epochs) == len(lines) - 1
    first = epochs[(epochs["seed"] == 0) & (epochs["chain"] == "shared") & (epochs["epoch"] == 1)]
    assert first["test_acc"].tolist() == [0.9]
    with pytest.raises(FileNotFoundError, match="epochs.jsonl"):
        results.load_epochs(tmp_path / "nothing")


GOOD = {"seed": 0, "chain": "alpha=0", "step": 2, "alpha": 0.0, "val_acc": 0.5, "test_acc": 0.5}


@pytest.mark.parametrize(
    "lines, error, match",
    [
        ([], ValueError, "empty"),
        (["", "   "], ValueError, "empty"),
        ([GOOD, "{not json"], ValueError, "line 2: not valid JSON"),
        (["[1, 2]"], ValueError, "expected a JSON object"),
        ([{k: v for k, v in GOOD.items() if k != "test_acc"}], ValueError, "test_acc"),
        ([{**GOOD, "test_acc": 93.1}], ValueError, r"fraction in \[0, 1\]"),
        ([{**GOOD, "test_acc": None}], ValueError, "test_acc"),  # (val_acc may be null: n_val = 0)
        ([{**GOOD, "val_acc": 2.0}], ValueError, "val_acc"),
        ([{**GOOD, "best_test_acc": 85.0}], ValueError, "best_test_acc"),
        ([{**GOOD, "step": 0}], ValueError, "step"),
        ([{**GOOD, "seed": "a"}], ValueError, "seed"),
        ([{**GOOD, "chain": "alpha=zero"}], ValueError, "chain"),
        ([{**GOOD, "chain": "teacher"}], ValueError, "chain"),
        ([{**GOOD, "step": 1}], ValueError, "shared"),
        ([{**GOOD, "chain": "shared", "step": 2}], ValueError, "step-1"),
        ([{**GOOD, "alpha_hat": "high"}], ValueError, "alpha_hat"),
        ([{**GOOD, "chain": "alpha_hat_probe"}], ValueError, "no records"),
        ([{**GOOD, "epochs": 2.5}], ValueError, "epochs"),
    ],
)
def test_malformed_records_raise(tmp_path, lines, error, match):
    directory = write_jsonl(tmp_path / "r", lines)
    with pytest.raises(error, match=match):
        results.load_records(directory)


def test_missing_results_dir_raises_and_says_how_to_produce(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train=True"):
        results.load_records(tmp_path / "absent")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no records.jsonl.*sdlib.train"):
        results.load_records(tmp_path / "empty_dir")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="must be a directory"):
        results.load_records(tmp_path / "a_file")
    with pytest.raises(ValueError, match="results_dir"):
        results.load_records(None)
    assert not results.has_records(tmp_path / "absent")
    assert not results.has_records(tmp_path / "empty_dir")
    write_jsonl(tmp_path / "blank", ["", ""])
    assert not results.has_records(tmp_path / "blank")
    assert results.has_records(write_jsonl(tmp_path / "one", [GOOD]))
    message = results.no_results_message(tmp_path / "absent")
    assert message.startswith(f"No results committed yet under {tmp_path / 'absent'}: run ")
    assert "train=True" in message and "python -m sdlib.train" in message


def test_aggregation_input_checks():
    with pytest.raises(ValueError, match="load_records"):
        results.summarize({"test_acc": [0.5]})
    with pytest.raises(ValueError, match="load_records"):
        results.summarize(results.pd.DataFrame({"x": [1]}))


def test_chain_names_round_trip():
    for alpha in (0.0, 0.1, 0.25, 1.0):
        assert results.chain_alpha(results.chain_name(alpha)) == alpha
    assert results.chain_name(0.1) == "alpha=0.1" and results.chain_name(0) == "alpha=0"
    assert results.chain_name(None) == "alpha_hat" and math.isnan(results.chain_alpha("alpha_hat"))
    with pytest.raises(ValueError, match="chain"):
        results.chain_alpha("beta=1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        results.chain_alpha("alpha=1.5")


def test_paths_resolve_against_the_repository_root(tmp_path):
    root = Path(__file__).resolve().parent.parent
    assert results.find_repo_root(root / "notebooks") == root
    assert results.resolve_repo_path("results/cifar10", root=root) == root / "results" / "cifar10"
    assert results.resolve_repo_path(tmp_path) == tmp_path
    assert results.no_results_message(root / "results" / "cifar10").startswith(
        "No results committed yet under results/cifar10: run")
    with pytest.raises(ValueError, match="path"):
        results.resolve_repo_path("")


def test_results_module_needs_no_torch(records_dir):
    # The book plots committed results on machines without torch: block it and use the whole API.
    directory, _ = records_dir
    run_without_torch("from sdlib import results as r\n"
                      f"df = r.load_records({str(directory)!r}); r.summarize(df); r.book_figures()")


def test_config_hash_selects_one_configuration_and_mixed_files_warn(tmp_path):
    old = [{**r, "config_hash": "old", "test_acc": 0.1, "profile": "fast"} for r in synthetic_records()
           if r["seed"] == 0]
    new = [r for r in synthetic_records() if r["seed"] != 0]  # config_hash "abc", profile "paper"
    directory = write_jsonl(tmp_path / "r", old + new)
    # a folder of two configs: the newest (appended last) is read, and the warning names both
    with pytest.warns(RuntimeWarning, match=r"holds 2 configs \(newest first: abc \(profile paper.*old \(profile "
                                            r"fast.*reading the newest, abc"):
        newest = results.load_records(directory)
    assert set(newest["seed"]) == set(SEEDS) - {0} and (newest["config_hash"] == "abc").all()
    kept = results.load_records(directory, config_hash="abc")
    assert set(kept["seed"]) == set(SEEDS) - {0} and (kept["config_hash"] == "abc").all()
    only_old = results.load_records(directory, config_hash="old")
    assert set(only_old["seed"]) == {0} and (only_old["test_acc"] == 0.1).all()
    assert len(only_old) == len(CHAINS) * (1 + len(STEPS))
    with pytest.warns(RuntimeWarning, match="reading the newest of profile 'fast', old"):
        by_profile = results.load_records(directory, profile="fast")
    assert by_profile.equals(only_old)
    with pytest.raises(ValueError, match=r"config_hash 'nope' has no lines in .*present \(newest first\): abc "
                                         r"\(profile paper, 26 line\(s\)\); old \(profile fast"):
        results.load_records(directory, config_hash="nope")
    with pytest.raises(ValueError, match="profile 'official' has no lines"):
        results.load_records(directory, profile="official")


def test_a_key_recorded_twice_reads_as_its_last_line(tmp_path):
    """A step re-recorded after a crash (append-only store): one row, the last line's values."""
    first = synthetic_records()
    again = {**first[3], "test_acc": 0.99}
    directory = write_jsonl(tmp_path / "r", first + [again])
    records = results.load_records(directory)
    key = (again["seed"], again["chain"], again["step"])
    rows = records[(records["seed"] == key[0]) & (records["chain"] == key[1]) & (records["step"] == key[2])
                   & ~records["from_shared"]]
    assert len(rows) == 1 and rows["test_acc"].item() == 0.99
    assert len(records) == len(results.load_records(write_jsonl(tmp_path / "once", first)))


def test_load_epochs_reads_the_probes_on_request(tmp_path):
    probe = {"seed": 0, "chain": "alpha_hat_probe", "step": 3, "epoch": 1, "test_acc": 0.3, "config_hash": "h"}
    directory = write_jsonl(tmp_path / "r", [probe], name="probe_epochs.jsonl")
    probes = results.load_epochs(directory, probes=True)
    assert probes[["chain", "step", "test_acc", "config_hash"]].values.tolist() == [["alpha_hat_probe", 3, 0.3, "h"]]
    with pytest.raises(FileNotFoundError, match="no epochs.jsonl"):
        results.load_epochs(directory)
    with pytest.raises(ValueError, match="probes"):
        results.load_epochs(directory, probes="yes")


def training_runs(*args, **kwargs):
    """book/reproduce_at_scale.md's own helper (a hidden cell of that page)."""
    return page_functions(REPO / "book" / "reproduce_at_scale.md", "training_runs")["training_runs"](*args, **kwargs)


def _timed_record(seed, chain, step, end, wall, epochs=2):
    alpha = {"shared": 1.0, "alpha=0": 0.0}.get(chain, 0.7)
    return {"seed": seed, "chain": chain, "step": step, "alpha": alpha, "val_acc": 0.5, "test_acc": 0.5,
            "alpha_hat": 0.7 if chain == "alpha_hat" else None, "epochs": epochs, "wall_time_s": wall,
            "config_hash": "abc", "config": {"batch_size": 4, "alphas": [0.0], "include_alpha_hat": True},
            "data": {"sizes": {"train": 10, "val": 5, "test": 5}},
            "provenance": {"date": f"2026-01-01T{end}+00:00", "device_name": "GPU X"}}


def test_training_runs_group_overlapping_models_and_count_the_probes(tmp_path):
    records = [
        _timed_record(0, "shared", 1, "10:00:10", 10.0),         # [10:00:00, 10:00:10]
        _timed_record(0, "alpha=0", 2, "10:00:30", 15.0),        # [10:00:15, 10:00:30]: 5 s after
        _timed_record(0, "alpha_hat", 2, "10:00:50", 10.0),      # + its 10 s probe: [10:00:30, 10:00:50]
        _timed_record(1, "shared", 1, "11:00:10", 10.0),         # an hour later: a second run
        _timed_record(1, "alpha=0", 2, "11:00:15", 12.0),        # overlaps it: run side by side
    ]
    write_jsonl(tmp_path, records)
    probe_epochs = [{"seed": 0, "chain": "alpha_hat_probe", "step": 2, "epoch": e, "wall_time_s": 5.0,
                     "val_acc": 0.4, "test_acc": 0.4} for e in (1, 2)]
    write_jsonl(tmp_path, probe_epochs, name="probe_epochs.jsonl")
    runs = training_runs(tmp_path)
    assert list(runs["run"]) == [1, 2]
    first, second = runs.iloc[0], runs.iloc[1]
    # 8 images per epoch (10 training images cut to whole batches of 4); 2 epochs per model.
    assert first["seeds"] == (0,) and first["models"] == 4 and first["train_images"] == 4 * 2 * 8
    assert first["wall_clock_s"] == 50.0 and first["images_per_s"] == 64 / 50
    assert first["model_seconds"] == 10 + 15 + 10 + 10
    assert second["seeds"] == (1,) and second["models"] == 2 and second["wall_clock_s"] == 15.0
    assert second["model_seconds"] == 22.0 and second["devices"] == ("GPU X",)
    # A smaller tolerance splits the first run at its 5 s gap.
    strict = training_runs(tmp_path, max_gap_s=1.0)
    assert list(strict["models"]) == [1, 3, 2] and list(strict["wall_clock_s"]) == [10.0, 35.0, 15.0]
    with pytest.raises(ValueError, match="max_gap_s must be a number of seconds >= 0"):
        training_runs(tmp_path, max_gap_s=-1)


def test_training_runs_need_dated_records(records_dir):
    with pytest.raises(ValueError, match="provenance.date and wall_time_s"):
        training_runs(records_dir[0])


def test_the_readers_need_only_the_core_dependencies():
    """Old: sdlib.results imported pandas, which only the notebooks extra installed (`pip install -e .` then
    failed on import). Every module-level import of the torch-free modules is the standard library's or a core
    dependency of pyproject.toml; and they do not import torch."""
    import ast
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    core = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in pyproject["project"]["dependencies"]}
    for module in ("results", "store", "records"):
        tree = ast.parse((REPO / "sdlib" / f"{module}.py").read_text())
        for node in tree.body:  # module level only: imports inside functions are optional
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in core or top in ("sdlib", "__future__"), \
                    f"sdlib/{module}.py imports {top}, which is not a core dependency"
    code = "import sys, sdlib.results, sdlib.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_license_and_citation():
    import tomllib

    import yaml

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT" and citation["type"] == "software"
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("Even your Teacher Needs Guidance") and paper["year"] == 2021
    assert [a["family-names"] for a in paper["authors"]] == ["Borup", "Andersen"]


def test_book_png_records_width_only_and_the_smallest_font():
    """The book's figures: a PNG at twice the resolution, its display width as the only size (a fixed height would
    squash it on a narrow column), and the smallest font drawn and the resolution recorded in the PNG."""
    from io import BytesIO

    from PIL import Image

    fig, ax = plt.subplots(figsize=(results.FIGURE_WIDTH_IN, 3.0), dpi=results.FIGURE_DPI)
    ax.plot([0, 1], [0, 2])
    ax.tick_params(labelsize=13)
    ax.set_xlabel("x", fontsize=14)
    ax.set_title("title", fontsize=15)
    ax.text(0.5, 1.0, "annotation", fontsize=12.5)
    ax.text(0.2, 0.2, "hidden", fontsize=3).set_visible(False)  # not drawn, not counted
    ax.text(0.3, 0.3, " ", fontsize=4)  # nothing to read
    data, metadata = results.book_png(fig)
    plt.close(fig)
    assert set(metadata) == {"width"}
    with Image.open(BytesIO(data)) as png:
        assert png.size[0] // 2 == metadata["width"]
        assert float(png.text[results.PNG_MIN_FONT_KEY]) == 12.5
        assert float(png.text[results.PNG_DPI_KEY]) == 2 * results.FIGURE_DPI
    empty = plt.figure()
    assert results.book_png(empty) is None
    plt.close(empty)


@pytest.mark.parametrize("low, high", [(1.0, 1.45), (1.0, 15.0), (0.148, 0.166), (1e-4, 1.5)])
def test_book_figures_tick_labels_are_plain_numbers(low, high):
    """Fig. 2.2's log axes once read '1.35 x 10^0': under the book's style no tick label, minor ones included,
    is a mantissa times a power of ten, and numbers near 1 are written plainly (powers of ten only from 10^-3 down,
    or 10^3 up)."""
    with matplotlib.rc_context():
        results.book_figures()
        fig, ax = plt.subplots()
        ax.plot([1, 2], [low, high])
        ax.set_yscale("log")
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)]
        plt.close(fig)
    shown = [label for label in labels if label]
    assert shown, labels
    for label in shown:
        assert "times" not in label and not re.search(r"10\^\{-?[0-2]\}", label), labels


def test_epochs_not_evaluated_on_the_test_set_read_as_nan(tmp_path):
    """test_every: an epoch log holds test_acc null where the test set was not evaluated (a record never does)."""
    import json as _json

    lines = [{"seed": 0, "chain": "shared", "step": 1, "epoch": e, "val_acc": 0.5, "test_acc": t, "test_loss": t}
             for e, t in ((1, None), (2, 0.6))]
    (tmp_path / "epochs.jsonl").write_text("".join(_json.dumps(line) + "\n" for line in lines))
    epochs = results.load_epochs(tmp_path)
    assert epochs["test_acc"].isna().tolist() == [True, False] and epochs["test_acc"].iloc[1] == 0.6
