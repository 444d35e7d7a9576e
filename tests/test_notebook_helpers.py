"""sdlib.checks.check_parameters: papermill's injected parameters against the notebook's parameters cell."""

import pytest

from sdlib.checks import assigned_names, check_parameters

PARAMETERS = "lam = 0.2\nalpha: float = 0.5\nseeds = [0, 1]  # a list\nsteps, gamma = 3, 80.0\n"


def test_assigned_names_reads_top_level_assignments():
    assert assigned_names(PARAMETERS) == ["lam", "alpha", "seeds", "steps", "gamma"]


def test_known_parameters_pass_and_are_returned():
    history = ["", "import numpy as np", PARAMETERS, "# Parameters\nlam = 0.5\nsteps = 4\n", "check_parameters()"]
    assert check_parameters(history) == ["lam", "steps"]


def test_an_interactive_run_has_nothing_to_check():
    assert check_parameters(["", PARAMETERS, "check_parameters()"]) == []


def test_a_misspelled_parameter_is_named_with_the_closest_known_one():
    history = ["", PARAMETERS, "# Parameters\nlamda = 0.5\n", "check_parameters()"]
    with pytest.raises(ValueError, match=r"unknown parameter 'lamda' \(did you mean 'lam'\?\): this notebook "
                                         r"takes lam, alpha, seeds, steps, gamma"):
        check_parameters(history)


def test_every_unknown_parameter_is_named():
    history = ["", PARAMETERS, "# Parameters\nepoch = 1\nzzz = 2\nlam = 1.0\n", "check_parameters()"]
    with pytest.raises(ValueError, match=r"unknown parameters 'epoch'.*, 'zzz'"):
        check_parameters(history)


def test_papermill_path_names_are_not_parameters():
    history = ["", PARAMETERS, "# Parameters\nlam = 0.5\nPAPERMILL_INPUT_PATH = 'a.ipynb'\n", "x"]
    assert check_parameters(history) == ["lam"]
