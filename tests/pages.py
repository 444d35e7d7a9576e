"""Helpers for the tests of the book's pages: run a notebook through papermill and read its outputs, and load the
functions a page defines in its own hidden cells (code of one page lives beside that page, not in sdlib)."""

from __future__ import annotations

import ast
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat


def read_page(path: Path) -> nbformat.NotebookNode:
    """A notebook (``.ipynb``) or a MyST page (``.md``, read as the book reads it) as a notebook."""
    path = Path(path)
    if path.suffix == ".md":
        from myst_nb.core.read import read_myst_markdown_notebook

        return read_myst_markdown_notebook(path.read_text(encoding="utf-8"), path=str(path))
    return nbformat.read(path, as_version=4)


def page_functions(path: Path, *names: str) -> dict:
    """The namespace after running, in page order, the code cells of ``path`` that define (``def`` or ``class`` at
    the top level) any of ``names``; those cells import what they need themselves. KeyError names a function that
    the page does not define."""
    cells = [cell.source for cell in read_page(path).cells if cell.cell_type == "code"
             and any(re.search(rf"^(?:def|class) {name}\b", cell.source, re.M) for name in names)]
    namespace: dict = {"__name__": f"page:{Path(path).name}"}
    for source in cells:
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - the repository's own page
    missing = [name for name in names if name not in namespace]
    if missing:
        raise KeyError(f"{path} defines no {missing} in a code cell")
    return namespace


def execute(notebook: Path, tmp_path: Path, name: str, parameters: dict) -> nbformat.NotebookNode:
    """Run ``notebook`` through papermill as the book does (kernel python3, working directory its folder)."""
    import papermill as pm

    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(Path(notebook).parent),
                        kernel_name="python3", progress_bar=False)
    return nbformat.read(out, as_version=4)


def executed_by_book(book, notebook: Path) -> nbformat.NotebookNode:
    """``notebook`` (a path under notebooks/) as the test book build (the ``book`` fixture: a clean copy built
    as `make book` builds it) executed it with its defaults: what the book shows."""
    root, _ = book
    return nbformat.read(root / "_build" / "jupyter_execute" / "notebooks" / f"{Path(notebook).stem}.ipynb",
                         as_version=4)


def glued_by_book(book, notebook: Path, key: str):
    """The value ``notebook`` glued under ``key`` as the test book build ran it (MyST-NB keeps a notebook's glued
    values beside it, in ``<name>.glue.json``), as the Python literal its plain text shows."""
    root, _ = book
    path = root / "_build" / "jupyter_execute" / "notebooks" / f"{Path(notebook).stem}.glue.json"
    return ast.literal_eval(json.loads(path.read_text(encoding="utf-8"))[key]["data"]["text/plain"])


def claims_table(book) -> str:
    """The text of the introduction's table of the paper's claims and their verdicts, as the built page shows it."""
    root, _ = book
    page = (root / "_build" / "html" / "book" / "intro.html").read_text(encoding="utf-8")
    table = page.split('id="tbl-what-this-book-checks"', 1)[1].split("</table>", 1)[0]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", table)).split())


def text_of(notebook) -> str:
    """Every output's text: streams, and the plain, Markdown and HTML forms of displayed values."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            for kind in ("text/plain", "text/markdown", "text/html"):
                parts.append(str(output.get("data", {}).get(kind, "")))
    return "\n".join(parts)


def figures(notebook) -> dict[str, int]:
    """Figure name -> number of PNG outputs of its cell."""
    found = {}
    for cell in notebook.cells:
        name = cell.metadata.get("mystnb", {}).get("figure", {}).get("name")
        if name:
            found[name] = sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
    return found


def run_without_torch(code: str) -> str:
    """Run ``code`` in a fresh interpreter where importing torch or torchvision fails (the book's torch-free
    environment), with tests/ on sys.path and matplotlib on Agg; assert it succeeds and imported no torch, and
    return what it printed."""
    script = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
              f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "import matplotlib; matplotlib.use('Agg')\n"
              + code +
              "\nassert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
              "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed, _, last = out.stdout.rstrip("\n").rpartition("\n")
    assert last == "ok", out.stdout
    return printed
