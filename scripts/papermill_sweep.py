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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing sdlib

from sdlib.sweep import run_papermill_sweep  # noqa: E402


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
