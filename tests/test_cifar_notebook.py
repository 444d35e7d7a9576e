"""The CIFAR-10 notebook end to end through papermill: a tiny real-image training run (400 images: 200 train,
100 validation, 100 test; 1 epoch, 2 steps, alphas 0 and 1 plus alpha-hat, one seed, CPU; chapter 7's cnn4, whose
steps take a tenth of a ResNet-50's: the pipeline is the same, and tests/test_train.py runs it with ResNet-50),
then the reports it makes; the book's way of running it today, with no results committed; the chapter's structure
for the book (figures captioned, boilerplate hidden); and an unknown parameter stopping it before any work."""

import json
import math
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import papermill  # noqa: E402
import pytest  # noqa: E402

import pages  # noqa: E402
from pages import page_functions, run_without_torch  # noqa: E402
from sdlib import results  # noqa: E402
from test_results import (CHAINS, FIXED_ALPHAS, SEEDS, STEPS, by_hand, epoch_lines,  # noqa: E402
                          synthetic_records, write_jsonl)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "05_cifar10_self_distillation.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the chapter's own figures and tables, defined in a hidden cell of the notebook
CHAPTER5_HELPERS = ("accuracy_table", "plot_accuracy", "plot_last_step", "plot_alpha_hat", "plot_summary",
                    "plot_epochs")


def execute(output_path: Path, **parameters) -> nbformat.NotebookNode:
    """Run the notebook as the book and the README do: kernel python3, working directory notebooks/."""
    papermill.execute_notebook(str(NOTEBOOK), str(output_path), parameters=parameters, kernel_name="python3",
                               cwd=str(REPO / "notebooks"), progress_bar=False)
    return nbformat.read(output_path, as_version=4)


def stream_text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.output_type == "stream")


def display_outputs(nb, mime: str) -> list[str]:
    return [out["data"][mime] for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.output_type in ("display_data", "execute_result") and mime in out.get("data", {})]


def glued_figures(nb) -> list[str]:
    """The PNGs glued (myst_nb.glue with display=False: the MIME type carries glue's prefix)."""
    return [value for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            for mime, value in out.get("data", {}).items() if mime.endswith("image/png")]


def n_images(split_dir: Path) -> int:
    return sum(1 for path in split_dir.rglob("*") if path.is_file())


def test_the_introduction_states_the_verdict_chapter_5_computes(book):
    """The introduction's table of claims pastes its chapter-5 verdict from the chapter (glue), so that it follows
    the committed records (typed by hand it would still say "not shown yet" after 75-epoch runs land): their epochs
    against the paper's, and the last step's gains over step 1, recomputed here from the same records."""
    verdict = pages.glued_by_book(book, NOTEBOOK, "cifar_verdict")
    records = results.load_records(book[0] / "results" / "cifar10")
    summary = results.summarize(records)
    last = summary["step"].max()
    first = summary.loc[summary["step"] == 1, "test_acc_mean"].iloc[0]
    at_last = summary[summary["step"] == last].set_index("chain")["test_acc_mean"]
    gain = lambda acc: f"{100 * (acc - first):+.2f}"  # noqa: E731
    trained = int(records["epochs"].max())  # the committed runs: 4 epochs a step
    assert verdict.startswith(f"not shown yet: the committed networks train {trained} epochs a step, the paper’s 75; "
                              if trained < 75 else "measured with the paper’s 75 epochs a step; ")
    assert f"at step {last} the best fixed α" in verdict
    assert f"ends {gain(at_last.drop(index=results.ALPHA_HAT_CHAIN).max())} points from step 1" in verdict
    assert f"the α̂ chain {gain(at_last[results.ALPHA_HAT_CHAIN])}" in verdict
    assert f"α = 0 ends {gain(at_last['alpha=0'])}" in verdict
    assert verdict in pages.claims_table(book)


def test_notebook_is_committed_clean_and_parameterized():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code)
    parameter_cells = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameter_cells) == 1
    namespace = {}
    exec(parameter_cells[0].source, namespace)  # noqa: S102 - the notebook's own literal assignments
    expected = {"data_root", "alphas", "include_alpha_hat", "seeds", "steps", "epochs", "profile", "batch_size",
                "device", "subset", "results_dir", "train", "figure_path", "n_val", "checkpoint_dir", "download"}
    assert expected <= set(namespace)
    # None: the committed results/cifar10 to read, the git-ignored runs/cifar10 to train into
    assert namespace["train"] is False and namespace["results_dir"] is None
    # the reporting half must not need torch: torch and sdlib.train are imported only in the train branch
    train_cells = [cell for cell in code if "if train:" in cell.source]
    assert len(train_cells) == 1 and "from sdlib.train import" in train_cells[0].source
    for cell in code:
        if cell is not train_cells[0]:
            assert "import torch" not in cell.source and "sdlib.train" not in cell.source
    # the chapter is this notebook: one H1, the parameter check hidden right after the parameters, the
    # training cell hidden (the book never trains), the results before the protocol, the figures glued with
    # captions that read their numbers from the records, described and cited
    h1 = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines() if line.startswith("# ")]
    assert h1 == ["# ResNet-50 on CIFAR-10"]
    after = code[code.index(parameter_cells[0]) + 1]
    assert "check_parameters(" in after.source and "remove-cell" in after.metadata.get("tags", [])
    assert "remove-cell" in train_cells[0].metadata.get("tags", [])
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    text = "".join(markdown)
    headings = [line for source in markdown for line in source.splitlines() if line.startswith("## ")]
    assert headings.index("## Results") < headings.index("## The protocol")
    figures = re.findall(r"```\{glue:figure\} (\w+)\n:name: (fig-[\w-]+)\n:alt: ([^\n]*)\n\n(.*?)```", text, re.S)
    assert [name for _, name, _, _ in figures] == ["fig-cifar-summary", "fig-cifar-epochs"]
    for key, name, alt, caption in figures:
        assert any(f'glue("{key}", fig, display=False)' in cell.source for cell in code), key
        assert len(caption) > 60 and len(alt) > 40 and "{glue:text}`cifar_epochs:d`" in caption
        assert f"{{numref}}`{name}`" in text
    # the profiles, the authors' code, the BatchNorm measurement and provenance are on their own page
    assert not any("protocol_table(" in cell.source or "teacher_bn_effect(" in cell.source for cell in code)
    page = (REPO / "book" / "reproduce_cifar10.md").read_text(encoding="utf-8")
    assert "protocol_table(tuple(PROFILES))" in page and "teacher_bn_effect()" in page
    assert not (REPO / "book" / "05_protocols.md").exists()


def test_tiny_training_run_end_to_end(tiny_cifar_root, tmp_path):
    results_dir = tmp_path / "results"
    figure = tmp_path / "figures" / "summary.png"
    nb = execute(
        tmp_path / "trained.ipynb",
        train=True, data_root=str(tiny_cifar_root), alphas=[0.0, 1.0], include_alpha_hat=True, seeds=[0], steps=2,
        epochs=1, n_val=100, subset=200, batch_size=40, device="cpu", profile="paper", model="cnn4",
        results_dir=str(results_dir),
        checkpoint_dir=str(tmp_path / "checkpoints"), figure_path=str(figure),
    )

    # records.jsonl: one record per (seed, chain, step), step 1 once per seed as the shared model
    lines = [json.loads(line) for line in (results_dir / "records.jsonl").read_text().splitlines() if line.strip()]
    by_key = {(r["seed"], r["chain"], r["step"]): r for r in lines}
    assert len(by_key) == len(lines)
    assert set(by_key) == {(0, "shared", 1), (0, "alpha=0", 2), (0, "alpha=1", 2), (0, "alpha_hat", 2)}
    n_train_images = n_images(tiny_cifar_root / "train")
    for record in lines:
        for field in ("val_acc", "test_acc"):
            assert 0.0 <= record[field] <= 1.0, (field, record)
        assert record["epochs"] == 1 and record["profile"] == "paper" and record["config"]["model"] == "cnn4"
        assert record["config"]["seeds"] == [0] and record["config"]["alphas"] == [0.0, 1.0]
        assert record["config"]["device"] == "cpu" and record["config"]["n_val"] == 100
        assert record["config"]["subset"] == 200 and record["config"]["batch_size"] == 40
        # subset cuts each part (train after the validation split) to at most 200 images
        assert record["data"]["sizes"] == {"train": min(200, n_train_images - 100), "val": 100,
                                           "test": min(200, n_images(tiny_cifar_root / "test"))}
    assert by_key[(0, "shared", 1)]["alpha"] == 1.0
    assert by_key[(0, "alpha=0", 2)]["alpha"] == 0.0 and by_key[(0, "alpha=1", 2)]["alpha"] == 1.0
    hat = by_key[(0, "alpha_hat", 2)]
    # the paper profile runs Algorithm 1 unbounded: the step trained with alpha-hat wherever it fell
    assert math.isfinite(hat["alpha_hat"]) and hat["alpha"] == hat["alpha_hat"] == hat["alpha_hat_unconstrained"]
    assert 0.0 <= hat["probe_val_acc"] <= 1.0 and 0.0 <= hat["probe_test_acc"] <= 1.0
    for key in ((0, "shared", 1), (0, "alpha=0", 2), (0, "alpha=1", 2)):
        assert by_key[key]["alpha_hat"] is None

    # the aggregated view the notebook plots: every chain starts at the shared model
    df = results.load_records(results_dir)
    assert len(df) == 3 * 2
    assert (df.loc[df["step"] == 1, "test_acc"] == by_key[(0, "shared", 1)]["test_acc"]).all()

    # the notebook reported what it trained: the figure, and the table cells from the records
    assert figure.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(figure)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    text = stream_text(nb)
    assert f"summary figure saved to {figure}" in text
    assert "No results committed yet" not in text
    # the accuracy tables: numbered MyST tables with a caption, rows named as a reader reads them, each chain's
    # step-2 accuracy in its row
    tables = [table for table in display_outputs(nb, "text/markdown") if "{table}" in table]
    accuracy = [table for table in tables if "Accuracy on the test set" in table]
    assert len(accuracy) == 1 and any("Accuracy on the validation split" in table for table in tables)
    assert ":name: tbl-cifar-test" in accuracy[0]
    rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in accuracy[0].splitlines() if line.startswith("| ") and "---" not in line)}
    for chain, label in (("alpha=0", "α = 0"), ("alpha=1", "α = 1"), ("alpha_hat", "α̂ (Algorithm 1)")):
        assert any(f"{100 * by_key[(0, chain, 2)]['test_acc']:.2f}" in cell for cell in rows[label]), (label, rows)
    assert not any("alpha=" in row or "alpha_hat" in row for row in rows)
    # what was run, read from the records, in a callout
    callout = [text for text in display_outputs(nb, "text/markdown") if "What was run" in text]
    assert len(callout) == 1 and "tbl-cifar-run" in callout[0] and "paper" in callout[0]
    # the summary figure and the training curves, glued for the book's numbered figures
    assert len(glued_figures(nb)) == 2

    # reading the committed results again (train=False, as the book will) gives the same report
    report = execute(tmp_path / "report.ipynb", results_dir=str(results_dir), figure_path=str(tmp_path / "again.png"))
    assert "profile 'paper', config_hash" not in stream_text(report)  # nothing trained
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "\n".join(display_outputs(report, "text/markdown")).count("α̂") >= 2
    # the report names the results folder as it was given (the book gives results/cifar10), never the data root
    shown = stream_text(report) + "\n".join(display_outputs(report, "text/markdown"))
    assert f"rows from {results_dir}/records.jsonl" in shown and str(tiny_cifar_root) not in shown


@pytest.mark.parametrize("present", [True, False], ids=["empty_dir", "missing_dir"])
def test_without_results_the_notebook_says_so(tmp_path, present):
    results_dir = tmp_path / "results" / "cifar10"
    if present:
        results_dir.mkdir(parents=True)
    nb = execute(tmp_path / "out.ipynb", results_dir=str(results_dir), figure_path=str(tmp_path / "fig.png"))
    text = stream_text(nb)
    assert results.no_results_message(results_dir) in text
    assert text.count("No results committed yet under") == 1
    assert f"under {results_dir}: run " in text
    assert not display_outputs(nb, "image/png") and not glued_figures(nb) and not (tmp_path / "fig.png").exists()
    assert not (results_dir / "records.jsonl").exists()  # reporting never writes results


def test_an_unknown_parameter_stops_the_notebook_before_any_work(tmp_path):
    """-p epoch 1 (for epochs) used to start the full 75-epoch protocol; now the check cell stops it."""
    output = tmp_path / "out.ipynb"
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
        execute(output, epoch=1, train=True)
    nb = nbformat.read(output, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    failed = [i for i, cell in enumerate(code) if any(out.get("output_type") == "error" for out in cell.outputs)]
    assert len(failed) == 1 and "check_parameters(" in code[failed[0]].source
    assert all(cell.execution_count is None for cell in code[failed[0] + 1:])


# ---------------------------------------------------------------- the chapter's figures and tables (its hidden cell)


@pytest.fixture(scope="module")
def chapter5():
    return page_functions(NOTEBOOK, *CHAPTER5_HELPERS)


@pytest.fixture
def records_dir(tmp_path):
    records = synthetic_records()
    return write_jsonl(tmp_path / "results", records), records


def test_accuracy_table_formats_mean_and_std_in_percent(records_dir, chapter5):
    directory, raw = records_dir
    table = chapter5["accuracy_table"](results.load_records(directory))
    assert list(table.index) == list(CHAINS)
    assert list(table.columns) == [f"step {t}" for t in (1, *STEPS)]
    group = [r["test_acc"] for r in by_hand(raw)[("alpha_hat", 3)]]
    expected = f"{100 * statistics.fmean(group):.2f} ± {100 * statistics.stdev(group):.2f}"
    assert table.loc["alpha_hat", "step 3"] == expected


def test_plot_accuracy_draws_one_line_per_chain(records_dir, chapter5):
    directory, raw = records_dir
    df = results.load_records(directory)
    fig = chapter5["plot_accuracy"](df)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == len(CHAINS)
    table = by_hand(raw)
    for line, chain in zip(lines, CHAINS):
        np.testing.assert_array_equal(line.get_xdata(), (1, *STEPS))
        expected = [statistics.fmean(r["test_acc"] for r in table[(chain, t)]) for t in (1, *STEPS)]
        np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-12)
    # fixed alphas: one distinct colour each, named in the legend (no colorbar); alpha-hat highlighted (own
    # colour, thicker) with the only band (the fixed chains' spread is in plot_last_step)
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in lines]
    assert len(set(colours)) == len(CHAINS)
    assert matplotlib.colors.same_color(lines[-1].get_color(), chapter5["ALPHA_HAT_COLOR"])
    assert lines[-1].get_linewidth() > max(line.get_linewidth() for line in lines[:-1])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[:len(FIXED_ALPHAS)] == [f"α = {alpha:g}" for alpha in FIXED_ALPHAS]
    assert len(ax.collections) == 1
    assert len(fig.axes) == 1
    plt.close(fig)

    fig, ax = plt.subplots()
    assert chapter5["plot_accuracy"](df, ax=ax, metric="val_acc", spread=None) is fig
    assert len(ax.get_lines()) == len(CHAINS) and len(ax.collections) == 0
    plt.close(fig)
    with pytest.raises(ValueError, match="spread"):
        chapter5["plot_accuracy"](df, spread="iqr")
    with pytest.raises(ValueError, match="metric"):
        chapter5["plot_accuracy"](df, metric="loss")


def test_plot_alpha_hat_shows_seeds_and_mean(records_dir, chapter5):
    directory, raw = records_dir
    fig = chapter5["plot_alpha_hat"](results.load_records(directory))
    ax = fig.axes[0]
    (mean_line,) = ax.get_lines()
    np.testing.assert_array_equal(mean_line.get_xdata(), STEPS)
    expected = [statistics.fmean(r["alpha_hat"] for r in raw if r["chain"] == "alpha_hat" and r["step"] == t)
                for t in STEPS]
    np.testing.assert_allclose(mean_line.get_ydata(), expected, atol=1e-12)
    (points,) = ax.collections
    assert len(points.get_offsets()) == len(SEEDS) * len(STEPS)
    plt.close(fig)

    # a run without the alpha-hat chain (the shared record's config says so, else it would expand into it)
    without = [{**r, "config": {**r["config"], "include_alpha_hat": False}}
               for r in synthetic_records() if r["chain"] != "alpha_hat"]
    df = results.load_records(write_jsonl(Path(directory).parent / "no_hat", without))
    with pytest.raises(ValueError, match="alpha_hat"):
        chapter5["plot_alpha_hat"](df)
    fig = chapter5["plot_summary"](df)  # accuracy and last-step panels only
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) == 3
    plt.close(fig)


def test_plot_summary_has_both_panels(records_dir, chapter5, tmp_path):
    directory, _ = records_dir
    df = results.load_records(directory)
    fig = chapter5["plot_summary"](df)
    accuracy_ax, last_ax, alpha_ax = fig.axes
    assert len(accuracy_ax.get_lines()) == len(CHAINS) and len(alpha_ax.get_lines()) == 1
    # the last step against alpha: one error bar per chain, at the mean and one sample std over seeds
    summary = results.summarize(df)
    last = summary[summary["step"] == summary["step"].max()].set_index("chain")
    bars = last_ax.containers
    assert len(bars) == len(CHAINS)
    for bar, chain in zip(bars, last.index):
        (x,), (y,) = bar.lines[0].get_data()
        assert y == pytest.approx(last.loc[chain, "test_acc_mean"])
        if chain != "alpha_hat":
            assert x == pytest.approx(results.chain_alpha(chain))
        (segment,) = bar.lines[2][0].get_segments()
        assert segment[1][1] - segment[0][1] == pytest.approx(2 * last.loc[chain, "test_acc_std"])
    fig.savefig(tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close(fig)


def test_plot_epochs_lays_the_steps_end_to_end(tmp_path, chapter5):
    epochs = results.load_epochs(write_jsonl(tmp_path / "r", epoch_lines(), name="epochs.jsonl"))
    fig = chapter5["plot_epochs"](epochs, "alpha=0", metric="val_acc")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # steps 1 (shared), 2, 3
    np.testing.assert_array_equal(ax.get_lines()[2].get_xdata(), [5, 6])  # epochs laid end to end
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [0.2 + 0.01 + 0.0005, 0.2 + 0.02 + 0.0005])
    plt.close(fig)
    with pytest.raises(ValueError, match="alpha=0.7"):
        chapter5["plot_epochs"](epochs, "alpha=0.7")
    with pytest.raises(ValueError, match="metric"):
        chapter5["plot_epochs"](epochs, "alpha=0", metric="loss")


def test_the_chapters_figures_need_no_torch(records_dir):
    """The book plots committed results on machines without torch: the chapter's helpers with torch blocked."""
    directory, _ = records_dir
    run_without_torch("from pages import page_functions\n"
                      "from sdlib.results import load_records\n"
                      f"page = page_functions({str(NOTEBOOK)!r}, *{CHAPTER5_HELPERS!r})\n"
                      f"df = load_records({str(directory)!r}); page['accuracy_table'](df); page['plot_summary'](df)")
