"""No result is lost or silently wrong: the append-only results store (sdlib.store) under the trainer, on tiny
real-image runs (32 training images, one epoch on the CPU; chapter 7's cnn4, whose steps take a tenth of a
ResNet-50's: the store does not depend on the network), data-loss cases first.

Each test reproduces a failure of the old store (named in its docstring) and fails on it: records replaced by a
run of another config (one after the other, or at the same time), epoch curves of two configs mixed without a
word, a torn line that stops every later run, records and teachers reused after the data changed, a decoded-image
cache that survives a same-size, same-mtime change of an image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sdlib import data as cifar  # noqa: E402
from sdlib import results, store  # noqa: E402
from sdlib.train import TrainConfig, pending_tasks, run_chains  # noqa: E402
from tiny import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def data_root(tiny_cifar_root, tmp_path):
    root = tmp_path / "cifar10"  # a private copy: tests edit images, loading writes a decode cache
    shutil.copytree(tiny_cifar_root, root, ignore=shutil.ignore_patterns(".sdlib_cache"))
    return root


def step1_config(tmp_path, data_root, **overrides) -> TrainConfig:
    """Step 1 only (the shared model), one epoch of 32 real images: a fraction of a second on one CPU thread."""
    settings = dict(epochs=1, steps=1, subset=32, n_val=20, alphas=(1.0,), include_alpha_hat=False, model="cnn4")
    settings.update(overrides)
    return tiny_config(tmp_path, data_root, **settings)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ data loss


def test_two_configs_one_after_the_other_keep_all_records(tmp_path, data_root):
    """Old store: the second config's run replaced the first's records (only a RuntimeWarning)."""
    first = step1_config(tmp_path, data_root, seeds=(0, 1))
    second = step1_config(tmp_path, data_root, seeds=(0, 1), lr=2e-4)
    assert first.config_hash() != second.config_hash() and first.results_dir == second.results_dir
    run_chains(first, progress=False)
    run_chains(second, progress=False)
    records = lines(Path(first.results_dir) / "records.jsonl")
    assert sorted((r["config_hash"], r["seed"]) for r in records) == sorted(
        (c.config_hash(), s) for c in (first, second) for s in (0, 1))
    assert pending_tasks(first) == [] and pending_tasks(second) == []  # neither has to train again
    with pytest.warns(RuntimeWarning, match=rf"holds 2 configs.*reading the newest, {second.config_hash()}"):
        newest = results.load_records(first.results_dir)
    assert set(newest["config_hash"]) == {second.config_hash()}
    assert set(results.load_records(first.results_dir, config_hash=first.config_hash())["seed"]) == {0, 1}
    # the epoch curves are never mixed: one config's, chosen like the records
    with pytest.warns(RuntimeWarning, match="holds 2 configs"):
        epochs = results.load_epochs(first.results_dir)
    assert set(epochs["config_hash"]) == {second.config_hash()} and len(epochs) == 2
    assert len(results.load_epochs(first.results_dir, config_hash=first.config_hash())) == 2


_RUN = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny import tiny_config
from sdlib.train import run_chains
config = tiny_config(Path({tmp!r}), Path({data!r}), epochs=1, steps=1, subset=32, n_val=20, alphas=(1.0,),
                     include_alpha_hat=False, seeds=(0, 1), lr={lr!r})  # ResNet-50: steps long enough to overlap
print(len(run_chains(config, progress=False)), config.config_hash())
"""


def test_two_configs_at_the_same_time_keep_all_records(tmp_path, data_root):
    """Old store: both runs printed "2 records" and one config's records were gone; epochs.jsonl mixed both."""
    cifar.load_splits(data_root, n_val=20, subset=32)  # the decode cache, before two processes race to write it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, "-c", _RUN.format(tests=str(REPO / "tests"), tmp=str(tmp_path),
                                                                 data=str(data_root), lr=lr)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for lr in (1e-4, 3e-4)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    hashes = {out.split()[1] for out, _ in outputs}
    assert len(hashes) == 2
    results_dir = tmp_path / "results"
    records = lines(results_dir / "records.jsonl")
    assert sorted((r["config_hash"], r["seed"]) for r in records) == sorted((h, s) for h in hashes for s in (0, 1))
    epochs = lines(results_dir / "epochs.jsonl")
    assert sorted((e["config_hash"], e["seed"]) for e in epochs) == sorted((h, s) for h in hashes for s in (0, 1))
    for h in hashes:  # each config reads back its own two records and two epochs, nothing of the other
        assert set(results.load_records(results_dir, config_hash=h)["seed"]) == {0, 1}
        assert set(results.load_epochs(results_dir, config_hash=h)["config_hash"]) == {h}
    assert not list(results_dir.glob("*.lock")) and not list(results_dir.glob("*.tmp"))


_APPEND = """
import sys
from sdlib.store import ResultsStore
directory, worker = sys.argv[1], int(sys.argv[2])
s = ResultsStore(directory)
for i in range(100):  # lines longer than a pipe buffer: one write() is not atomic by itself
    s.append_epoch({"config_hash": f"h{worker}", "seed": worker, "chain": "shared", "step": 1, "epoch": i,
                    "padding": "x" * 5000})
"""


def test_concurrent_appends_lose_and_tear_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, "-c", _APPEND, str(tmp_path), str(w)], env=env) for w in range(4)]
    assert [w.wait(120) for w in workers] == [0] * 4
    rows = [row for _, row in store.read_jsonl(tmp_path / "epochs.jsonl")]  # raises on a torn line
    assert sorted((r["seed"], r["epoch"]) for r in rows) == [(w, i) for w in range(4) for i in range(100)]
    assert not list(tmp_path.glob("*.lock"))  # the lock file goes with the last release


def test_a_redone_epoch_and_a_re_recorded_step_read_once(tmp_path, data_root):
    """A crash between the final checkpoint and the record, or an epoch trained again after a resume: the
    append-only store writes the line again, and readers keep the last."""
    config = step1_config(tmp_path, data_root)
    run_chains(config, progress=False)
    results_dir = Path(config.results_dir)
    records_file = results_dir / "records.jsonl"
    # the record is lost (a crash right after the final checkpoint): the next run records it again
    records_file.write_text("")
    again = run_chains(config, progress=False)
    assert len(lines(records_file)) == 1 and again[0]["config_hash"] == config.config_hash()
    store.ResultsStore(results_dir).append_record({**again[0], "test_acc": 0.5})
    store.ResultsStore(results_dir).append_epoch({**lines(results_dir / "epochs.jsonl")[0], "test_acc": 0.25})
    assert len(lines(records_file)) == 2 and len(lines(results_dir / "epochs.jsonl")) == 2
    records = results.load_records(results_dir)
    assert len(records) == 1 and records["test_acc"].item() == 0.5  # the shared record, as step 1 of alpha=1
    epochs = results.load_epochs(results_dir)
    assert len(epochs) == 1 and epochs["test_acc"].item() == 0.25


def test_a_torn_line_is_named_and_skipped_only_on_request(tmp_path, data_root):
    """Old store: "Expecting value: line 1 column 1079" without a file name, and with epochs.jsonl torn every
    rerun trained one epoch and then died."""
    config = step1_config(tmp_path, data_root, seeds=(0, 1))
    run_chains(config, progress=False)
    results_dir = Path(config.results_dir)
    for name in ("records.jsonl", "epochs.jsonl"):
        text = (results_dir / name).read_text()
        (results_dir / name).write_text(text[: len(text) - 40])  # the last line torn mid-write
    extended = step1_config(tmp_path, data_root, seeds=(0, 1, 2))
    with pytest.raises(store.UnreadableLineError, match=r"records\.jsonl, line 2: not valid JSON.*delete that line"):
        run_chains(extended, progress=False)
    with pytest.raises(ValueError, match=r"epochs\.jsonl, line 2: not valid JSON"):
        results.load_epochs(results_dir)
    with pytest.warns(RuntimeWarning, match=r"records\.jsonl: skipped 1 unreadable line\(s\): line 2"):
        done = run_chains(extended, progress=False, skip_bad_lines=True)  # seed 1 is trained again, seed 2 new
    assert [r["seed"] for r in done] == [0, 1, 2]
    # the torn lines stay lines of their own: the records appended after them are intact
    with pytest.warns(RuntimeWarning, match="skipped 1"):
        records = results.load_records(results_dir, skip_bad_lines=True)
    assert set(records["seed"]) == {0, 1, 2}
    # seed 1 was re-recorded from its final checkpoint, not trained again: its torn epoch line stays unreadable
    with pytest.warns(RuntimeWarning, match="skipped 1"):
        assert sorted(results.load_epochs(results_dir, skip_bad_lines=True)["seed"]) == [0, 2]


# ------------------------------------------------------------------------------------------ the data's identity


def test_other_data_under_the_same_path_reuse_nothing(tmp_path, data_root):
    """Old config_hash: after data_root pointed at other images a rerun said "nothing to train" and the next
    step trained on the new data with the old teachers."""
    config = step1_config(tmp_path, data_root)
    before = config.config_hash()
    run_chains(config, progress=False)
    assert pending_tasks(config) == []
    # other images under the same path: two training images swap their bytes (same sizes, same class folders)
    cat = sorted((data_root / "train" / "cat").iterdir())[0]
    dog = sorted((data_root / "train" / "dog").iterdir())[0]
    cat_bytes, dog_bytes = cat.read_bytes(), dog.read_bytes()
    cat.write_bytes(dog_bytes)
    dog.write_bytes(cat_bytes)
    after = config.config_hash()
    assert after != before
    assert pending_tasks(config) == [(0, "shared", 1)]  # nothing of the old data counts
    record = run_chains(config, progress=False)[0]
    assert record["config_hash"] == after and record["data"]["fingerprint"] == cifar.data_fingerprint(data_root)
    assert (Path(config.checkpoint_dir) / after / "seed0" / "shared" / "step1.pt").is_file()  # its own teacher
    # the same files elsewhere (a copy, a move): the same hash, and nothing to train
    moved = tmp_path / "elsewhere"
    shutil.copytree(data_root, moved)
    assert step1_config(tmp_path, moved).config_hash() == after
    assert pending_tasks(step1_config(tmp_path, moved)) == []


def test_a_pinned_data_fingerprint_needs_no_data_and_refuses_other_data(tmp_path, data_root):
    fingerprint = cifar.data_fingerprint(data_root)
    config = step1_config(tmp_path, data_root)
    pinned = step1_config(tmp_path, tmp_path / "absent", data_fingerprint=fingerprint)
    assert pinned.config_hash() == config.config_hash()  # no data read: the sweep file's case
    run_chains(config, progress=False)
    assert pending_tasks(pinned) == [] and run_chains(pinned, progress=False)[0]["seed"] == 0  # nothing to train
    other = step1_config(tmp_path, data_root, data_fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="has fingerprint .* but the config's data_fingerprint is 0123456789abcdef"):
        run_chains(other, progress=False)


def test_decode_cache_notices_a_same_size_same_mtime_change(data_root):
    """Old cache key: file names, sizes and mtimes; an image rewritten at its size and mtime kept its old pixels."""
    x_before, _ = cifar.load_cifar10(data_root, "test")
    images = sorted((data_root / "test" / "ship").iterdir())
    a = max(images, key=lambda p: p.stat().st_size)
    b = min(images, key=lambda p: p.stat().st_size)
    st = a.stat()
    # b's JPEG, padded with zeros after its end marker (which decoders ignore) to a's size; a's mtime restored
    a.write_bytes(b.read_bytes().ljust(st.st_size, b"\0"))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    x_after, _ = cifar.load_cifar10(data_root, "test")
    index = images.index(a) + 8 * 10  # ship is class 8; 10 test images per class
    x_b = cifar.load_cifar10(data_root, "test", cache=False)[0][index]
    assert not torch.equal(x_after[index], x_before[index]) and torch.equal(x_after[index], x_b)


# --------------------------------------------------------------------------------------------- safe defaults


def test_results_go_to_runs_unless_named(tmp_path):
    """Old default: results/cifar10, the committed results the book plots."""
    from sdlib import sweep, train

    assert TrainConfig().results_dir == "runs/cifar10"
    assert TrainConfig.from_profile("fast").results_dir == "runs/cifar10"
    assert "results_dir" not in train.config_overrides(train._parser().parse_args([]))
    config, _ = sweep.load_sweep_config(None)
    assert config.results_dir == "runs/cifar10"
    assert "runs/" in (REPO / ".gitignore").read_text().split()
    for pattern in ("*.lock", "*.tmp"):
        assert pattern in (REPO / ".gitignore").read_text().split()


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path, data_root):
    config = step1_config(tmp_path, data_root)
    step_dir = Path(config.checkpoint_dir) / config.config_hash() / "seed0" / "shared"
    step_dir.mkdir(parents=True)
    stale = [step_dir / "step1.state.pt.k2j4.tmp", step_dir / "step1.pt.x9a1.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what kill -9 during torch.save leaves
    keep = step_dir / "notes.tmp"  # not a temporary of this step's files
    keep.write_text("mine")
    run_chains(config, progress=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not list(Path(config.results_dir).glob("*.lock"))


def test_unwritable_and_file_valued_dirs_fail_before_any_work(tmp_path, data_root, monkeypatch):
    """Old: raw PermissionError / FileExistsError, the checkpoint dir's only after step 1 had trained."""
    from sdlib import step as step_module

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the folders")

    monkeypatch.setattr(step_module, "distill_step", no_training)
    monkeypatch.setattr(step_module, "distill_group", no_training)
    monkeypatch.setattr("sdlib.chains.distill_group", no_training)  # run_chains trains through distill_group
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    if os.geteuid() == 0:  # root writes anywhere a permission allows: use a read-only file system instead
        denied = Path("/sys/sdlib-results")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        denied = locked / "results"
    cases = [
        ({"results_dir": str(a_file)}, rf"results_dir '{a_file}' is a file, not a directory"),
        ({"checkpoint_dir": str(a_file)}, rf"checkpoint_dir '{a_file}' is a file, not a directory"),
        ({"results_dir": str(a_file / "sub")}, "results_dir .* (a parent of it is a file|is not writable)"),
        ({"results_dir": str(denied)}, rf"results_dir '{denied}' .*not writable.*choose another results_dir"),
        ({"checkpoint_dir": str(denied)}, rf"checkpoint_dir '{denied}' .*not writable"),
    ]
    for overrides, message in cases:
        with pytest.raises(store.NotWritableError, match=message):
            run_chains(step1_config(tmp_path, data_root, **overrides), progress=False)


def test_a_corrupt_checkpoint_names_its_path_and_what_to_delete(tmp_path, data_root):
    config = step1_config(tmp_path, data_root, steps=2, alphas=(0.0,))
    run_chains(dataclasses_replace(config, steps=1), progress=False)
    teacher = Path(config.checkpoint_dir) / config.config_hash() / "seed0" / "shared" / "step1.pt"
    teacher.write_bytes(teacher.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=rf"checkpoint '{teacher}' is unreadable .*Delete it \(rm '{teacher}'\)"):
        run_chains(config, progress=False)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# ------------------------------------------------------------------------------------ migrating old records


def test_migration_gives_old_records_the_hash_with_the_data(tmp_path, data_root):
    """Records of the old config_hash (no data in it) are found again after scripts/migrate_results.py."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import migrate_results
    finally:
        sys.path.remove(str(REPO / "scripts"))
    config = step1_config(tmp_path, data_root, seeds=(0, 1))
    run_chains(config, progress=False)
    results_dir = Path(config.results_dir)
    # as the old code wrote them: its hash, no fingerprint in config or data
    legacy = "57d110a77b06"
    for name in ("records.jsonl", "epochs.jsonl"):
        rows = lines(results_dir / name)
        for row in rows:
            row["config_hash"] = legacy
            if name == "records.jsonl":
                row["data"].pop("fingerprint")
        (results_dir / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert pending_tasks(config) == [(0, "shared", 1), (1, "shared", 1)]  # the current code finds nothing
    fingerprint = cifar.data_fingerprint(data_root)
    assert migrate_results.main([str(results_dir), "--data-root", str(data_root)]) == {
        legacy: config.config_hash()}
    assert pending_tasks(config) == []
    records = lines(results_dir / "records.jsonl")
    assert all(r["legacy_config_hash"] == legacy and r["config"]["data_fingerprint"] == fingerprint
               and r["data"]["fingerprint"] == fingerprint for r in records)
    assert {e["config_hash"] for e in lines(results_dir / "epochs.jsonl")} == {config.config_hash()}
    before = (results_dir / "records.jsonl").read_text()
    assert migrate_results.main([str(results_dir), "--data-fingerprint", fingerprint]) == {}  # idempotent
    assert (results_dir / "records.jsonl").read_text() == before


def test_committed_results_carry_the_hash_of_their_config_and_data():
    """The committed records (migrated) are those of sweeps/h100-fast-4epochs.yaml, whose fingerprint is the
    shared JPEG copy's; the book reads them (one config in the folder: no warning)."""
    import warnings

    from sdlib import sweep

    config, _ = sweep.load_sweep_config(REPO / "sweeps" / "h100-fast-4epochs.yaml")
    records = lines(REPO / "results" / "cifar10" / "records.jsonl")
    assert {r["config_hash"] for r in records} == {config.config_hash()}
    assert {r["legacy_config_hash"] for r in records} == {"57d110a77b06"}
    assert {r["data"]["fingerprint"] for r in records} == {config.data_fingerprint}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(results.load_records(REPO / "results" / "cifar10")) > 0
        assert len(results.load_epochs(REPO / "results" / "cifar10")) == 304
        assert len(results.load_epochs(REPO / "results" / "cifar10", probes=True)) == 48


def test_the_pinned_fingerprint_is_the_shared_jpeg_copy(cifar_jpeg_root):
    from sdlib import sweep

    config, _ = sweep.load_sweep_config(REPO / "sweeps" / "h100-fast-4epochs.yaml")
    assert cifar.data_fingerprint(cifar_jpeg_root) == config.data_fingerprint


@pytest.mark.parametrize("train, results_dir, expected", [
    (False, None, "results/cifar10"),  # the book reads the committed results
    (True, None, "runs/cifar10"),  # a training run goes to the git-ignored folder
    (True, "results/cifar10", "results/cifar10"),  # ... and into the committed one only when it is named
])
def test_notebook_05_trains_into_runs_unless_named(train, results_dir, expected, monkeypatch):
    """Old: notebook 05's results_dir defaulted to results/cifar10 for training too (the README's "smaller run"
    overwrote the committed records)."""
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "05_cifar10_self_distillation.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    namespace = {}
    exec(next(c for c in code if "parameters" in c.metadata.get("tags", [])).source, namespace)  # noqa: S102
    assert namespace["results_dir"] is None
    namespace.update(train=train, results_dir=results_dir)
    setup = next(c for c in code if "results_path =" in c.source)
    monkeypatch.chdir(REPO / "notebooks")
    # the notebook's own cell that resolves the folder (less its IPython magics, which only configure figures)
    source = "\n".join(line for line in setup.source.splitlines() if not line.lstrip().startswith("%"))
    exec(source, namespace)  # noqa: S102
    assert namespace["results_path"] == REPO / expected


def test_temporaries_of_the_old_store_and_of_a_killed_decode_are_removed(tmp_path, data_root):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    leftovers = [results_dir / "records.jsonl.lock", results_dir / "epochs.jsonl.ab12.tmp"]
    for path in leftovers:
        path.write_text("x")
    store.ResultsStore(results_dir).check_writable()
    assert not any(p.exists() for p in leftovers)
    cache = data_root / ".sdlib_cache"
    cache.mkdir()
    old, fresh = cache / "test-imagefolder-0000.pt.k3.tmp", cache / "test-imagefolder-1111.pt.k4.tmp"
    for path in (old, fresh):
        path.write_bytes(b"\0" * 100)
    os.utime(old, (0, 0))  # a decode killed long ago; the fresh one may be another process saving now
    cifar.load_cifar10(data_root, "test")
    assert not old.exists() and fresh.exists()


def test_store_benchmark_runs(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import store_append
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    timings = store_append.main(["--lines", "200", "--repeat", "2", "--dir", str(tmp_path)])
    assert set(timings) == {"append", "full rewrite"} and all(t > 0 for t in timings.values())
    assert "ms per epoch line (200 lines in the file)" in capsys.readouterr().out
