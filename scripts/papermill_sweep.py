"""Run a notebook once per parameter set with papermill, keeping every executed notebook.

    python scripts/papermill_sweep.py sets.yaml [--notebook notebooks/05_cifar10_self_distillation.ipynb]
                                                [--output-dir runs/papermill] [--kernel python3] [--keep-going]

sets.yaml (or .json): a list of {name, parameters}, or a mapping name -> parameters, e.g.

    - name: fast-2epochs
      parameters: {train: true, profile: fast, epochs: 2, seeds: [0], results_dir: runs/fast-2epochs}
    - name: report
      parameters: {results_dir: results/cifar10, figure_path: runs/figures/report.png}

Each run is written to <output-dir>/<name>.ipynb (a failing one too, up to its failing cell). Parameters are
checked against the notebook's `parameters` cell before anything runs; an unknown one is an error (exit code 2).
The notebook runs in its own folder (relative paths in the CIFAR-10 notebook are taken from the repository root).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing sdlib

from sdlib.parameter_files import read_mapping  # noqa: E402

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")  # a parameter set's name: a safe file name


def load_parameter_sets(source) -> list[tuple[str, dict]]:
    """Parameter sets from a JSON/YAML file (or the already-parsed object): ``[(name, parameters), ...]``.

    Accepted forms: a list of ``{"name": ..., "parameters": {...}}``, or a mapping ``{name: {...}, ...}``.
    Names must be unique and usable as file names (letters, digits, ``_ . = -``)."""
    source = read_mapping(source, "parameter file")
    if isinstance(source, dict):
        entries = [{"name": name, "parameters": params} for name, params in source.items()]
    elif isinstance(source, list):
        entries = source
    else:
        raise ValueError("parameter sets must be a list of {name, parameters} or a mapping name -> parameters, "
                         f"got {type(source).__name__}")
    if not entries:
        raise ValueError("parameter sets must not be empty")
    sets, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"name", "parameters"} or "name" not in entry:
            raise ValueError(f"parameter set #{i} must be a mapping with keys 'name' and 'parameters', got {entry!r}")
        name, params = entry["name"], entry.get("parameters") or {}
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"parameter set #{i}: name must be letters, digits, '_', '.', '=', '-' (a file "
                             f"name), got {name!r}")
        if name in seen:
            raise ValueError(f"parameter set #{i}: name {name!r} is used twice")
        if not isinstance(params, dict):
            raise ValueError(f"parameter set {name!r}: parameters must be a mapping, got {params!r}")
        seen.add(name)
        sets.append((name, dict(params)))
    return sets


def run_papermill_sweep(notebook: str | os.PathLike, parameter_sets, output_dir: str | os.PathLike =
                        "runs/papermill", *, kernel_name: str = "python3", cwd: str | os.PathLike | None = None,
                        progress: bool = True, stop_on_error: bool = True) -> list[Path]:
    """Execute ``notebook`` once per parameter set; keep each executed notebook as ``output_dir/<name>.ipynb``.

    parameter_sets: a JSON/YAML file or what :func:`load_parameter_sets` accepts. Every parameter is checked
    against the notebook's ``parameters`` cell (``papermill.inspect_notebook``) before anything runs. cwd: the
    kernel's working directory (default: the notebook's folder). A failing notebook is kept too; with
    ``stop_on_error`` the sweep stops there (papermill's PapermillExecutionError), else it goes on and raises
    RuntimeError naming every failed set at the end. Returns the paths of the executed notebooks."""
    import papermill
    from tqdm.auto import tqdm

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    sets = load_parameter_sets(parameter_sets)
    known = papermill.inspect_notebook(str(notebook))
    for name, params in sets:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"parameter set {name!r}: unknown parameter(s) {unknown} for {notebook.name}; "
                             f"its parameters are {sorted(known)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs, failed = [], []
    for name, params in tqdm(sets, desc=f"papermill {notebook.name}", unit="notebook", disable=not progress):
        output = output_dir / f"{name}.ipynb"
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel_name,
                                       cwd=str(cwd if cwd is not None else notebook.parent), progress_bar=False)
        except papermill.PapermillExecutionError as error:
            if stop_on_error:
                raise
            failed.append(f"{name}: {error.ename}: {error.evalue}")
        outputs.append(output)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(sets)} notebook run(s) failed (kept in {output_dir}): "
                           + "; ".join(failed))
    return outputs


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="scripts/papermill_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("parameter_sets", help="a .yaml/.yml/.json file of parameter sets")
    parser.add_argument("--notebook", default=str(REPO / "notebooks" / "05_cifar10_self_distillation.ipynb"))
    parser.add_argument("--output-dir", default="runs/papermill", help="where the executed notebooks are kept")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--keep-going", action="store_true", help="run every set even if one fails")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        outputs = run_papermill_sweep(args.notebook, args.parameter_sets, args.output_dir, kernel_name=args.kernel,
                                      progress=not args.no_progress, stop_on_error=not args.keep_going)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    for path in outputs:
        print(path)
    return outputs


if __name__ == "__main__":
    main()
