"""Build the book once per test session, in a clean copy of the repository (used by the `book` fixture).

The repository's tracked and untracked-but-not-ignored files (what a clean clone plus the work in progress
holds) are copied into a temporary directory together with the git-ignored MathJax folder that `make mathjax`
produces, and Jupyter Book is run there exactly as `make book` runs it. The notebooks execute during the build
(a fresh jupyter-cache), so this also checks that every notebook runs top to bottom. tests/test_book.py checks
the HTML, tests/test_browser.py opens it in Chromium; both share this one build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MATHJAX_REL = Path("book/_static/mathjax")
BUILD_TIMEOUT_S = 1200


def repository_files() -> list[Path]:
    """Tracked files plus untracked files that git does not ignore, relative to the repository."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, check=True, capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.fail(f"the book tests need the repository as a git checkout to copy it: {err}")
    # A tracked file deleted in the work tree is still listed; a clean clone would not have it.
    return [Path(p) for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def build_book(root: Path) -> tuple[Path, str]:
    """Copy the repository into ``root`` and build the book there; returns (root, build log)."""
    if not (REPO / MATHJAX_REL / "es5" / "tex-chtml.js").is_file():
        pytest.fail(
            f"{MATHJAX_REL}/es5/tex-chtml.js is missing: run `make mathjax` (or `make test`, which "
            "runs it first) to unpack MathJax, which the book serves locally."
        )
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    if not jupyter_book.is_file():
        pytest.fail(f"{jupyter_book} not found: install the book extra (`make test` does).")
    for rel in repository_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    shutil.copytree(REPO / MATHJAX_REL, root / MATHJAX_REL, dirs_exist_ok=True)

    env = dict(os.environ)
    # The notebooks must import the copy's sdlib, not the editable install of the original tree.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    # ipykernel shows figures inline only when MPLBACKEND is unset (a non-interactive backend such as
    # Agg set by a CI would leave every figure out of the book).
    env.pop("MPLBACKEND", None)
    command = [
        str(jupyter_book), "build", ".", "--toc", "book/_toc.yml", "--config", "_config.yml",
        "-W", "-n", "--keep-going",
    ]
    try:
        proc = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"jupyter-book build did not finish in {BUILD_TIMEOUT_S} s:\n{err.stdout!s:.4000}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"jupyter-book build failed (rc={proc.returncode}):\n{log[-6000:]}"
    return root, log
