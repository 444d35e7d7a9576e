"""Run the book's notebooks through papermill again and again, as batch users do, and record every run's time.

    nice -n 10 .venv/bin/python benchmarks/papermill_stress.py                      # 01 x20, the others x5
    nice -n 10 .venv/bin/python benchmarks/papermill_stress.py --runs 01=20 02=5 --timeout 600
    nice -n 10 .venv/bin/python benchmarks/papermill_stress.py --runs 06=5 --timeout 1800 --merge

Each run is ``papermill <notebook> <output>`` in a subprocess of its own (its own kernel, as on the command
line), with the notebook's default parameters, from the notebook's folder. A run that has not finished after
``--timeout`` seconds is killed, and its row says in which cell (and how long the cells before it took: a slow
run or a hang). The result, one row per run (notebook, run, seconds, status, when it started, the load average
after it) and a summary per notebook (median, max), is written to ``benchmarks/results/papermill_stress.json``
(``--output``) after every run, so a killed benchmark keeps what it measured. With ``--merge`` the rows of the
notebooks not run now are kept from that file and those of the notebooks run now are replaced, so that one
notebook can be measured again on its own. Exit code 1 if any run failed or was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DEFAULT_RUNS = {"01": 20, "02": 5, "03": 5, "04": 5, "05": 5, "06": 5}


def _runs(tokens: list[str] | None) -> dict[str, int]:
    if not tokens:
        return dict(DEFAULT_RUNS)
    runs = {}
    for token in tokens:
        prefix, _, count = token.partition("=")
        if not count.isdigit() or int(count) < 1 or not list(NOTEBOOKS.glob(f"{prefix}_*.ipynb")):
            raise SystemExit(f"--runs takes NN=COUNT with a notebook number NN of notebooks/ and COUNT >= 1, "
                             f"got {token!r}")
        runs[prefix] = int(count)
    return runs


def _where(output: Path) -> str:
    """Where a killed run was: the cell papermill marked running in the output it wrote as it went, and how long
    the cells before it took (slow, or hung?)."""
    try:
        cells = json.loads(output.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return "before its first cell (the kernel's start?)"
    marks = [(i, c.get("metadata", {}).get("papermill", {})) for i, c in enumerate(cells)
             if c.get("cell_type") == "code"]
    running = [i for i, m in marks if m.get("status") == "running"]
    done = [m.get("duration") or 0.0 for _, m in marks if m.get("status") == "completed"]
    return (f"in cell {running[0] if running else '?'}; {len(done)} cells had finished, the longest in "
            f"{max(done, default=0.0):.0f} s")


def _kept_rows(output: Path, rerun: set[str]) -> list[dict]:
    """The rows of ``output`` (an earlier result) of the notebooks not in ``rerun``, each with the settings it ran
    under (older files kept the start, timeout and load average once for the whole file)."""
    if not output.is_file():
        return []
    try:
        earlier = json.loads(output.read_text(encoding="utf-8"))
        rows = earlier["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--merge: {output} is not a result of this benchmark ({err})") from None
    shared = {"started": earlier.get("started"), "timeout_s": earlier.get("timeout_s"),
              "load_average_after": earlier.get("load_average_at_end")}
    return [{**{key: value for key, value in shared.items() if value is not None}, **row} for row in rows
            if row["notebook"] not in rerun]


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(row["notebook"] for row in rows):
        times = [row["seconds"] for row in rows if row["notebook"] == name]
        out[name] = {"runs": len(times), "ok": sum(row["status"] == "ok" for row in rows if row["notebook"] == name),
                     "median_s": round(statistics.median(times), 1), "max_s": round(max(times), 1),
                     "min_s": round(min(times), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/papermill_stress.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", metavar="NN=COUNT",
                        help="runs per notebook, e.g. 01=20 05=5 (default: 01=20 and 5 of every other)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds after which a run counts as hung and is killed (default 600)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "papermill_stress.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other notebooks' rows of --output, replace those of the notebooks run now")
    args = parser.parse_args(argv)
    runs = _runs(args.runs)
    output_path = Path(args.output)
    notebooks = {prefix: sorted(NOTEBOOKS.glob(f"{prefix}_*.ipynb"))[0] for prefix in runs}
    rows = _kept_rows(output_path, {nb.name for nb in notebooks.values()}) if args.merge else []
    papermill = Path(sys.executable).with_name("papermill")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="papermill-stress-") as scratch:
        for prefix, count in runs.items():
            notebook = notebooks[prefix]
            for run in range(1, count + 1):
                output = Path(scratch) / f"{notebook.stem}-{run}.ipynb"
                start = time.perf_counter()
                try:
                    done = subprocess.run([str(papermill), str(notebook), str(output), "--cwd", str(NOTEBOOKS),
                                           "--no-progress-bar"], capture_output=True, text=True,
                                          timeout=args.timeout, env={**os.environ, "MPLBACKEND": ""})
                    status = "ok" if done.returncode == 0 else "failed: " + (done.stderr.strip().splitlines()
                                                                            or ["?"])[-1][:300]
                except subprocess.TimeoutExpired:
                    status = f"killed after {args.timeout:g} s, " + _where(output)
                seconds = time.perf_counter() - start
                load = [round(value, 2) for value in os.getloadavg()]
                rows.append({"notebook": notebook.name, "run": run, "seconds": round(seconds, 2),
                             "status": status, "started": started, "timeout_s": args.timeout,
                             "load_average_after": load})
                print(f"{notebook.name} run {run}/{count}: {seconds:.1f} s, {status} (load {load[0]:g})",
                      flush=True)
                result = {"machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
                          "summary": _summary(rows), "runs": rows}
                output_path.write_text(json.dumps(result, indent=1) + "\n")
    bad = [row for row in rows if row["status"] != "ok" and row["notebook"] in
           {nb.name for nb in notebooks.values()}]
    print(f"{sum(count for count in runs.values())} runs, {len(bad)} failed or hung; written to {args.output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
