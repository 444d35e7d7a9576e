"""benchmarks/papermill_stress.py: one notebook can be run again on its own and merged into the committed result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stress(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("papermill_stress", ROOT / "benchmarks" / "papermill_stress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("assert x == 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "98_tiny.ipynb")
    monkeypatch.setattr(module, "NOTEBOOKS", notebooks)
    return module


def test_merge_replaces_only_the_notebooks_run_now(stress, tmp_path):
    output = tmp_path / "stress.json"
    # an earlier result in the old layout: start, timeout and load average once for the whole file
    earlier = {"started": "2026-12-05T19:30:09Z", "timeout_s": 600.0, "load_average_at_end": [9.6, 10.4, 9.5],
               "machine": "2 CPU cores", "summary": {},
               "runs": [{"notebook": "01_toy_example.ipynb", "run": 1, "seconds": 10.2, "status": "ok"},
                        {"notebook": "98_tiny.ipynb", "run": 1, "seconds": 600.2, "status": "killed after 600 s"}]}
    output.write_text(json.dumps(earlier))

    assert stress.main(["--runs", "98=1", "--timeout", "300", "--merge", "--output", str(output)]) == 0

    merged = json.loads(output.read_text())
    kept, new = merged["runs"]
    assert kept == {**earlier["runs"][0], "started": "2026-12-05T19:30:09Z", "timeout_s": 600.0,
                    "load_average_after": [9.6, 10.4, 9.5]}
    assert (new["notebook"], new["run"], new["status"], new["timeout_s"]) == ("98_tiny.ipynb", 1, "ok", 300.0)
    assert new["seconds"] > 0 and len(new["load_average_after"]) == 3 and new["started"] > kept["started"]
    assert merged["summary"]["98_tiny.ipynb"]["runs"] == merged["summary"]["98_tiny.ipynb"]["ok"] == 1
    assert merged["summary"]["01_toy_example.ipynb"]["runs"] == 1


def test_without_merge_the_file_holds_this_run_only(stress, tmp_path):
    output = tmp_path / "stress.json"
    output.write_text(json.dumps({"runs": [{"notebook": "01_toy_example.ipynb", "run": 1, "seconds": 1.0,
                                            "status": "ok"}]}))
    assert stress.main(["--runs", "98=1", "--output", str(output)]) == 0
    assert [row["notebook"] for row in json.loads(output.read_text())["runs"]] == ["98_tiny.ipynb"]


@pytest.mark.parametrize("argv, message", [
    (["--runs", "99=2"], "--runs takes NN=COUNT"),
    (["--runs", "98=0"], "--runs takes NN=COUNT"),
])
def test_bad_runs_are_refused_by_name(stress, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        stress.main([*argv, "--output", str(tmp_path / "x.json")])


def test_merge_refuses_a_file_that_is_not_a_result(stress, tmp_path):
    output = tmp_path / "stress.json"
    output.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="--merge: .* is not a result of this benchmark"):
        stress.main(["--runs", "98=1", "--merge", "--output", str(output)])
