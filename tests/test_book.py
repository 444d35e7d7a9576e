"""The book builds from a clean clone, with warnings as errors, and renders offline.

The `book` fixture (tests/conftest.py, tests/book_build.py) builds the book once per session in a clean copy
of the repository, exactly as `make book` does; the notebooks execute during the build, so this also checks
that every notebook runs top to bottom. The built HTML is then checked: every chapter is one page, its
notebook; every page of the table of contents exists; every figure is numbered, captioned, described and
cited from the text; the bibliography lists every entry of book/references.bib; the math is there; and
MathJax (like every other script and stylesheet) is served from the build, never from a CDN.
tests/test_browser.py opens the same build in Chromium.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import yaml
from pybtex.database import parse_file

from sdlib.config import PROFILES

REPO = Path(__file__).resolve().parents[1]
MATHJAX_ENTRY = "mathjax/es5/tex-chtml.js"  # relative to _static/, as in _config.yml
# The chapters every build must contain, in this order. Each chapter is one page: its notebook.
CHAPTERS = [
    "notebooks/01_toy_example",
    "notebooks/02_eigenvalue_damping",
    "notebooks/03_infinite_limit",
    "notebooks/04_optimal_alpha",
    "notebooks/05_cifar10_self_distillation",
    "notebooks/06_kernel_classification",
    "notebooks/07_cpu_self_distillation",
]
CORE_PAGES = ["book/intro", *CHAPTERS, "book/reproduce", "book/bibliography"]
REMOTE_HOSTS = ("cdn.jsdelivr", "unpkg.com", "cdnjs", "googleapis", "gstatic", "mathjax.org")


def _toc_files(toc: dict) -> list[str]:
    """All `file` entries of a jb-book table of contents, root first, in reading order."""
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))
            walk(entry.get("chapters", []))

    walk(toc.get("parts", []))
    walk(toc.get("chapters", []))
    return files


def _html(root: Path, page: str) -> str:
    return (root / "_build" / "html" / f"{page}.html").read_text(encoding="utf-8")


def _text(page_html: str) -> str:
    """Visible text of the main article, whitespace collapsed."""
    main = re.search(r"<main.*?</main>", page_html, re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", main.group(0) if main else page_html))
    return " ".join(text.split())


def test_build_has_no_warnings(book):
    _, log = book
    # -W already turns warnings into a failed build; this documents that none slipped through.
    assert "build succeeded" in log
    sphinx_warnings = [ln for ln in log.splitlines() if re.search(r": (WARNING|ERROR):", ln)]
    assert sphinx_warnings == []


def test_every_page_of_the_toc_is_built(book):
    root, _ = book
    toc = yaml.safe_load((root / "book" / "_toc.yml").read_text(encoding="utf-8"))
    pages = _toc_files(toc)
    missing_from_toc = [p for p in CORE_PAGES if p not in pages]
    assert missing_from_toc == [], f"chapters missing from book/_toc.yml: {missing_from_toc}"
    assert pages.index("book/bibliography") == len(pages) - 1, "the bibliography comes last"
    for page in pages:
        built = root / "_build" / "html" / f"{page}.html"
        assert built.is_file(), f"{page} was not built"
        assert _text(built.read_text(encoding="utf-8")), f"{page} is empty"
    # index.html sends the reader to the root page.
    assert "book/intro.html" in (root / "_build" / "html" / "index.html").read_text(encoding="utf-8")


def test_each_chapter_is_one_page_its_notebook(book):
    root, _ = book
    toc = yaml.safe_load((root / "book" / "_toc.yml").read_text(encoding="utf-8"))
    chapters = [entry for part in toc["parts"] if part["caption"] == "Chapters" for entry in part["chapters"]]
    files = [entry["file"] for entry in chapters]
    assert [f for f in files if f in CHAPTERS] == CHAPTERS, "chapters 1 to 7 in order"
    assert all(f.startswith("notebooks/") and "sections" not in entry for f, entry in zip(files, chapters)), \
        "a chapter is its notebook, with no separate prose page"
    # no leftover prose copies of the chapters
    assert sorted(p.name for p in (REPO / "book").glob("0*.md")) == []
    # chapter 5's protocols, profiles and BatchNorm measurement are on a page of their own in the Reproduce part
    appendix = [entry["file"] for part in toc["parts"] if part["caption"] == "Appendix" for entry in part["chapters"]]
    assert "book/reproduce_cifar10" in appendix
    page5 = _html(root, "book/reproduce_cifar10")
    text5 = _text(page5).replace("’", "'")
    assert "The authors' code, the paper, and ours" in text5
    # the profiles' table computed from sdlib.config.PROFILES (every profile a column), numbered, and the
    # committed teacher BatchNorm measurement
    table = re.search(r"<table[^>]*>\s*<caption>(?:(?!</table>).)*?read from sdlib\.config\.PROFILES.*?</table>", page5,
                      re.S).group(0)
    assert re.search(r'class="caption-number">Table \d+ ', table)
    header = re.search(r"<thead>(.*?)</thead>", table, re.S).group(1)
    for name in PROFILES:
        assert f'<span class="pre">{name}</span>' in header, name
    assert "one permutation for every epoch and step" in text5
    assert "The teacher's BatchNorm in train mode" in text5
    # the profiles are tabulated once in the book
    for page in (root / "_build" / "html").rglob("*.html"):
        if page.name != "reproduce_cifar10.html":
            assert "read from sdlib.config.PROFILES" not in _text(page.read_text(encoding="utf-8")), page.name
    # the sidebar lists each chapter once
    nav = re.search(r'<nav class="[^"]*bd-docs-nav[^"]*".*?</nav>', _html(root, "book/intro"), re.S).group(0)
    titles = [_text(t) for t in re.findall(r'<a class="reference internal"[^>]*>(.*?)</a>', nav, re.S)]
    assert len(titles) == len(set(titles)), titles


def test_figures_are_numbered_captioned_described_and_cited(book):
    root, _ = book
    n_figures = 0
    for chapter, page in enumerate(CHAPTERS, start=1):
        page_html = _html(root, page)
        main = re.search(r"<main.*?</main>", page_html, re.S).group(0)
        figures = re.findall(r'<figure class="([^"]*)" id="([^"]+)">(.*?)</figure>', main, re.S)
        if page.endswith("05_cifar10_self_distillation") and not (root / "results/cifar10/records.jsonl").is_file():
            continue
        assert figures, f"{page}: no figure"
        for number, (classes, fig_id, body) in enumerate(figures, start=1):
            assert fig_id.startswith("fig-"), fig_id
            caption = re.search(r"<figcaption>(.*?)</figcaption>", body, re.S)
            assert caption, f"{page} {fig_id}: no caption"
            assert f"Fig. {chapter}.{number} " in _text(caption.group(1)), f"{page} {fig_id}: not numbered"
            assert len(_text(caption.group(1))) > 60, f"{page} {fig_id}: caption too short"
            # cited from the text: a {numref} link to the figure outside the figure itself
            assert re.search(rf'href="#{fig_id}"', main.replace(body, "")), f"{page}: {fig_id} is never cited"
            for alt in re.findall(r'<img[^>]*\salt="([^"]*)"', body):
                assert len(alt) > 30 and "/" not in alt and not alt.endswith(".png"), f"{page} {fig_id}: alt {alt!r}"
            if "sd-player" in body:  # interactive: precomputed frames for every slider combination
                spec = json.loads(html.unescape(re.search(
                    r'<script type="application/json">(.*?)</script>', body, re.S).group(1)))
                sizes = {slider["name"]: len(slider["values"]) for slider in spec["sliders"]}
                for series in spec["series"]:
                    expected = 1
                    for name in series.get("depends", []):
                        expected *= sizes[name]
                    frames = series["y"] if series.get("depends") else [series["y"]]
                    assert len(frames) == expected, f"{page} {fig_id}: frames missing"
            n_figures += 1
        # every image of a chapter is in a figure
        assert main.count("<img ") == sum(body.count("<img ") for _, _, body in figures), f"{page}: loose image"
    players = [page for page in CHAPTERS[:2] if 'class="sd-player"' in _html(root, page)]
    assert players == CHAPTERS[:2], "chapters 1 and 2 have interactive figures"
    assert n_figures >= 12


def test_no_boilerplate_or_machine_path_on_any_page(book):
    root, _ = book
    for page in sorted((root / "_build" / "html").rglob("*.html")):
        page_html = page.read_text(encoding="utf-8")
        where = page.relative_to(root)
        assert str(root) not in page_html and str(REPO) not in page_html, f"{where}: a machine path"
        if "notebooks" in page.parts:
            text = _text(page_html)
            for boilerplate in ("check_parameters", "raise ValueError", "write_atomically", "results_path is not None"):
                assert boilerplate not in text, f"{where}: shows {boilerplate}"
            assert "Live: sliders" not in text


def test_notebooks_were_executed(book):
    root, _ = book
    toc = yaml.safe_load((root / "book" / "_toc.yml").read_text(encoding="utf-8"))
    notebooks = [p for p in _toc_files(toc) if p.startswith("notebooks/")]
    assert notebooks, "the table of contents lists no notebook"
    for page in notebooks:
        source = root / f"{page}.ipynb"
        assert source.is_file(), f"{source} is not a notebook"
        page_html = _html(root, page)
        # Outputs come from the build's execution (the committed notebooks may hold none).
        assert 'class="cell_output' in page_html, f"{page}: no cell produced output"
        # Every notebook of this book draws figures; they are rendered into _images/. The one exception is
        # the CIFAR-10 notebook before any results are committed: it must then say so plainly instead.
        figures = re.findall(r'<img[^>]*\ssrc="([^"]*_images/[^"]+)"', page_html)
        if page == "notebooks/05_cifar10_self_distillation" and not (root / "results" / "cifar10" / "records.jsonl").is_file():
            assert "No results committed yet under results/cifar10" in page_html, f"{page}: no 'no results' message"
        else:
            assert figures, f"{page}: no figure in the output"
        for src in figures:
            assert (root / "_build" / "html" / page).parent.joinpath(src).resolve().is_file(), src
        assert "Traceback" not in page_html, f"{page}: a cell raised"


def test_bibliography_lists_every_reference(book):
    root, _ = book
    entries = parse_file(root / "book" / "references.bib", bib_format="bibtex").entries
    expected_keys = {
        "borup2021even", "mobahi2020self", "furlanello2018born",
        "hinton2015distilling", "he2016deep", "krizhevsky2009learning",
    }
    assert set(entries) == expected_keys
    bib_html = _html(root, "book/bibliography")
    citations = re.findall(r'<div class="citation" id="([^"]+)"', bib_html)
    assert len(citations) == len(entries), "every reference must be cited somewhere in the book"
    bib_text = _text(bib_html).lower()
    for key, entry in entries.items():
        # The title as rendered: braces (case protection) and LaTeX escapes dropped, lower case.
        title = re.sub(r"[{}]", "", entry.fields["title"]).lower()
        assert " ".join(title.split()) in bib_text, f"{key}: title not in the bibliography"
        surname = entry.persons["author"][0].last_names[0]
        assert surname.lower() in bib_text, f"{key}: first author not in the bibliography"
    # Citations in the text link to the bibliography entries.
    intro = _html(root, "book/intro")
    linked = set(re.findall(r'href="bibliography\.html#([^"]+)"', intro))
    assert linked and linked <= set(citations)


def test_math_is_rendered_by_local_mathjax(book):
    root, _ = book
    site = root / "_build" / "html"
    pages = sorted(site.rglob("*.html"))
    math_pages = [p for p in pages if 'class="math notranslate' in p.read_text(encoding="utf-8")]
    assert site / "book" / "intro.html" in math_pages
    assert len(math_pages) >= 2, "expected math in the introduction and the chapters"
    # The display equation of the central recursion, with its label for {eq} references.
    assert 'id="equation-central-recursion"' in _html(root, "book/intro")
    for page in math_pages:
        page_html = page.read_text(encoding="utf-8")
        srcs = re.findall(r'<script[^>]*\ssrc="([^"]*mathjax[^"]*)"', page_html, re.I)
        assert len(srcs) == 1, (
            f"{page}: has math but loads {len(srcs)} MathJax scripts {srcs}. (Sphinx loads MathJax only on "
            "pages whose body has math; math in a page title appears in the navigation of every page, so "
            "write titles in Unicode, e.g. α.)"
        )
        src = srcs[0].split("?")[0]
        assert not re.match(r"(https?:)?//", src), f"{page}: MathJax loaded from {src}"
        assert src.endswith("_static/" + MATHJAX_ENTRY), src
        assert (page.parent / src).resolve().is_file(), f"{page}: {src} does not exist in the build"
    # MathJax finds its fonts and TeX extensions next to tex-chtml.js.
    es5 = site / "_static" / "mathjax" / "es5"
    assert any((es5 / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (es5 / "input" / "tex" / "extensions").is_dir()


def test_no_remote_scripts_or_styles(book):
    root, _ = book
    for page in sorted((root / "_build" / "html").rglob("*.html")):
        page_html = page.read_text(encoding="utf-8")
        remote = re.findall(
            r'<(?:script|link|img|iframe)[^>]*\s(?:src|href)="((?:https?:)?//[^"]*)"', page_html, re.I
        )
        assert remote == [], f"{page}: remote assets {remote}"
        hosts = [h for h in REMOTE_HOSTS if h in page_html]
        assert hosts == [], f"{page}: mentions CDN hosts {hosts}"


def test_reproduce_at_scale_quotes_the_committed_throughput(book):
    """The cost of the grid is computed at build time from benchmarks/results/ and results/cifar10/."""
    from pages import page_functions

    root, _ = book
    page_helpers = page_functions(root / "book" / "reproduce_at_scale.md", "load_throughput", "training_runs")
    files = sorted((root / "benchmarks" / "results").glob("train_throughput_*.json"))
    assert files, "no committed throughput benchmark"
    bench = page_helpers["load_throughput"](files)
    text = _text(_html(root, "book/reproduce_at_scale"))
    assert "throughput: pending" not in text and "pending the GPU throughput" not in text
    for variant, group in bench.groupby("variant"):
        for value in (group.images_per_s.min(), group.images_per_s.max()):
            assert f"{value:,.0f}" in text, f"{variant}: {value:,.0f} images/s not on the page"
        for value in (group.grid_total_hours.min(), group.grid_total_hours.max()):
            assert f"{value:,.0f}" in text, f"{variant}: {value:,.0f} grid hours not on the page"
    runs = page_helpers["training_runs"](root / "results" / "cifar10")
    for value in runs.images_per_s:
        assert f"{value:,.0f}" in text, f"the one-GPU sweep's {value:,.0f} images/s not on the page"
    fast = bench[bench.variant == "fast"].iloc[0]
    assert f"{fast.grid_train_images / runs.images_per_s.median() / 3600:,.1f} hours on one H100" in text


def test_chapter_5_shows_the_committed_results_and_their_protocol(book):
    root, _ = book
    if not (root / "results" / "cifar10" / "records.jsonl").is_file():
        pytest.skip("no results committed under results/cifar10 (the 'no results' message is checked above)")
    records = [json.loads(line) for line in
               (root / "results" / "cifar10" / "records.jsonl").read_text(encoding="utf-8").splitlines() if line]
    text = _text(_html(root, "notebooks/05_cifar10_self_distillation"))
    seeds = sorted({r["seed"] for r in records})
    chains = {r["chain"] for r in records} - {"shared"}
    # load_records copies each seed's shared step-1 record into step 1 of every chain.
    rows = sum(r["chain"] != "shared" for r in records) + len(seeds) * len(chains)
    assert f"{rows} (seed, chain, step) rows" in text
    assert f"{len(seeds)} seeds and" in text
    assert "chance is 10%" in text and "inside [0, 1]: True" in text
    assert "The committed run is not the paper's protocol" in text.replace("’", "'")
    # what was run, read from the records, comes before the figures; provenance is on the Reproduce page; no
    # machine path
    page_html = _html(root, "notebooks/05_cifar10_self_distillation")
    assert page_html.index("What was run") < page_html.index('id="fig-cifar-summary"')
    assert f"{records[0]['epochs']} epochs a step" in text
    assert "trained models behind the records" in _html(root, "book/reproduce_cifar10")
    assert "/tmp/" not in page_html and str(REPO) not in page_html and "None/" not in text


def test_reproduce_at_scale_shows_the_committed_sweep_file(book):
    root, _ = book
    # the highlighted listing puts every token in its own element: compare with all whitespace removed
    text = "".join(_text(_html(root, "book/reproduce_at_scale")).split())
    settings = [line.split("#")[0] for line in (REPO / "sweeps" / "paper-slurm.yaml").read_text().splitlines()]
    assert len([line for line in settings if line.strip()]) == 15  # profile; train: and its 3 fields; cluster: and its 9
    for line in filter(str.strip, settings):
        assert "".join(line.split()) in text, line


def test_reproduce_page_lists_every_notebook_parameter():
    """The parameter table of the Reproduce page against each notebook's `parameters` cell."""
    import papermill

    table = {}
    for line in (REPO / "book" / "reproduce.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`notebooks/([^`]+\.ipynb)`\s*\|(.*)\|\s*$", line)
        if match:
            table[match.group(1)] = set(re.findall(r"`([^`]+)`", match.group(2)))
    notebooks = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(table) == notebooks
    for name in notebooks:
        assert table[name] == set(papermill.inspect_notebook(str(REPO / "notebooks" / name))), name


def test_chapter_6_tables_are_captioned_with_readable_rows(book):
    """Chapter 6's results tables: a caption each, and rows named as the reader reads them (α = 0.25,
    α̂ (Algorithm 1), ridge, λ tuned), not the chains' ids (alpha=0.25, alpha_hat) or raw TeX."""
    root, _ = book
    page_html = _html(root, "notebooks/06_kernel_classification")
    main = re.search(r"<main.*?</main>", page_html, re.S).group(0)
    cifar = (root / "results" / "krr_cifar10" / "results.json").is_file()
    tables = re.findall(r"<table.*?</table>", main, re.S)
    assert len(tables) == (3 if cifar else 1), "the digits table, and the CIFAR-10 accuracy and α̂ tables"
    for number, table in enumerate(tables, start=1):
        caption = re.search(r"<caption>(.*?)</caption>", table, re.S)
        assert caption and len(_text(caption.group(1))) > 60, f"uncaptioned table: {_text(table)[:80]}"
        assert _text(caption.group(1)).startswith(f"Table 6.{number} "), _text(caption.group(1))
        rows = [_text(row[0]) for row in
                (re.findall(r"<td[^>]*>(.*?)</td>", body, re.S) for body in
                 re.findall(r"<tr[^>]*>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", table, re.S).group(1), re.S))]
        assert rows, _text(table)[:80]
        for row in rows:
            assert not re.search(r"alpha|_|\$|\\", row), f"row name {row!r} is not for a reader"
    accuracy_rows = [_text(row[0]) for row in
                     (re.findall(r"<td[^>]*>(.*?)</td>", body, re.S) for body in
                      re.findall(r"<tr[^>]*>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", tables[0], re.S).group(1),
                                 re.S))]
    assert accuracy_rows[0] == "ridge, λ tuned" and "α = 0.25" in accuracy_rows
    assert accuracy_rows[-2:] == ["α̂ (Algorithm 1)", "α̂ (unclipped)"]
    # the live figures, and the committed CIFAR-10 run's when it is there
    figures = re.findall(r'<figure class="[^"]*" id="(fig-ch6-[^"]+)">', main)
    assert figures == ["fig-ch6-steps-live", "fig-ch6-pairs-live"] + \
        (["fig-ch6-steps-cifar", "fig-ch6-pairs-cifar"] if cifar else [])


def test_shown_code_fits_80_columns():
    """Code the book shows (not removed, not folded away; the parameter cells are shown) keeps its lines within
    80 characters, so that it never scrolls sideways at desktop width."""
    import nbformat

    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            tags = cell.metadata.get("tags", [])
            if cell.cell_type != "code" or {"remove-cell", "remove-input", "hide-input"} & set(tags):
                continue
            long = [line for line in cell.source.splitlines() if len(line) > 80]
            assert long == [], f"{path.name} {cell.get('id')}: {long}"
