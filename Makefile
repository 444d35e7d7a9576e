# Two entry points for a fresh machine with Python 3.11 and make:
#   make book   set up .venv and build the book into _build/html
#   make test   set up .venv and run the whole test suite
#   make lab    JupyterLab on the notebooks, with the project's kernel
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check

MATHJAX_VERSION := 3.2.2
MATHJAX_DIR     := book/_static/mathjax
MATHJAX_TMP     := _build/.mathjax-download

.PHONY: book test lab setup-book setup-test mathjax chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.book-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[book]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.book-installed

setup-book: $(VENV)/.book-installed mathjax
setup-test: $(VENV)/.test-installed mathjax chromium

# tests/test_browser.py opens the built book in Debian's Chromium (driven by Playwright, which never downloads
# a browser here). Installed where missing when we are root; otherwise say how.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "the browser test needs $(CHROMIUM): run 'sudo apt-get update && sudo apt-get install -y chromium'" >&2; \
	    exit 1; \
	  fi; \
	fi

# MathJax is served from the build so that math renders with no network: the npm package's es5/
# folder (tex-chtml.js with its fonts and TeX extensions) is unpacked into book/_static/mathjax,
# which _config.yml puts on html_static_path. It is unpacked into a git-ignored scratch folder and
# moved into place only when complete, so an interrupted download never leaves a half folder that
# looks finished; the version stamp makes a change of MATHJAX_VERSION fetch again.
mathjax: $(MATHJAX_DIR)/.version-$(MATHJAX_VERSION)
$(MATHJAX_DIR)/.version-$(MATHJAX_VERSION):
	@command -v npm >/dev/null || { echo "make mathjax needs npm (Node.js) to fetch mathjax@$(MATHJAX_VERSION)" >&2; exit 1; }
	rm -rf $(MATHJAX_TMP) && mkdir -p $(MATHJAX_TMP)
	cd $(MATHJAX_TMP) && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null \
	  && tar -xzf mathjax-$(MATHJAX_VERSION).tgz --strip-components=1 package/es5 \
	  && rm mathjax-$(MATHJAX_VERSION).tgz
	test -f $(MATHJAX_TMP)/es5/tex-chtml.js
	touch $(MATHJAX_TMP)/.version-$(MATHJAX_VERSION)
	rm -rf $(MATHJAX_DIR) && mkdir -p $(dir $(MATHJAX_DIR)) && mv $(MATHJAX_TMP) $(MATHJAX_DIR)

# Notebooks execute during the build (cached in _build/.jupyter_cache). MPLBACKEND is unset because
# ipykernel draws figures inline only without it: a shell's MPLBACKEND=Agg would drop every figure.
book: setup-book
	env -u MPLBACKEND $(BIN)/jupyter-book build . --toc book/_toc.yml --config _config.yml -W -n --keep-going

# JupyterLab in notebooks/ with the project's kernel: the venv's kernel specs come first on JUPYTER_PATH, so a
# "python3" kernel registered for the user elsewhere cannot shadow the venv's Python. MPLBACKEND is unset as for
# the book (inline figures). As root (a container) JupyterLab needs --allow-root. LAB_ARGS adds options
# (make lab LAB_ARGS="--port 8899 --no-browser"). tests/test_jupyterlab.py starts it the same way.
lab: $(VENV)/.book-installed
	cd notebooks && env -u MPLBACKEND JUPYTER_PATH="$(abspath $(VENV))/share/jupyter" \
	  "$(abspath $(BIN))/jupyter-lab" $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: setup-test
	$(BIN)/python -m pytest

clean:
	rm -rf _build $(VENV) $(MATHJAX_DIR) .jupyter_cache
