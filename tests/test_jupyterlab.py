"""The notebooks as people run them: JupyterLab in a real browser.

JupyterLab is started the README's way, ``make lab``, from the project's environment (this Python's venv) on
127.0.0.1 (a free port, a known token, temporary runtime, config, data, settings and workspace folders, no
browser of its own) and stopped at the end even when a test fails. It serves a temporary copy of
``notebooks/``, so the committed notebooks are never written. Debian's Chromium, driven by Playwright exactly as
in tests/test_browser.py (the same ``browser`` fixture: ``/usr/bin/chromium``, nothing downloaded), keeps one
JupyterLab tab open as a reader does and, in it, opens every chapter in turn (File > Open from Path;
``notebooks/0*.ipynb``: a later chapter is included by itself), runs all cells from the Run menu, waits for the
kernel to be idle, saves, closes it, and checks what the reader would see: the project's kernel ran every code
cell and none shows an error. In the chapters with ipywidgets sliders (1 and 2) every slider is dragged with the
mouse and the figure must change. No request may leave 127.0.0.1 and no console error may be logged.

Every notebook runs with its defaults, except where the notebook's own run-time note (the markdown cell after
its title) names quicker parameters: those (``QUICK``) are set the way papermill sets them, in an injected cell
after the notebook's ``parameters`` cell, which the notebook's ``check_parameters()`` then checks.

A self-test runs a deliberately broken notebook (a cell that raises, a slider whose figure ignores it, a console
error, an image off the machine) through the same steps and requires each fault to be seen.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_browser import CHROMIUM_ARGS, _only_loopback, browser  # noqa: F401 - the book test's Chromium

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("0*.ipynb"))
# Chapters with live ipywidgets sliders, and how many sliders each has (the book's players: tests/test_browser.py).
SLIDERS = {"01_toy_example": 1, "02_eigenvalue_damping": 3}
# Quicker parameters, only for a notebook whose run-time note names them (checked below).
QUICK = {"04_optimal_alpha": {"grid_size": 101, "diabetes_lams": [0.1, 1.0]},
         "06_kernel_classification": {"seeds": [0], "n_train": 500, "n_val": 200}}
START_TIMEOUT_S = 120   # JupyterLab's server up, on a loaded 2-core machine
RUN_TIMEOUT_S = 300     # one notebook, run all cells
SLIDER_TIMEOUT_S = 60   # the figure redrawn after a slider moved

# Every code cell's input prompt has its execution count ("[3]:"), none is queued or running ("[*]:").
ALL_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
  return prompts.length > 0 && !prompts.some(t => t.includes('*')) && /\\d/.test(prompts[0]);
}"""
IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
# The kernel has started and is idle (before it starts, the indicator says idle beside "No Kernel").
KERNEL_READY = """() => {
  const name = document.querySelector('.jp-Toolbar-kernelName');
  return document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']") !== null
    && name !== null && !['', 'No Kernel'].includes(name.textContent.trim());
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lab_environment(root: Path) -> dict:
    """This environment with every folder JupyterLab and IPython write to, or read a user's settings from,
    made temporary under ``root``."""
    env = dict(os.environ)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # `make test`'s own flags are not for `make lab`
        env.pop(name, None)
    for name, folder in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                         ("JUPYTER_DATA_DIR", "data"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
        (root / folder).mkdir()
        env[name] = str(root / folder)
    return env


class Lab:
    """A running JupyterLab server: its base URL, token and the folder it serves."""

    def __init__(self, base: str, token: str, folder: Path, log: Path):
        self.base, self.token, self.folder, self.log = base, token, folder, log

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.base + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self):
        for session in self.api("api/sessions"):
            self.api(f"api/sessions/{session['id']}", method="DELETE")


def start_lab(root: Path):
    """Start JupyterLab with ``make lab`` (the README's command) in ``root``, serving ``root/notebooks``; returns
    (Lab, process). The caller stops it (:func:`stop_lab`).

    ``make lab`` runs from ``root`` with the project's Makefile and this environment as its ``VENV``, its setup
    step assumed done (``-o``: the tests never install anything); LAB_ARGS adds what a test needs."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is missing: JupyterLab is started the README's way, with `make lab`")
    if not (Path(sys.prefix) / "bin" / "jupyter-lab").is_file():
        pytest.fail(f"{sys.prefix}/bin/jupyter-lab not found: install the notebooks extra (`make test` does).")
    token, port = secrets.token_hex(16), _free_port()
    lab_args = (f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 "
                f"--IdentityProvider.token={token}")
    command = [make, "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", f"{sys.prefix}/.book-installed",
               "lab", f"VENV={sys.prefix}", f"LAB_ARGS={lab_args}"]
    log = root / "server.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=root, env=_lab_environment(root), stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}/", token, root / "notebooks", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            lab.api("api/status")
            return lab, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_lab(process)
                pytest.fail(f"JupyterLab did not start ({command}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)


def stop_lab(process):
    """Stop make and the server it started: SIGTERM to their process group (the server then shuts its kernels
    down, which run in sessions of their own), and SIGKILL to whatever is left of the group after 30 s."""
    group = process.pid  # start_new_session: make leads its own process group
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    process.wait()  # make stops at once; the server takes a moment
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a temporary copy of notebooks/ (QUICK parameters injected as papermill injects them)."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root = tmp_path_factory.mktemp("jupyterlab")
    folder = root / "notebooks"
    shutil.copytree(REPO / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name, parameters in QUICK.items():
        path = folder / f"{name}.ipynb"
        if path.is_file():
            nbformat.write(parameterize_notebook(load_notebook_node(str(path)), parameters), path)
    lab, process = start_lab(root)
    try:
        yield lab
    finally:
        stop_lab(process)


class LabPage:
    """One JupyterLab tab in Chromium for the whole module, as a reader keeps one open: the app is loaded once
    and each notebook is opened in it (File > Open from Path), run and closed. Console errors, page errors and
    requests or websockets to anything but 127.0.0.1 (aborted) are recorded as they come, and each visit reports
    those that came during it."""

    def __init__(self, browser, lab: Lab):
        self.lab = lab
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.remote, self.console = [], []
        self.context.route("**/*", _only_loopback(self.remote))
        self.page = page = self.context.new_page()
        page.on("console", lambda msg: msg.type == "error" and self.console.append(msg.text))
        page.on("pageerror", lambda exc: self.console.append(str(exc)))
        page.on("websocket", lambda ws: not ws.url.startswith("ws://127.0.0.1:") and self.remote.append(ws.url))
        # a workspace of its own: JupyterLab reopens nothing a user had open
        page.goto(f"{lab.base}lab/workspaces/test?token={lab.token}")
        page.wait_for_selector(".jp-FileBrowser", timeout=START_TIMEOUT_S * 1000)

    def close(self):
        self.context.close()

    def menu(self, menu: str, item):
        self.page.get_by_role("menuitem", name=menu, exact=True).click()
        if isinstance(item, str):
            self.page.get_by_role("menuitem", name=item, exact=True).click()
        else:
            self.page.get_by_role("menuitem", name=item).click()


@pytest.fixture(scope="module")
def tab(lab, browser):  # noqa: F811 - browser: the fixture imported above
    opened = LabPage(browser, lab)
    try:
        yield opened
    finally:
        opened.close()


def visit_notebook(tab: LabPage, name: str, n_sliders: int = 0) -> dict:
    """Open ``name`` in the JupyterLab tab, run all cells from the Run menu, wait for the kernel to be idle, drag
    each of its ``n_sliders`` sliders, save, close it and shut its kernel down. Returns what was seen:
    ``kernel`` (its name in the toolbar), ``errors`` (one line per error output), ``not_run`` (code cells without
    an execution count), ``sliders`` (per slider: its readout before and after, and whether the figure changed),
    ``console`` (console errors and uncaught page errors; JupyterLab logs none, so there is no allow-list),
    ``remote`` (requests and websockets to anything but 127.0.0.1, aborted) and ``seconds`` (how long each
    phase took)."""
    page, lab = tab.page, tab.lab
    n_remote, n_console = len(tab.remote), len(tab.console)
    path = lab.folder / f"{name}.ipynb"
    clock = [time.monotonic()]
    seconds = {}

    def lap(phase):
        clock.append(time.monotonic())
        seconds[phase] = round(clock[-1] - clock[-2], 1)

    nb = None
    try:
        tab.menu("File", re.compile(r"^Open from Path"))
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input").fill(f"{name}.ipynb")
        dialog.get_by_role("button", name="Open", exact=True).click()
        page.wait_for_function(KERNEL_READY, timeout=START_TIMEOUT_S * 1000)
        kernel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelName").inner_text().strip()
        lap("open")
        tab.menu("Run", "Run All Cells")
        page.wait_for_function(ALL_RAN, timeout=RUN_TIMEOUT_S * 1000)
        page.wait_for_selector(IDLE)
        lap("run")
        sliders = [move_slider(page, i) for i in range(n_sliders)]
        lap("sliders")
        # save (File > Save Notebook) and read back what the notebook shows
        saved = path.stat().st_mtime_ns
        tab.menu("File", re.compile(r"^Save Notebook(?! As)"))  # name + shortcut
        page.wait_for_function("() => !document.querySelector('#jp-main-dock-panel .lm-TabBar-tab.jp-mod-dirty')")
        nb = read_saved(page, path, saved)
        lap("save")
    finally:
        # close it and end its kernel, so that the next notebook is alone on the page. Saved, it closes at once; but
        # a late message (a widget redrawn after the kernel went idle) can change it again after the save, and
        # JupyterLab then asks whether to save: save then too (the checks below read that last state), rather than
        # leave the question open over the page for every notebook after this one
        if page.locator(".jp-NotebookPanel").count():
            tab.menu("File", re.compile(r"^Close Tab"))  # name + shortcut
            page.wait_for_function("() => !document.querySelector('.jp-NotebookPanel') || "
                                   "!!document.querySelector('.jp-Dialog')")
            if page.locator(".jp-Dialog").count():
                saved = path.stat().st_mtime_ns
                page.locator(".jp-Dialog").get_by_role("button", name="Save", exact=True).click()
                nb = read_saved(page, path, saved) if nb is not None else None
            page.wait_for_selector(".jp-NotebookPanel", state="detached")
        lab.shut_down_kernels()
        lap("close")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, cell in enumerate(code)
              for out in cell.outputs if out.output_type == "error"]
    not_run = [i for i, cell in enumerate(code) if cell.execution_count is None]
    return {"kernel": kernel, "errors": errors, "not_run": not_run, "sliders": sliders,
            "console": tab.console[n_console:], "remote": tab.remote[n_remote:], "seconds": seconds}


def read_saved(page, path: Path, before: int, timeout_s: float = 30):
    """The notebook at ``path`` once the server has written it anew (modified after ``before``, complete JSON:
    the server writes in place, so a read can catch it half written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if path.stat().st_mtime_ns != before:
            try:
                return nbformat.read(path, as_version=4)
            except (nbformat.reader.NotJSONError, ValueError):
                if time.monotonic() > deadline:
                    raise
        elif time.monotonic() > deadline:
            pytest.fail(f"{path.name} was not saved within {timeout_s} s")
        page.wait_for_timeout(100)  # not time.sleep: the route handler above runs only while Playwright waits


def move_slider(page, i: int) -> dict:
    """Drag slider ``i`` of the notebook's interactive figure (ipywidgets.interact) from one end of its track
    towards the other with the mouse; wait until the figure is drawn again and the kernel is idle."""
    slider = page.locator(".widget-interact .widget-slider").nth(i)
    slider.scroll_into_view_if_needed()
    figure = page.locator(".widget-interact .widget-output img")
    figure.first.wait_for()
    before = figure.first.get_attribute("src")
    readout = slider.locator(".widget-readout")
    page.wait_for_function("el => el.innerText.trim() !== ''", arg=readout.element_handle())  # drawn
    value_before = readout.inner_text()
    # mark the image shown now: the redraw replaces it with a new element
    page.evaluate("() => document.querySelectorAll('.widget-interact .widget-output img')"
                  ".forEach(img => img.setAttribute('data-shown-before', ''))")
    handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-target")
    for _ in range(3):  # the page can still move (math typeset above it): a drag it did not take is made again
        handle.hover()  # Playwright's checks: scrolled into view, not moving, not covered
        box, bar = handle.bounding_box(), track.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        to_left = x > bar["x"] + bar["width"] / 2
        page.mouse.down()
        page.mouse.move(bar["x"] + bar["width"] * (0.1 if to_left else 0.9), y, steps=5)
        page.mouse.up()
        if readout.inner_text() != value_before:
            break
    else:
        pytest.fail(f"slider {i} did not move when dragged (its value stayed {value_before})")
    page.wait_for_selector(".widget-interact .widget-output img:not([data-shown-before])",
                           timeout=SLIDER_TIMEOUT_S * 1000)
    # the slider sends its values one at a time (ipywidgets waits for each reply), so the kernel can be idle
    # between two redraws: wait until it stays idle and the figure stays as it is, or a redraw after the save
    # changes the notebook again
    deadline = time.monotonic() + SLIDER_TIMEOUT_S
    while True:
        page.wait_for_selector(IDLE, timeout=SLIDER_TIMEOUT_S * 1000)
        after = figure.first.get_attribute("src")
        page.wait_for_timeout(750)
        if page.locator(IDLE).count() and figure.first.get_attribute("src") == after:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the figure of slider {i} kept changing for {SLIDER_TIMEOUT_S} s after the drag")
    return {"slider": slider.locator(".widget-label").first.inner_text(), "from": value_before,
            "to": readout.inner_text(), "changed": after != before}


def test_every_notebook_states_its_run_time():
    """The markdown cell after the title says how long the notebook takes with its defaults (measured) and
    which parameters make it quicker; QUICK may only use parameters that the note names."""
    assert [p.stem for p in NOTEBOOKS][:6] == ["01_toy_example", "02_eigenvalue_damping", "03_infinite_limit",
                                              "04_optimal_alpha", "05_cifar10_self_distillation",
                                              "06_kernel_classification"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        note = nb.cells[1]
        assert note.cell_type == "markdown" and note.source.startswith("**Run time**"), path.name
        assert "measured" in note.source, path.name
        for parameter in QUICK.get(path.stem, {}):
            assert f"`{parameter}" in note.source, f"{path.name}: QUICK sets {parameter}, which the note does not name"


@pytest.mark.parametrize("name", [path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab(tab, name):
    seen = visit_notebook(tab, name, SLIDERS.get(name, 0))
    print(f"{name}: seconds per phase {seen['seconds']}")  # shown with pytest -s
    assert seen["kernel"] == "Python 3 (ipykernel)", f"{name}: ran in kernel {seen['kernel']!r}"
    assert seen["errors"] == [], f"{name}: cells show errors: {seen['errors']}"
    assert seen["not_run"] == [], f"{name}: code cells that did not run: {seen['not_run']}"
    for slider in seen["sliders"]:
        assert slider["to"] != slider["from"], f"{name}: slider {slider['slider']!r} did not move"
        assert slider["changed"], f"{name}: moving slider {slider['slider']!r} did not change the figure"
    assert seen["remote"] == [], f"{name}: requests off the machine: {seen['remote']}"
    assert seen["console"] == [], f"{name}: console errors: {seen['console']}"


BROKEN = [
    # a slider whose figure does not depend on it: the widget is broken
    "import ipywidgets as widgets\nimport matplotlib.pyplot as plt\n\n\n"
    "def show(alpha=0.5):\n    plt.plot([0, 1], [0, 1])\n    plt.show()\n\n\n"
    "widgets.interact(show, alpha=widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description='alpha'))",
    "from IPython.display import HTML, Javascript, display\n\n"
    "display(Javascript(\"console.error('deliberately broken')\"))\n"
    "display(HTML('<img src=\"http://example.invalid/remote.png\" alt=\"remote\">'))",
    "raise RuntimeError('deliberately broken')",
    "print('never runs')",
]


def test_the_checks_see_what_they_look_for(lab, tab):
    """A broken notebook through the same steps: the error, the cell after it, the slider that changes nothing,
    the console error and the request off the machine are all seen."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in BROKEN])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab.folder / "broken.ipynb")
    try:
        seen = visit_notebook(tab, "broken", n_sliders=1)
    finally:
        (lab.folder / "broken.ipynb").unlink()
    assert seen["errors"] == ["cell 2: RuntimeError: deliberately broken"]
    assert seen["not_run"] == [3]
    (slider,) = seen["sliders"]
    assert slider["slider"] == "alpha" and slider["to"] != slider["from"] and not slider["changed"]
    assert "deliberately broken" in seen["console"]
    assert set(seen["remote"]) == {"http://example.invalid/remote.png"}  # once per rendering of the output
