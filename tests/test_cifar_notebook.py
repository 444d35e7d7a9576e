"""The CIFAR-10 notebook end to end through papermill: a tiny real-image training run (ResNet-50, 400 images:
200 train, 100 validation, 100 test; 1 epoch, 2 steps, alphas 0 and 1 plus alpha-hat, one seed, CPU), then the
reports it makes; the book's way of running it today, with no results committed; the chapter's structure for the
book (figures captioned, boilerplate hidden); and an unknown parameter stopping it before any work."""

import json
import re
from pathlib import Path

import matplotlib.image
import nbformat
import papermill
import pytest

from sdlib import results

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "05_cifar10_self_distillation.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    assert not any("protocols." in cell.source for cell in code)
    page = (REPO / "book" / "reproduce_cifar10.md").read_text(encoding="utf-8")
    assert "protocols.protocol_table(tuple(PROFILES))" in page and "protocols.teacher_bn_effect()" in page
    assert not (REPO / "book" / "05_protocols.md").exists()


def test_tiny_training_run_end_to_end(tiny_cifar_root, tmp_path):
    results_dir = tmp_path / "results"
    figure = tmp_path / "figures" / "summary.png"
    nb = execute(
        tmp_path / "trained.ipynb",
        train=True, data_root=str(tiny_cifar_root), alphas=[0.0, 1.0], include_alpha_hat=True, seeds=[0], steps=2,
        epochs=1, n_val=100, subset=200, batch_size=40, device="cpu", profile="paper", results_dir=str(results_dir),
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
        assert record["epochs"] == 1 and record["profile"] == "paper"
        assert record["config"]["seeds"] == [0] and record["config"]["alphas"] == [0.0, 1.0]
        assert record["config"]["device"] == "cpu" and record["config"]["n_val"] == 100
        assert record["config"]["subset"] == 200 and record["config"]["batch_size"] == 40
        # subset cuts each part (train after the validation split) to at most 200 images
        assert record["data"]["sizes"] == {"train": min(200, n_train_images - 100), "val": 100,
                                           "test": min(200, n_images(tiny_cifar_root / "test"))}
    assert by_key[(0, "shared", 1)]["alpha"] == 1.0
    assert by_key[(0, "alpha=0", 2)]["alpha"] == 0.0 and by_key[(0, "alpha=1", 2)]["alpha"] == 1.0
    hat = by_key[(0, "alpha_hat", 2)]
    assert 0.0 <= hat["alpha_hat"] <= 1.0 and hat["alpha"] == hat["alpha_hat"]
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
