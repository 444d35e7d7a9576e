"""The built book in a real browser: Debian's Chromium driven by Playwright, offline.

The session's book build (the ``book`` fixture, tests/book_build.py) is served from a loopback HTTP server and
every page is opened at a desktop width (1280 px) and a phone width (390 px). After MathJax has typeset, each
page must have: no display equation or code block wider than the article column (and at 1280 px no display
equation that needs to scroll at all), nor a table wider than its box that has three columns at most or is of
class sd-wrap-code (its code wraps on a phone), nor any table's caption (a wider table scrolls, its caption not);
every figure captioned, its images loaded, with a text alternative that is not a file name; no request to anything
but 127.0.0.1; no console error. The interactive figures' sliders must change the picture, and a figure must open
enlarged on click.

Chromium is the system's (``/usr/bin/chromium``, installed by ``make test`` where missing); Playwright never
downloads a browser here.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}
# Pages with interactive figures (players) and how many sliders each has.
PLAYERS = {"notebooks/01_toy_example.html": 1, "notebooks/02_eigenvalue_damping.html": 3}
# Every chapter's page; each shows figures (chapter 5 only once results are committed under results/cifar10).
CHAPTERS = ["notebooks/01_toy_example.html", "notebooks/02_eigenvalue_damping.html",
            "notebooks/03_infinite_limit.html", "notebooks/04_optimal_alpha.html",
            "notebooks/05_cifar10_self_distillation.html", "notebooks/06_kernel_classification.html",
            "notebooks/07_cpu_self_distillation.html"]

# Everything measured in the page, in one pass, after MathJax has finished.
MEASURE = """
() => {
  const article = document.querySelector("article.bd-article") || document.querySelector("main");
  const column = article.getBoundingClientRect();
  const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const describe = (el) => (el.closest("[id]") ? "#" + el.closest("[id]").id + " " : "") +
    el.tagName.toLowerCase() + ": " + (el.textContent || "").trim().replace(/\\s+/g, " ").slice(0, 80);
  const wide = [], scrolling = [];
  const selector = 'mjx-container[display="true"], div.math, div.highlight, div.highlight pre, ' +
                   '.cell_output pre, .sd-player svg, article table';
  for (const el of article.querySelectorAll(selector)) {
    if (!visible(el)) continue;
    const r = el.getBoundingClientRect();
    const scroller = el.closest(".output.text_html, .pst-scrollable-table-container");
    // a table scrolls inside its box, except one that must fit it: a table whose code wraps on a phone
    // (sd-wrap-code), or of three columns at most (nothing in it is too wide to wrap)
    const columns = el.tagName === "TABLE" ? Math.max(0, ...[...el.rows].map((row) => row.cells.length)) : 0;
    const mustFit = el.matches(".sd-wrap-code") || columns <= 3;
    const limit = el.tagName === "TABLE" && scroller ? scroller.getBoundingClientRect() : column;
    const caption = el.tagName === "TABLE" && el.caption && visible(el.caption) ? el.caption.getBoundingClientRect()
      : null;  // every caption fits the box, also that of a table that scrolls: it is read without scrolling
    if (caption && (caption.left < limit.left - 1 || caption.right > limit.right + 1)) {
      wide.push(describe(el) + ` (its caption ${Math.round(caption.width)} px in a ${Math.round(limit.width)} px box)`);
    }
    if (el.tagName === "TABLE" && scroller && !mustFit && getComputedStyle(scroller).overflowX !== "visible") continue;
    if (r.left < limit.left - 1 || r.right > limit.right + 1) {
      wide.push(describe(el) + ` (${Math.round(r.width)} px in a ${Math.round(limit.width)} px column)`);
    }
    if (el.matches('mjx-container[display="true"]') && el.scrollWidth > el.clientWidth + 1) {
      scrolling.push(describe(el) + ` (${el.scrollWidth} px in ${el.clientWidth} px)`);
    }
  }
  const figures = [];
  for (const fig of article.querySelectorAll("figure")) {
    const caption = fig.querySelector("figcaption");
    const images = [...fig.querySelectorAll("img")].map((img) => ({
      src: img.getAttribute("src"), url: img.src, alt: img.getAttribute("alt") || "",
      loaded: img.complete && img.naturalWidth > 0, natural: img.naturalWidth, naturalHeight: img.naturalHeight,
      shown: img.getBoundingClientRect().width, shownHeight: img.getBoundingClientRect().height,
      inlineHeight: img.style.height || img.getAttribute("height") || "",
    }));
    figures.push({id: fig.id, caption: caption ? caption.textContent.trim() : "", number:
      caption && caption.querySelector(".caption-number") ? caption.querySelector(".caption-number").textContent : "",
      images, player: !!fig.querySelector(".sd-player")});
  }
  const loose = [...article.querySelectorAll("img")].filter((img) => !img.closest("figure"))
    .map((img) => img.getAttribute("src"));
  const math = article.querySelectorAll(".math").length;
  const typeset = article.querySelectorAll("mjx-container").length;
  const bodyFont = parseFloat(getComputedStyle(article.querySelector("p") || article).fontSize);
  // the reader's tables (Sphinx's generated index lays its entries out in a table of its own)
  const tables = [...article.querySelectorAll("table:not(.indextable)")].filter(visible).map((table) => {
    const caption = table.querySelector("caption");
    return {caption: caption ? caption.textContent.trim().replace(/\\s+/g, " ") : "",
            text: table.textContent.trim().replace(/\\s+/g, " ").slice(0, 80)};
  });
  const text = article.innerText;
  return {wide, scrolling, figures, loose, math, typeset, bodyFont, tables, text};
}
"""


# A figure's text, at the width it is shown, is never smaller than this (CSS px); its aspect ratio is its own.
MIN_FIGURE_TEXT_PX = 9.0
ASPECT_TOLERANCE = 0.02
# What a reader must never see: a None where a folder should be, or a path of the machine that built the book.
LEAKS = re.compile(r"None/|(?<![\w.])/(?:tmp|home|work|root|Users|mnt|scratch|private|var/folders)/")
TABLE_NUMBER = re.compile(r"^Table \d+(\.\d+)?\b")


def image_file(url: str, root: Path) -> Path:
    """The file behind an image URL of the page served from ``root``."""
    return root / unquote(urlparse(url).path).lstrip("/")


def figure_text_px(image: dict, root: Path) -> float | None:
    """The smallest text of a figure image in CSS px as shown: the smallest font (pt) drawn, recorded in the PNG
    by sdlib.results.book_png with the PNG's resolution, scaled by the shown width over the natural width."""
    from PIL import Image

    from sdlib.results import PNG_DPI_KEY, PNG_MIN_FONT_KEY

    with Image.open(image_file(image["url"], root)) as png:
        chunks = dict(getattr(png, "text", {}))
    if PNG_MIN_FONT_KEY not in chunks or PNG_DPI_KEY not in chunks:
        return None
    font_pt, dpi = float(chunks[PNG_MIN_FONT_KEY]), float(chunks[PNG_DPI_KEY])
    return font_pt / 72 * dpi * image["shown"] / image["natural"]


def reader_problems(seen: dict, root: Path) -> list[str]:
    """What a reader of one page at one width trips on: a figure image shown with another aspect ratio than its
    own or with an inline height, figure text smaller than MIN_FIGURE_TEXT_PX, a table without a numbered
    caption, "None/" or a machine path in the text."""
    problems = []
    for figure in seen["figures"]:
        for image in figure["images"]:
            where = f"#{figure['id']} {image['src']}"
            if not image["loaded"] or not image["natural"] or not image["shown"]:
                continue  # reported by the caption-and-load test
            if image["inlineHeight"]:
                problems.append(f"{where}: inline height {image['inlineHeight']}")
            natural = image["natural"] / image["naturalHeight"]
            shown = image["shown"] / image["shownHeight"]
            if abs(shown / natural - 1) > ASPECT_TOLERANCE:
                problems.append(f"{where}: aspect ratio {shown:.3f} shown, {natural:.3f} drawn")
            text_px = figure_text_px(image, root)
            if text_px is None:
                problems.append(f"{where}: no record of its font size (draw it through sdlib.results.book_png)")
            elif text_px < MIN_FIGURE_TEXT_PX:
                problems.append(f"{where}: text {text_px:.1f} px at {image['shown']:.0f} px wide")
    for table in seen["tables"]:
        if not TABLE_NUMBER.match(table["caption"]):
            problems.append(f"table without a numbered caption ({table['caption'][:40]!r}): {table['text']}")
    problems += [f"prints {match.group(0)!r}: ...{seen['text'][max(0, match.start() - 40):match.end() + 40]}..."
                 for match in LEAKS.finditer(seen["text"])]
    return problems


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test output
        pass


@contextlib.contextmanager
def served(folder):
    """A folder served on 127.0.0.1 (a free port) while the block runs; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture(scope="module")
def site(book):
    """The built book served on 127.0.0.1 (a free port); yields (base URL, list of page paths)."""
    root, _ = book
    html_dir = root / "_build" / "html"
    # every page, except redirect stubs (index.html sends the reader on to the root page; its own test below)
    pages = sorted(str(p.relative_to(html_dir)) for p in html_dir.rglob("*.html")
                   if not p.relative_to(html_dir).parts[0].startswith("_")
                   and 'http-equiv="refresh"' not in p.read_text(encoding="utf-8").lower())
    with served(html_dir) as base:
        yield base, pages


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: install the test extra (`make test` does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _only_loopback(remote: list):
    """A route handler that lets requests to 127.0.0.1 through and records and aborts every other one."""
    def route(route_):
        url = urlparse(route_.request.url)
        if url.scheme in ("data", "blob", "about") or url.hostname == "127.0.0.1":
            route_.continue_()
        else:
            remote.append(route_.request.url)
            route_.abort()
    return route


def visit(browser, base: str, pages: list[str]) -> dict:
    """Open every page at both widths; per (viewport, page): the measurements (MEASURE), the console errors
    and the requests to anything but 127.0.0.1 (aborted)."""
    out = {}
    for name, (width, height) in VIEWPORTS.items():
        context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        remote, errors = [], []
        context.route("**/*", _only_loopback(remote))
        page = context.new_page()
        page.on("console", lambda msg, errors=errors: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        for path in pages:
            before_remote, before_errors = len(remote), len(errors)
            page.goto(base + path, wait_until="load")
            page.wait_for_function("() => !document.querySelector('script[src*=\"mathjax\"]') || "
                                   "(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise)")
            page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
            page.evaluate("() => document.fonts.ready.then(() => true)")
            out[name, path] = dict(page.evaluate(MEASURE), remote=remote[before_remote:],
                                   errors=errors[before_errors:])
        context.close()
    return out


@pytest.fixture(scope="module")
def visits(site, browser):
    """Every page of the book at both widths."""
    base, pages = site
    return visit(browser, base, pages)


def visit_folder(browser, folder, pages):
    """visit() on pages of a folder served on 127.0.0.1 for the duration (the self-tests' broken pages)."""
    with served(folder) as base:
        return visit(browser, base, pages)


def test_the_checks_see_what_they_look_for(browser, tmp_path):
    """The measurements on a page that breaks every rule: a code block wider than the column, a figure with
    no caption, an image that does not load and whose alt text is a file name, a request off the machine and a
    console error."""
    (tmp_path / "bad.html").write_text(
        '<html><body><main><article class="bd-article" style="width: 300px">'
        '<div class="highlight"><pre style="width: 900px">x = 1</pre></div>'
        '<figure id="fig-bad"><img src="missing.png" alt="missing.png"></figure>'
        '<img src="http://example.invalid/remote.png" alt="remote">'
        "<script>console.error('boom')</script></article></main></body></html>", encoding="utf-8")
    seen = visit_folder(browser, tmp_path, ["bad.html"])["desktop", "bad.html"]
    assert any("900 px" in line for line in seen["wide"])
    (figure,) = seen["figures"]
    assert figure["caption"] == "" and not figure["images"][0]["loaded"] and figure["images"][0]["alt"] == "missing.png"
    assert seen["loose"] == ["http://example.invalid/remote.png"]
    assert seen["remote"] == ["http://example.invalid/remote.png"]
    assert "boom" in seen["errors"] and any("404" in error for error in seen["errors"])


def test_the_reader_checks_see_what_they_look_for(browser, tmp_path):
    """reader_problems on a page that breaks each rule, at both widths: a figure squashed by an inline height,
    one whose 5 pt text is unreadable at any width, a figure from a plain savefig (no font record), a table
    without a number, and "None/" and a machine path in the text; and on the same page done right, none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdlib.results import FIGURE_FONT_PT, FIGURE_WIDTH_IN, book_png

    def png(name, font_pt):
        fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, 3.0), dpi=100, layout="constrained")
        ax.plot([0, 1], [0, 1])
        ax.tick_params(labelsize=font_pt)
        ax.set_xlabel("x", fontsize=font_pt)
        data, metadata = book_png(fig)
        plt.close(fig)
        (tmp_path / name).write_bytes(data)
        return metadata["width"]

    width = png("good.png", FIGURE_FONT_PT)
    png("tiny.png", 5)
    fig, ax = plt.subplots(figsize=(3, 2))
    fig.savefig(tmp_path / "plain.png")
    plt.close(fig)
    caption = '<figcaption><span class="caption-number">Fig. 1 </span>A caption long enough.</figcaption>'
    bad = (f'<figure id="fig-squashed"><img src="good.png" alt="a figure" style="width:{width}px;height:90px">'
           f'{caption}</figure>'
           f'<figure id="fig-tiny"><img src="tiny.png" alt="a figure" style="width:{width}px">{caption}</figure>'
           f'<figure id="fig-plain"><img src="plain.png" alt="a figure">{caption}</figure>'
           '<table><caption>Accuracy by step</caption><tr><td>1</td></tr></table>'
           '<p>96 (seed, chain, step) rows from None/records.jsonl, written to /work/sdlib/runs.</p>')
    good = (f'<figure id="fig-good"><img src="good.png" alt="a figure" style="width:{width}px">{caption}</figure>'
            '<table><caption><span class="caption-number">Table 5.1 </span>Accuracy by step</caption>'
            '<tr><td>1</td></tr></table><p>96 (seed, chain, step) rows from results/cifar10/records.jsonl.</p>')
    for name, body in (("bad.html", bad), ("good.html", good)):
        (tmp_path / name).write_text('<html><head><style>img { max-width: 100%; height: auto; } figure { margin: 0; }</style></head>'
                                     '<body><main><article class="bd-article">' + body +
                                     '</article></main></body></html>', encoding="utf-8")
    seen = visit_folder(browser, tmp_path, ["bad.html", "good.html"])
    for viewport in VIEWPORTS:
        problems = reader_problems(seen[viewport, "bad.html"], tmp_path)
        assert any("fig-squashed" in p and "inline height" in p for p in problems), problems
        assert any("fig-squashed" in p and "aspect ratio" in p for p in problems), problems
        assert any("fig-tiny" in p and "text " in p for p in problems), problems
        assert any("fig-plain" in p and "no record of its font size" in p for p in problems), problems
        assert not any("fig-tiny" in p and "aspect" in p for p in problems), problems
        assert any("table without a numbered caption" in p for p in problems), problems
        assert any("'None/'" in p for p in problems) and any("'/work/'" in p for p in problems), problems
        assert reader_problems(seen[viewport, "good.html"], tmp_path) == [], viewport
    # the phone shrinks the figure with its aspect ratio, and the check computes its text from the shown width
    assert seen["phone", "good.html"]["figures"][0]["images"][0]["shown"] < width


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_figures_keep_their_shape_and_readable_text(visits, site, book, viewport):
    """Every figure image keeps its aspect ratio (within 2 %) with no inline height and text of at least
    MIN_FIGURE_TEXT_PX at 1280 and 390 px; every table has a numbered caption; no page prints None/ or a path."""
    _, pages = site
    root, _ = book
    html_dir = root / "_build" / "html"
    problems = {path: reader_problems(visits[viewport, path], html_dir) for path in pages}
    assert {path: found for path, found in problems.items() if found} == {}


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_math_and_code_fit_the_column(visits, site, viewport):
    _, pages = site
    for path in pages:
        seen = visits[viewport, path]
        assert seen["typeset"] >= seen["math"] > 0 or seen["math"] == 0, f"{path}: math not typeset"
        assert seen["wide"] == [], f"{path} at {viewport}: wider than the column: {seen['wide']}"
        if viewport == "desktop":
            assert seen["scrolling"] == [], f"{path}: equations that need scrolling at 1280 px: {seen['scrolling']}"


def test_every_figure_has_a_caption_and_loads(visits, site, book):
    _, pages = site
    n_figures = 0
    for path in pages:
        for viewport in VIEWPORTS:
            seen = visits[viewport, path]
            assert seen["loose"] == [], f"{path}: images outside a figure: {seen['loose']}"
            for figure in seen["figures"]:
                where = f"{path} #{figure['id']} at {viewport}"
                assert len(figure["caption"]) > 30, f"{where}: no caption"
                assert figure["number"].startswith("Fig."), f"{where}: figure not numbered"
                assert figure["images"] or figure["player"], f"{where}: empty figure"
                for image in figure["images"]:
                    assert image["loaded"], f"{where}: {image['src']} did not load"
                    alt = image["alt"]
                    assert len(alt) > 30 and "/" not in alt and not alt.endswith((".png", ".svg")), \
                        f"{where}: alt text {alt!r} does not describe the figure"
                    # drawn at twice the shown size, shown at its natural size up to the column width
                    if viewport == "desktop":
                        assert image["shown"] == pytest.approx(image["natural"] / 2, abs=2), where
        n_figures += len(visits["desktop", path]["figures"])
    assert n_figures >= 12
    assert set(CHAPTERS) <= set(pages)
    root, _ = book
    for path in CHAPTERS:
        if path.startswith("notebooks/05_") and not (root / "results" / "cifar10" / "records.jsonl").is_file():
            continue
        assert visits["desktop", path]["figures"], f"{path}: no figure"


def test_no_request_leaves_the_machine_and_no_console_error(visits):
    for (viewport, path), seen in visits.items():
        assert seen["remote"] == [], f"{path} at {viewport}: requests off the machine: {seen['remote']}"
        assert seen["errors"] == [], f"{path} at {viewport}: console errors: {seen['errors']}"


def test_index_sends_the_reader_to_the_introduction(site, browser):
    base, pages = site
    assert "index.html" not in pages and "book/intro.html" in pages
    page = browser.new_page()
    try:
        page.goto(base + "index.html")
        page.wait_for_url("**/book/intro.html")
    finally:
        page.close()


def test_sliders_change_the_picture(site, browser):
    base, pages = site
    assert set(PLAYERS) <= set(pages)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        for path, n_sliders in PLAYERS.items():
            page.goto(base + path, wait_until="load")
            page.wait_for_selector(".sd-player[data-ready] svg path")
            sliders = page.locator(".sd-player input[type=range]")
            assert sliders.count() == n_sliders, path
            for i in range(n_sliders):
                slider = sliders.nth(i)
                before = page.inner_html(".sd-player svg")
                maximum = int(slider.get_attribute("max"))
                target = 0 if int(slider.input_value()) != 0 else maximum
                slider.fill(str(target))  # sets the value and fires input, as a drag does
                after = page.inner_html(".sd-player svg")
                name = slider.get_attribute("data-slider")
                assert after != before, f"{path}: moving slider {name!r} did not change the figure"
                assert page.locator(".sd-player output").nth(i).inner_text().strip(), path
        # values below the y-range are marked on the axis, not dropped: chapter 2 at alpha = 0, the largest
        # lambda and the last step (b_k(t) = a_k^t far below 10^-6; the limit is zero)
        page.goto(base + "notebooks/02_eigenvalue_damping.html", wait_until="load")
        page.wait_for_selector(".sd-player[data-ready] svg path")
        for name in ("alpha", "lam", "step"):
            slider = page.locator(f'.sd-player input[data-slider="{name}"]')
            slider.fill("0" if name == "alpha" else slider.get_attribute("max"))
        assert page.locator(".sd-player svg .sd-below").count() > 0
        assert page.locator(".sd-player svg .sd-below-note").count() == 1
        assert "t → ∞ (below)" in page.inner_html(".sd-player svg")
    finally:
        page.close()


def test_figures_open_enlarged(site, browser):
    base, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(base + "notebooks/01_toy_example.html", wait_until="load")
        image = page.locator("figure img.sd-zoomable").first
        shown = image.bounding_box()["width"]
        image.click()
        enlarged = page.locator(".sd-lightbox img")
        enlarged.wait_for()
        assert enlarged.bounding_box()["width"] > 1.2 * shown
        page.keyboard.press("Escape")
        assert page.locator(".sd-lightbox").count() == 0
    finally:
        page.close()


def test_figure_text_is_as_large_as_the_body_text(visits):
    """The notebooks draw figures with labels of at least 12 pt at 100 px per inch (sdlib.results.book_figures),
    that is 16.7 px; shown at their natural size at 1280 px (checked above), their labels are then at least as
    large as the body text."""
    for (viewport, path), seen in visits.items():
        if viewport == "desktop" and seen["figures"]:
            assert seen["bodyFont"] <= 12 * 100 / 72, f"{path}: body text {seen['bodyFont']} px is larger than the figures'"
