"""The table of bad inputs tried against the results store, the trainer's checks, the data's download and
fingerprint, and sweep files, with the error each gives: one row per input, ``input -> exception, message``.
A row whose exception is None is an input that must not fail but must lose nothing and run nothing it should
not: its attempt returns what became of the data, in words, and ``message`` matches those words.

Every error names what is wrong and where (the file and line, the folder, the parameter) before any work is
done; none is a parser's or urllib's traceback. Rows are cheap (no training, no data but a few files), so the
table can grow with every input a user trips on. The data-loss cases (two configs in one folder, torn lines
during a run, changed data) are in tests/test_store.py, where they run the real trainer.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

from sdlib import data, results, store, sweep  # noqa: E402
from sdlib.krr import KernelError  # noqa: E402
from sdlib.step import load_checkpoint  # noqa: E402
from sdlib.train import TrainConfig, run_chains  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOOD_RECORD = {"config_hash": "abc", "seed": 0, "chain": "shared", "step": 1, "alpha": 1.0, "val_acc": 0.5,
               "test_acc": 0.5, "config": {"alphas": [1.0]}}


def folder_with(tmp_path: Path, name: str, content: bytes | str) -> Path:
    directory = tmp_path / "r"
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


def sweep_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def pinned_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A config that needs no data before its folders are checked (its data fingerprint is pinned)."""
    settings = dict(epochs=1, seeds=(0,), steps=1, data_root=str(tmp_path / "no-data"), device="cpu",
                    data_fingerprint="0123456789abcdef", results_dir=str(tmp_path / "results"),
                    checkpoint_dir=str(tmp_path / "checkpoints"))
    return TrainConfig(**{**settings, **overrides})


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("")
    return path


def run_cli(tmp_path: Path, module: str, *args: str) -> None:
    """The command line in a subprocess: its stderr becomes the error (exit code 2 and no traceback checked)."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    raise ValueError(done.stderr.strip().splitlines()[-1])


def migrate_while_appending(t: Path) -> str:
    """scripts/migrate_results.py on a folder while another process appends a record through the store: the
    appender starts after the migration has read the file (while it computes the new hashes)."""
    import migrate_results

    folder = folder_with(t, "records.jsonl", "".join(json.dumps({**GOOD_RECORD, "seed": s}) + "\n"
                                                     for s in range(200)))
    appender = threading.Thread(target=store.ResultsStore(folder).append_record, args=({**GOOD_RECORD, "seed": 999},))
    original = migrate_results._config

    def config_then_append(*args):
        if appender.ident is None:
            appender.start()
            appender.join(timeout=1.0)  # an append that does not wait for the migration lands now
        return original(*args)

    migrate_results._config = config_then_append
    try:
        migrate_results.migrate(folder, "0123456789abcdef")
    finally:
        migrate_results._config = original
    appender.join()
    seeds = [row["seed"] for _, row in store.read_jsonl(folder / "records.jsonl")]
    return f"{len(seeds)} records, the one appended during the migration {'kept' if 999 in seeds else 'lost'}"


def migrate_other_data(t: Path) -> None:
    """Records trained on data of fingerprint fedcba9876543210, migrated with another fingerprint."""
    import migrate_results

    record = {**GOOD_RECORD, "data": {"fingerprint": "fedcba9876543210"},
              "config": {**GOOD_RECORD["config"], "data_fingerprint": "fedcba9876543210"}}
    folder = folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n" + json.dumps(record) + "\n")
    before = (folder / "records.jsonl").read_bytes()
    try:
        migrate_results.migrate(folder, "0123456789abcdef")
    finally:
        assert (folder / "records.jsonl").read_bytes() == before  # refused as a whole: nothing rewritten


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def planted_pickle(t: Path) -> None:
    """A cifar-10-batches-py/batches.meta whose unpickling runs a shell command (here: touch a file)."""
    import pickle

    folder = t / "data" / data.PICKLE_DIRNAME
    folder.mkdir(parents=True)
    for name in (*data.PICKLE_TRAIN_FILES, *data.PICKLE_TEST_FILES):
        (folder / name).write_bytes(b"")
    marker = t / "the-command-ran"
    (folder / data.PICKLE_META_FILE).write_bytes(pickle.dumps({"label_names": _RunsACommand(marker)}, protocol=2))
    try:
        data.load_cifar10(t / "data", "train")
    finally:
        assert not marker.exists(), "unpickling batches.meta ran its command"


def paths_with_tilde(t: Path) -> str:
    """Every path field given as ~/...: each must name a folder in the home folder, never a folder '~'."""
    config = TrainConfig(data_root="~/d", results_dir="~/r", checkpoint_dir="~/c")
    home = os.path.expanduser("~")
    return ", ".join(f"{name} " + ("in the home folder" if getattr(config, name) == os.path.join(home, short)
                                   else "not expanded")
                     for name, short in (("data_root", "d"), ("results_dir", "r"), ("checkpoint_dir", "c")))


def alpha_with_seven_digits(t: Path) -> str:
    """--alphas 0.1234567: the alpha a step trains with (its chain is named alpha=0.123457)."""
    import torch

    from sdlib.chains import _ChainRunner

    config = pinned_config(t, alphas=(0.1234567,), steps=2, include_alpha_hat=False)
    runner = _ChainRunner(config, torch.device("cpu"), False, None, store.ResultsStore(config.results_dir), "abc")
    alpha, _ = runner.alpha_for((0, config.chains[0], 2))
    return f"chain {config.chains[0]} trains with alpha {alpha!r}"


def records_and_newer_epochs_of_two_configs(t: Path) -> str:
    """A folder with records of config A and epochs of A, then newer epochs of config B (B still training)."""
    import warnings

    epoch = {"seed": 0, "chain": "shared", "step": 1, "epoch": 1, "val_acc": 0.5, "test_acc": 0.5}
    folder = folder_with(t, "records.jsonl", json.dumps({**GOOD_RECORD, "config_hash": "A"}) + "\n")
    (folder / "epochs.jsonl").write_text(json.dumps({**epoch, "config_hash": "A"}) + "\n"
                                         + json.dumps({**epoch, "config_hash": "B"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tables = set(results.load_records(folder)["config_hash"])
        curves = set(results.load_epochs(folder)["config_hash"])
    return f"records of {sorted(tables)}, epochs of {sorted(curves)}"


def sweep_dry_run_hash(t: Path) -> str:
    """python -m sdlib.sweep --executor local --profile fast --dry-run here (no GPU: the jobs run in float32)."""
    import contextlib
    import io

    import torch

    from sdlib.config import effective_config, resolve_device

    config = TrainConfig.from_profile("fast", **{k: v for k, v in vars(pinned_config(t)).items()
                                                 if k in ("data_root", "data_fingerprint", "results_dir",
                                                          "checkpoint_dir", "seeds", "steps")}, device="auto")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sweep._print_dry_run(config, {"executor": "local", "folder": str(t / "submitit")})
    shown = re.search(r"config_hash: (\w+)", printed.getvalue()).group(1)
    with pytest.warns(RuntimeWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        recorded = effective_config(config, resolve_device("auto")).config_hash()  # what run_chains records
    return "the dry run shows the hash the jobs record" if shown == recorded else \
        f"the dry run shows {shown}, the jobs record {recorded}"


def dry_run_without_checkpoints(t: Path) -> str:
    """Records of steps 1-2 but no checkpoints (deleted, or another machine's), then --steps 3 --dry-run."""
    from sdlib.chains import job_config_hash, pending_tasks

    config = pinned_config(t, steps=3, alphas=(0.0, 1.0), include_alpha_hat=True)
    rows = [{**GOOD_RECORD, "config_hash": job_config_hash(config), "seed": 0, "chain": chain, "step": step}
            for chain, step in (("shared", 1), ("alpha=0", 2), ("alpha=1", 2), ("alpha_hat", 2))]
    store.ResultsStore(config.results_dir).append(store.RECORDS_FILE, rows)
    pending = pending_tasks(config)
    return f"{len(pending)} of 7 pending: " + ", ".join(f"{c} {s}" for _, c, s in pending)


def image_folder_with_a_link(t: Path, target: str) -> None:
    """An ImageFolder copy with one image per class and a folder link train/cat/loop -> target."""
    from PIL import Image

    for split in ("train", "test"):
        for name in data.CIFAR10_CLASSES:
            (t / "d" / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(t / "d" / split / name / "0.png")
    os.symlink(target, t / "d" / "train" / "cat" / "loop")
    data.load_cifar10(t / "d", "train", cache=False)


def duplicate_points(solver: str, lam: float, step=1):
    """Kernel ridge regression on 11 points, two of them the same, with a tiny lam."""
    import numpy as np

    from sdlib.krr import SelfDistillation

    X = np.r_[np.linspace(0, 1, 10), 0.5]
    y = np.sin(2 * np.pi * X)
    return SelfDistillation(gamma=80.0, lam=lam, solver=solver).fit(X, y).predict(X, step=step, alpha=0.5)


def reordered_columns(t: Path):
    import numpy as np
    import pandas as pd

    from sdlib.krr import SelfDistillation

    frame = pd.DataFrame({"a": np.linspace(0, 1, 8), "b": np.linspace(1, 3, 8) ** 2})
    model = SelfDistillation(gamma=1.0, lam=0.1).fit(frame, np.arange(8.0))
    return model.predict(frame[["b", "a"]])


def notebook_parameters(notebook: str, setup: bool = False, **values) -> None:
    """The notebook's parameters cell, papermill's values over it, then its checking cell (no kernel needed) and,
    with ``setup``, the cell after it (the checks that relate two parameters)."""
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / f"{notebook}.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    namespace: dict = {}
    exec(code[0].source, namespace)
    namespace.update(values)
    for cell in code[1:3 if setup else 2]:
        exec(cell.source, namespace)


def read_during_an_append(t: Path) -> str:
    """load_records while another process appends a large record: the reader meets the last line half-written."""
    folder = folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n")
    line = json.dumps({**GOOD_RECORD, "seed": 1, "pad": "x" * 100_000}) + "\n"
    outcome = {}

    def read():
        try:
            outcome["seeds"] = sorted(int(seed) for seed in results.load_records(folder)["seed"].unique())
        except Exception as error:  # noqa: BLE001 - reported in the outcome
            outcome["error"] = f"{type(error).__name__}: {str(error)[:80]}"

    with store._locked(folder):  # the writer holds the lock while its one write is under way
        with open(folder / "records.jsonl", "ab") as handle:
            handle.write(line[:50_000].encode())
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=0.5)
        with open(folder / "records.jsonl", "ab") as handle:
            handle.write(line[50_000:].encode())
    reader.join()
    return f"the reader got {outcome['seeds']}" if "seeds" in outcome else f"the reader failed: {outcome['error']}"


def folder_in_place_of(t: Path, name: str) -> None:
    """A results_dir holding a folder where the store writes a file, then a run."""
    (t / "results" / name).mkdir(parents=True)
    run_chains(pinned_config(t), progress=False)


# (id: the input tried, a function of tmp_path that tries it, the exception, a regex of its message)
TABLE = [
    # --- data lost
    ("migrate while a record is appended",
     migrate_while_appending,
     None, r"^201 records, the one appended during the migration kept$"),
    ("migrate records trained on other data",
     migrate_other_data,
     ValueError, r"r/records\.jsonl, line 2: trained on data of fingerprint fedcba9876543210, not "
                 r"0123456789abcdef: .*nothing was changed"),
    # --- code run from data
    ("a CIFAR-10 pickle whose unpickling runs a command",
     planted_pickle,
     ValueError, r"batches\.meta' is not the published CIFAR-10 file \(its MD5 differs from torchvision's list\); "
                 r"a pickle can run code when read, so it is not read"),
    # --- silently wrong
    ("paths starting with ~ (results_dir, checkpoint_dir, data_root)",
     paths_with_tilde,
     None, r"^data_root in the home folder, results_dir in the home folder, checkpoint_dir in the home folder$"),
    ("--alphas 0.1234567 (more digits than a chain name holds)",
     alpha_with_seven_digits,
     None, r"^chain alpha=0\.123457 trains with alpha 0\.1234567$"),
    ("records of one config, newer epochs of another",
     records_and_newer_epochs_of_two_configs,
     None, r"^records of \['A'\], epochs of \['A'\]$"),
    ("sweep --dry-run of the fast profile where the jobs run without a GPU",
     sweep_dry_run_hash,
     None, r"^the dry run shows the hash the jobs record$"),
    ("--dry-run with records but no checkpoints",
     dry_run_without_checkpoints,
     None, r"^6 of 7 pending: shared 1, alpha=0 2, alpha_hat 2, alpha=0 3, alpha=1 3, alpha_hat 3$"),
    ("a folder link in a class folder to the folder above (ln -s .. train/cat/loop)",
     lambda t: image_folder_with_a_link(t, ".."),
     ValueError, r"train/cat/loop' is a symbolic link to '.*/d/train', a folder that contains it.*Remove the link"),
    ("a folder link in a class folder to another class (ln -s ../../dog train/cat/loop)",
     lambda t: image_folder_with_a_link(t, "../dog"),
     ValueError, r"train/cat/loop' is a symbolic link to '.*/d/train/dog', inside '.*/d/train': its images would "
                 r"be listed twice, under two classes"),
    ("KRR eigh: duplicate points with lam 1e-20",
     lambda t: duplicate_points("eigh", 1e-20),
     KernelError, r"lam = 1e-20 is below .*the round-off level of this Gram matrix .*use lam >= "),
    ("KRR eigh: duplicate points with lam 1e-300, the limit step = inf",
     lambda t: duplicate_points("eigh", 1e-300, step=math.inf),
     KernelError, r"lam = 1e-300 is below "),
    ("KRR cholesky: duplicate points with lam 1e-20 (the same rule as eigh)",
     lambda t: duplicate_points("cholesky", 1e-20),
     KernelError, r"lam = 1e-20 is below .*the round-off level of this Gram matrix"),
    ("KRR: a DataFrame's columns in another order at predict than at fit",
     reordered_columns,
     ValueError, r"The feature names should match those that were passed during fit"),
    ("notebook 05: -r train False (the string 'False')",
     lambda t: notebook_parameters("05_cifar10_self_distillation", train="False"),
     ValueError, r"parameter 'train' must be True or False, got 'False' \(a string: papermill's -r passes text"),
    ("notebook 01: table_alphas [0.5, 0.5000001] (one column as shown)",
     lambda t: notebook_parameters("01_toy_example", table_alphas=[0.5, 0.5000001]),
     ValueError, r"parameter 'table_alphas' must be a non-empty list of numbers >= 0 and <= 1 that differ as shown \(to the "
                 r"digits shown: 0\.5, 0\.5\)"),
    ("notebook 01: alphas [null]",
     lambda t: notebook_parameters("01_toy_example", alphas=[None]),
     ValueError, r"parameter 'alphas' must be a non-empty list of numbers >= 0 and <= 1 that differ as shown, got \[None\]"),
    ("notebook 02: panel_lams []",
     lambda t: notebook_parameters("02_eigenvalue_damping", panel_lams=[]),
     ValueError, r"parameter 'panel_lams' must be a non-empty list of numbers > 0 that differ as shown, got \[\]"),
    ("notebook 04: seed -1",
     lambda t: notebook_parameters("04_optimal_alpha", seed=-1),
     ValueError, r"parameter 'seed' must be an integer >= 0 and <= 4\.29497e\+09, got -1"),
    ("notebook 04: val_fraction 0.6 and test_fraction 0.5 (no training set left)",
     lambda t: notebook_parameters("04_optimal_alpha", setup=True, val_fraction=0.6, test_fraction=0.5),
     ValueError, r"val_fraction \+ test_fraction must be below 1 \(the rest is the training set\), got 0\.6 \+ 0\.5"),
    ("notebook 05: seeds 0 (not a list)",
     lambda t: notebook_parameters("05_cifar10_self_distillation", seeds=0),
     ValueError, r"parameter 'seeds' must be a non-empty list of integers >= 0 without repeats, got 0"),
    ("notebook 01: results_path a folder",
     lambda t: notebook_parameters("01_toy_example", results_path=str(t)),
     ValueError, r"parameter 'results_path' must be None or the path of a file to write, not of a folder"),
    # --- errors a user can act on
    ("records.jsonl read while a large record is appended",
     read_during_an_append,
     None, r"^the reader got \[0, 1\]$"),
    ("records.jsonl that is a folder, then a run",
     lambda t: folder_in_place_of(t, "records.jsonl"),
     store.NotWritableError, r"results_dir '.*results' holds a folder 'records\.jsonl' where the results store "
                             r"writes a file: move it away"),
    ("epochs.jsonl that is a folder, then a run",
     lambda t: folder_in_place_of(t, "epochs.jsonl"),
     store.NotWritableError, r"holds a folder 'epochs\.jsonl'"),
    ("the store's lock that is a folder, then a run",
     lambda t: folder_in_place_of(t, store.LOCK_FILE),
     store.NotWritableError, r"holds a folder '\.sdlib-store\.lock'"),
    ("load_records where records.jsonl is a folder",
     lambda t: (t / "r" / "records.jsonl").mkdir(parents=True) or results.load_records(t / "r"),
     store.StoreError, r"r/records\.jsonl is a folder, not a results file: move it away"),
    ("a sweep file that is not UTF-8",
     lambda t: sweep.load_sweep_config(folder_with(t, "s.yaml", b"profile: fast\n# caf\xe9\n") / "s.yaml"),
     ValueError, r"s\.yaml, line 2: not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
    ("a YAML sweep file with a merge key (<<: *b)",
     lambda t: "lr {0.lr:g}, epochs {0.epochs}".format(sweep.load_sweep_config(sweep_file(
         t, "s.yaml", "profile: fast\ntrain:\n  <<: {lr: 0.002, epochs: 2}\n  epochs: 3\n"))[0]),
     None, r"^lr 0\.002, epochs 3$"),
    ("--batch-size 1 (BatchNorm needs two images)",
     lambda t: TrainConfig(batch_size=1, teacher_bn="train"),
     ValueError, r"TrainConfig\.batch_size must be an integer >= 2 \(BatchNorm normalizes over the batch"),
    ("KRR: X of strings",
     lambda t: __import__("sdlib.krr", fromlist=["SelfDistillation"]).SelfDistillation().fit([["a"], ["b"]], [0, 1]),
     ValueError, r"^X: could not convert string to float: .*'a'"),
    ("KRR: X holding pd.NA",
     lambda t: __import__("sdlib.krr", fromlist=["SelfDistillation"]).SelfDistillation().fit(
         __import__("pandas").DataFrame({"x": [0.0, __import__("pandas").NA, 1.0]}, dtype=object), [0, 1, 2]),
     TypeError, r"^X: float\(\) argument must be a string or a real number, not 'NAType'"),
    # --- the results store and its readers
    ("records.jsonl with a torn last line",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n{\"seed\": 0, \"ch")),
     store.UnreadableLineError, r"r/records\.jsonl, line 2: not valid JSON .*delete that line.*skip_bad_lines=True"),
    ("epochs.jsonl line that is a list",
     lambda t: results.load_epochs(folder_with(t, "epochs.jsonl", "[1, 2]\n")),
     store.UnreadableLineError, r"epochs\.jsonl, line 1: expected a JSON object, got list"),
    ("records.jsonl with bytes that are not UTF-8",
     lambda t: results.load_records(folder_with(t, "records.jsonl", b"\xff\xfe{}\n")),
     store.UnreadableLineError, r"records\.jsonl, line 1: not UTF-8 text"),
    ("load_records of a config_hash not in the folder",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n"),
                                    config_hash="nope"),
     store.UnknownConfigError, r"config_hash 'nope' has no lines in .*present \(newest first\): abc \(profile None"),
    ("load_records of a profile not in the folder",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n"),
                                    profile="official"),
     store.UnknownConfigError, r"profile 'official' has no lines"),
    ("load_records with both config_hash and profile",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n"),
                                    config_hash="abc", profile="paper"),
     ValueError, "give config_hash or profile, not both"),
    ("load_records with config_hash=5",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n"), config_hash=5),
     ValueError, "config_hash must be a string"),
    ("load_records with skip_bad_lines='yes'",
     lambda t: results.load_records(folder_with(t, "records.jsonl", json.dumps(GOOD_RECORD) + "\n"),
                                    skip_bad_lines="yes"),
     ValueError, "skip_bad_lines must be True or False, got 'yes'"),
    ("a record appended without its seed",
     lambda t: store.ResultsStore(t).append_record({k: v for k, v in GOOD_RECORD.items() if k != "seed"}),
     ValueError, r"a line of records\.jsonl needs \['config_hash', 'seed', 'chain', 'step'\]; missing \['seed'\]"),
    # --- the trainer's folders and checkpoints, checked before any work
    ("results_dir that is a file",
     lambda t: run_chains(pinned_config(t, results_dir=str(a_file(t))), progress=False),
     store.NotWritableError, r"results_dir '.*a_file' is a file, not a directory: choose another results_dir"),
    ("checkpoint_dir that is a file",
     lambda t: run_chains(pinned_config(t, checkpoint_dir=str(a_file(t))), progress=False),
     store.NotWritableError, r"checkpoint_dir '.*a_file' is a file, not a directory"),
    ("results_dir inside a file",
     lambda t: run_chains(pinned_config(t, results_dir=str(a_file(t) / "results")), progress=False),
     store.NotWritableError, r"results_dir '.*a_file/results' (cannot be created: a parent of it is a file|is not "
                             r"writable)"),
    ("a checkpoint of random bytes",
     lambda t: load_checkpoint(folder_with(t, "step1.pt", random.Random(0).randbytes(2000)) / "step1.pt"),
     ValueError, r"checkpoint '.*step1\.pt' is unreadable \(.*\)\. Delete it \(rm '.*step1\.pt'\) and run again"),
    ("an empty checkpoint",
     lambda t: load_checkpoint(folder_with(t, "step2.state.pt", b"") / "step2.state.pt"),
     ValueError, r"checkpoint '.*step2\.state\.pt' is unreadable"),
    ("data_fingerprint that is not 16 hex digits",
     lambda t: TrainConfig(data_fingerprint="xyz"),
     ValueError, r"TrainConfig\.data_fingerprint must be None or 16 lower-case hex digits"),
    ("no data and no pinned fingerprint",
     lambda t: run_chains(pinned_config(t, data_fingerprint=None), progress=False),
     FileNotFoundError, r"CIFAR-10 \(train split\) not found under .*no-data"),
    ("train CLI: --results-dir a file",
     lambda t: run_cli(t, "sdlib.train", "--data-fingerprint", "0123456789abcdef", "--data-root", "none",
                       "--results-dir", str(a_file(t)), "--epochs", "1", "--steps", "1", "--seeds", "0"),
     ValueError, r"error: results_dir '.*a_file' is a file, not a directory"),
    ("train CLI: --data-fingerprint 12",
     lambda t: run_cli(t, "sdlib.train", "--data-fingerprint", "12", "--dry-run"),
     ValueError, r"error: TrainConfig\.data_fingerprint must be None or 16 lower-case hex digits"),
    # --- downloading
    ("download with timeout_s=0",
     lambda t: data.download_cifar10(t, timeout_s=0),
     ValueError, r"timeout_s must be a number of seconds > 0, got 0"),
    # --- sweep files
    ("a YAML sweep file with a key given twice",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.yaml", "train:\n  lr: 1e-3\n  lr: 2e-3\n")),
     ValueError, r"s\.yaml, line 3, column 3: not valid YAML: .*key 'lr' is given twice \(first at line 2\)"),
    ("a YAML sweep file with an unclosed list",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.yaml", "train:\n  seeds: [0, 1\nprofile: fast\n")),
     ValueError, r"s\.yaml, line 3, column 8: not valid YAML: while parsing a flow sequence"),
    ("a YAML sweep file indented with a tab",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.yaml", "train:\n\tepochs: 2\n")),
     ValueError, r"s\.yaml, line 2, column 1: not valid YAML: .*\(YAML indents with spaces, not tabs\)"),
    ("a YAML sweep file with lr: '1e-3' (quoted: a string)",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.yaml", "train:\n  lr: '1e-3'\n")),
     ValueError, r"TrainConfig\.lr must be a finite number > 0, got '1e-3'"),
    ("a JSON sweep file with a trailing comma",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.json", '{"train": {"epochs": 2,}}')),
     ValueError, r"s\.json, line 1, column 24: not valid JSON: Expecting property name"),
    ("a JSON sweep file with a key given twice",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.json", '{"profile": "fast", "profile": "paper"}')),
     ValueError, r"s\.json: key\(s\) \['profile'\] given twice in one object"),
    ("a sweep file ending in .txt",
     lambda t: sweep.load_sweep_config(sweep_file(t, "s.txt", "profile: fast\n")),
     ValueError, r"sweep file must end in \.json, \.yaml or \.yml, got 's\.txt'"),
    ("sweep CLI: --skip-bad-lines",
     lambda t: run_cli(t, "sdlib.sweep", "--skip-bad-lines", "--estimate", "100"),
     ValueError, r"--skip-bad-lines applies to python -m sdlib\.train only"),
    # --- migrating old records
    ("migrate a folder without records",
     lambda t: __import__("migrate_results").migrate(t, "0123456789abcdef"),
     ValueError, r"no records in .*records\.jsonl"),
]


@pytest.fixture(autouse=True)
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))


@pytest.mark.parametrize("attempt, error, message", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_bad_input(tmp_path, attempt, error, message):
    if error is None:  # nothing may fail, nothing may be lost: the attempt says what became of the data
        outcome = attempt(tmp_path)
        assert re.search(message, outcome), outcome
    else:
        with pytest.raises(error, match=message):
            attempt(tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


def test_the_table_names_distinct_inputs():
    assert len({row[0] for row in TABLE}) == len(TABLE) >= 25
