"""benchmarks/krr_scaling.py runs end to end at a tiny size, checks its three ways agree, and writes its JSON."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_krr_scaling_runs_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("krr_scaling", ROOT / "benchmarks" / "krr_scaling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "krr.json"
    returned = bench.main(["--sizes", "60", "400", "--steps", "4", "--sklearn-steps", "2", "--sklearn-alphas", "2",
                           "--repeat", "1", "--threads", "1", "--no-eigh", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["settings"]["sklearn_time_scale"] == (11 / 2) * (4 / 2)
    assert [row["ours_solver"] for row in written["rows"]] == ["eigh", "cholesky"]  # the "auto" rule
    for row in written["rows"]:
        s = row["seconds"]
        assert math.isclose(s["sklearn_refit_scaled"], s["sklearn_refit_timed"] * 11, rel_tol=1e-12)
        assert math.isclose(row["speedup"]["sklearn_over_ours"], s["sklearn_refit_scaled"] / s["ours"], rel_tol=1e-12)
        assert all(d <= 1e-8 for d in row["max_relative_difference_to_ours"].values())
    assert written["provenance"]["git_commit"] and written["provenance"]["scikit-learn"]
