# Two entry points for a fresh machine with Python 3.11 and make:
#   make book   set up .venv and build the book into _build/html
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check

MATHJAX_VERSION := 3.2.2
MATHJAX_DIR     := book/_static/mathjax

.PHONY: book test setup-book setup-test mathjax clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.book-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[book]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.book-installed

setup-book: $(VENV)/.book-installed mathjax
setup-test: $(VENV)/.test-installed mathjax

# MathJax is served from the build so that math renders with no network.
mathjax: $(MATHJAX_DIR)/es5/tex-chtml.js
$(MATHJAX_DIR)/es5/tex-chtml.js:
	rm -rf $(MATHJAX_DIR) && mkdir -p $(MATHJAX_DIR)
	cd $(MATHJAX_DIR) && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null \
	  && tar -xzf mathjax-$(MATHJAX_VERSION).tgz --strip-components=1 package/es5 \
	  && rm mathjax-$(MATHJAX_VERSION).tgz

book: setup-book
	$(BIN)/jupyter-book build . --toc book/_toc.yml --config _config.yml -W -n --keep-going

test: setup-test
	$(BIN)/python -m pytest

clean:
	rm -rf _build $(VENV) $(MATHJAX_DIR) .jupyter_cache
