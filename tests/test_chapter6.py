"""Chapter 6 (notebooks/06_kernel_classification.ipynb): its defaults as the book build ran them, a non-default
set through papermill with its numbers recomputed here by explicit refitting, and its parameter checks."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest
from sklearn.datasets import load_digits
from sklearn.kernel_ridge import KernelRidge
from sklearn.model_selection import train_test_split

import pages
from pages import figures, text_of
from sdlib.krr import one_hot, refit_chain, symmetric_label_noise

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "06_kernel_classification.ipynb"
OTHER = {"n_train": 200, "n_val": 80, "n_test": 150, "seeds": [3], "noise_rates": [0.0, 0.3], "lams": [0.1, 3.0],
         "ridge_lams": [0.01, 0.1, 1.0, 10.0], "alphas": [0.0, 0.6], "steps": 4, "gamma": 0.02, "cifar_results": None}


def execute(tmp_path, name, parameters):
    return pages.execute(NOTEBOOK, tmp_path, name, parameters)


def test_defaults_run_and_show_digits_and_the_committed_cifar_results(book):
    nb = pages.executed_by_book(book, NOTEBOOK)  # the defaults, as the book runs them
    text = text_of(nb)
    assert "digits: {'train': 1000, 'val': 300, 'test': 497} images, 64 features, 10 classes" in text
    shown = figures(nb)
    assert shown["fig-ch6-steps-live"] == 1 and shown["fig-ch6-pairs-live"] == 1
    committed = book[0] / "results" / "krr_cifar10" / "results.json"  # the book's copy of the repository
    if committed.is_file():  # the book's default build plots the committed CIFAR-10 run as well
        assert shown["fig-ch6-steps-cifar"] == 1 and shown["fig-ch6-pairs-cifar"] == 1
        assert "cifar10, n_train=" in text
    else:
        assert "no committed CIFAR-10 results" in text
    # Page conventions: check_parameters right after the parameters cell, hidden; boilerplate hidden.
    tags = [cell.metadata.get("tags", []) for cell in nb.cells if cell.cell_type == "code"]
    i = next(k for k, t in enumerate(tags) if "parameters" in t)
    following = [c for c in nb.cells if c.cell_type == "code"][i + 1]
    if "injected-parameters" in following.metadata.get("tags", []):
        following = [c for c in nb.cells if c.cell_type == "code"][i + 2]
    assert "check_parameters(" in following.source and "remove-cell" in following.metadata.get("tags", [])


def digits_split(seed, n_train, n_val, n_test):
    X, y = load_digits(return_X_y=True)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=n_test, stratify=y, random_state=seed)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, train_size=n_train, test_size=n_val,
                                                      stratify=y_rest, random_state=seed)
    mean, std = X_train.mean(0), X_train.std(0)
    std[std == 0] = 1.0
    return [(X_train - mean) / std, (X_val - mean) / std, (X_test - mean) / std], [y_train, y_val, y_test]


def test_non_default_run_writes_results_that_explicit_refitting_reproduces(tmp_path):
    results_dir = tmp_path / "krr_results"
    nb = execute(tmp_path, "other", {**OTHER, "results_dir": str(results_dir)})
    written = json.loads((results_dir / "results.json").read_text())
    assert written["settings"]["steps"] == 4 and written["settings"]["noise_rates"] == [0.0, 0.3]
    assert written["provenance"]["git_commit"] and written["data"][0]["sizes"] == {"train": 200, "val": 80, "test": 150}
    rows = [dict(zip(written["columns"], r)) for r in written["rows"]]
    # 2 noise rates x (2 lambdas x (2 fixed alphas + 2 alpha-hat chains) x 4 steps + 4 ridge lambdas)
    assert len(rows) == 2 * (2 * 4 * 4 + 4)

    (X_train, X_val, X_test), (y_train, y_val, y_test) = digits_split(3, 200, 80, 150)
    rate = 0.3
    noisy = symmetric_label_noise(y_train, rate, 10, seed=1000 * 3 + 300)
    assert np.sum(noisy != y_train) == 60
    # A fixed-alpha chain, by refitting on the mixed targets.
    explicit = refit_chain(X_train, one_hot(noisy, 10), X_test, 4, 0.6, lam=3.0, kernel="rbf", gamma=0.02)
    for step in range(1, 5):
        row = next(r for r in rows if r["noise"] == rate and r["lam"] == 3.0 and r["chain"] == "alpha=0.6"
                   and r["step"] == step)
        assert row["test_acc"] == pytest.approx(np.mean(explicit[step - 1].argmax(1) == y_test), abs=1e-12)
        assert row["test_mse"] == pytest.approx(np.mean((explicit[step - 1] - one_hot(y_test, 10)) ** 2), rel=1e-9)
    # The alpha-hat chain: its recorded alphas, replayed by refitting, give its recorded accuracies.
    hat_rows = sorted((r for r in rows if r["noise"] == rate and r["lam"] == 0.1 and r["chain"] == "alpha_hat"),
                      key=lambda r: r["step"])
    hats = [r["alpha_hat"] for r in hat_rows[1:]]
    assert all(0.0 <= a <= 1.0 for a in hats)
    replay = refit_chain(X_train, one_hot(noisy, 10), X_test, 4, hats, lam=0.1, kernel="rbf", gamma=0.02)
    for row in hat_rows:
        assert row["test_acc"] == pytest.approx(np.mean(replay[row["step"] - 1].argmax(1) == y_test), abs=1e-12)
    # Ridge rows equal scikit-learn's KernelRidge.
    ridge = KernelRidge(alpha=1.0, kernel="rbf", gamma=0.02).fit(X_train, one_hot(noisy, 10)).predict(X_test)
    row = next(r for r in rows if r["noise"] == rate and r["chain"] == "ridge" and r["lam"] == 1.0)
    assert row["test_acc"] == pytest.approx(np.mean(ridge.argmax(1) == y_test), abs=1e-12)
    shown = figures(nb)
    assert shown["fig-ch6-steps-live"] == 1 and shown["fig-ch6-pairs-live"] == 1


@pytest.mark.parametrize("parameters, message", [
    ({"lamda": 0.5}, "lamda"),
    ({"noise_rates": [0.0, 1.0]}, r"parameter 'noise_rates' must be a non-empty list of numbers >= 0 and < 1, got \[0\.0, 1\.0\]"),
    ({"n_train": 1500}, "n_train \\+ n_val \\+ n_test must be at most 1797"),
])
def test_bad_parameters_stop_before_any_work(tmp_path, parameters, message):
    with pytest.raises(pm.PapermillExecutionError, match=message):
        execute(tmp_path, "bad", parameters)


def test_papermill_sees_every_parameter():
    """papermill's own parser reads every name the parameters cell assigns (a comment can break it)."""
    from sdlib.checks import assigned_names

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert list(pm.inspect_notebook(str(NOTEBOOK))) == assigned_names(cell.source)
