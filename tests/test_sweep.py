"""The grid as cluster jobs (sdlib.sweep with submitit's local executor) and papermill sweeps.

One tiny real-image grid (chapter 7's cnn4 on CPU: what is tested is the jobs' wiring, the same for any network,
and a cnn4 step takes a tenth of a ResNet-50's; 64 training, 40 validation, 64 test images, batch 32, 2 epochs,
2 steps, alphas 0 and 1 plus alpha-hat, one seed) is trained twice: sequentially by run_chains in this process
(the reference), and as submitit jobs (one step-1 job, then three chain jobs). In the middle of its step 2 one
chain job is preempted through submitit's own signal / checkpoint / requeue path, and another is killed outright
(SIGKILL: no signal handler runs); submitting the sweep again then submits only the killed job. The sweep must give
the reference's results exactly, with the chain jobs started only after the step-1 job finished and both
interrupted jobs resuming from their epoch checkpoints rather than starting over. A fake ``sbatch`` checks the
SLURM dependency wiring, and the settings read from sweep files.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import nbformat
import papermill
import pytest
import torch
import yaml

from sdlib import results, sweep
from sdlib.train import TrainConfig, pending_tasks, run_chains
from tiny import tiny_config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "05_cifar10_self_distillation.ipynb"
SCRIPT = REPO / "scripts" / "papermill_sweep.py"
RESULT_FIELDS = ("alpha", "alpha_hat", "probe_val_acc", "probe_test_acc", "epochs", "val_acc", "val_loss",
                 "test_acc", "test_loss", "train_loss")
KEYS = {(0, "shared", 1), (0, "alpha=0", 2), (0, "alpha=1", 2), (0, "alpha_hat", 2)}
_spec = importlib.util.spec_from_file_location("papermill_sweep", SCRIPT)
papermill_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(papermill_sweep)

# The preemption hook below is defined in this module: ship it to the job processes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class InterruptOnce:
    """on_event hook of a ChainJob: on its first attempt, right after ``epoch`` of (chain, step) has been
    checkpointed, send this job process submitit's preemption signal (``how="preempt"``: USR2, as SLURM would),
    or SIGKILL (``how="kill"``: an out-of-memory kill or a lost node, no handler runs, no requeue)."""

    def __init__(self, chain: str, step: int, epoch: int, how: str):
        self.chain, self.step, self.epoch, self.how = chain, step, epoch, how

    def __call__(self, event):
        if (event["event"], event["chain"], event["step"], event["epoch"], event["attempt"]) == \
                ("epoch_end", self.chain, self.step, self.epoch, 0):
            from submitit.local.local import LocalJobEnvironment

            os.kill(os.getpid(), LocalJobEnvironment._usr_sig() if self.how == "preempt" else signal.SIGKILL)


class Hooks:
    def __init__(self, *hooks):
        self.hooks = hooks

    def __call__(self, event):
        for hook in self.hooks:
            hook(event)


@pytest.fixture(scope="module")
def data_root(tiny_cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data") / "cifar10"  # a private copy: loading writes a decode cache
    shutil.copytree(tiny_cifar_root, root)
    return root


@pytest.fixture(scope="module")
def grid(data_root, tmp_path_factory):
    """The reference (config, records) and the sweep: its config, the first submission's jobs, the error that
    wait() raised for the killed job, the second submission's jobs, and the outcome of every chain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine; the jobs get num_threads=1 too (same arithmetic)
    root = tmp_path_factory.mktemp("sweep")
    try:
        reference = tiny_config(root / "reference", data_root, model="cnn4")
        reference_records = run_chains(reference, progress=False)
        config = tiny_config(root / "sweep", data_root, model="cnn4")
        options = dict(num_threads=1, progress=False, timeout_min=20)
        interrupt = Hooks(InterruptOnce("alpha=1", 2, 1, "preempt"), InterruptOnce("alpha=0", 2, 1, "kill"))
        jobs = sweep.submit_sweep(config, "local", root / "submitit", on_event=interrupt, **options)
        with pytest.raises(sweep.SweepError) as failure:
            sweep.wait(jobs, progress=False)
        resumed = sweep.submit_sweep(config, "local", root / "submitit", **options)  # the same sweep, again
        outcomes = [o for o in failure.value.results if o is not None] + sweep.wait(resumed, progress=False)
        yield SimpleNamespace(reference=reference, reference_records=reference_records, config=config, jobs=jobs,
                              failure=failure.value, resumed=resumed, outcomes=outcomes,
                              submitit=root / "submitit")
    finally:
        torch.set_num_threads(threads)
        for folder in ("reference", "sweep"):
            shutil.rmtree(root / folder / "checkpoints", ignore_errors=True)


def test_jobs_and_dependencies(grid):
    config, jobs, outcomes = grid.config, grid.jobs, grid.outcomes
    assert [(j.seed, j.chain) for j in jobs] == [(0, "shared"), (0, "alpha=0"), (0, "alpha=1"), (0, "alpha_hat")]
    assert len({j.job.job_id for j in jobs}) == 4
    by_chain = {o["chain"]: o for o in outcomes}
    assert sorted(by_chain) == ["alpha=0", "alpha=1", "alpha_hat", "shared"] and len(outcomes) == 4
    step1 = by_chain["shared"]
    assert step1["trained"] == [("shared", 1, 1), ("shared", 1, 2)]
    for chain in ("alpha=0", "alpha=1", "alpha_hat"):
        # started after the step-1 job had finished, and reused its model instead of training step 1 again
        assert by_chain[chain]["started_at"] >= step1["finished_at"], chain
        assert all(t[0] != "shared" for t in by_chain[chain]["trained"]), chain
        shared_record = next(r for r in by_chain[chain]["records"] if r["chain"] == "shared")
        assert shared_record == step1["records"][0]
    # every job cut the grid to its seed and chain, under one config_hash
    assert {r["config_hash"] for o in outcomes for r in o["records"]} == {config.config_hash()}


def test_preempted_job_resumed_from_its_epoch_checkpoint(grid):
    config, jobs, outcomes = grid.config, grid.jobs, grid.outcomes
    by_chain = {o["chain"]: o for o in outcomes}
    # the alpha=1 job was requeued once by submitit and its second attempt trained epoch 2 only
    assert by_chain["alpha=1"]["attempt"] == 1
    assert by_chain["alpha=1"]["trained"] == [("alpha=1", 2, 2)]
    # the alpha-hat job trained its own alpha = 0 probe, then its step
    assert by_chain["alpha_hat"]["attempt"] == 0
    assert by_chain["alpha_hat"]["trained"] == [("alpha_hat_probe", 2, 1), ("alpha_hat_probe", 2, 2),
                                                ("alpha_hat", 2, 1), ("alpha_hat", 2, 2)]
    log = (jobs[2].job.stdout() or "") + (jobs[2].job.stderr() or "")
    assert "Calling checkpoint method" in log and "Requeued job" in log
    # no resumable state left behind, no epoch logged twice
    assert not list(Path(config.checkpoint_dir).rglob("*.state.pt"))
    epochs = read_jsonl(Path(config.results_dir) / "epochs.jsonl")
    assert sorted((e["chain"], e["step"], e["epoch"]) for e in epochs) == sorted(
        [("shared", 1, 1), ("shared", 1, 2), ("alpha=0", 2, 1), ("alpha=0", 2, 2), ("alpha=1", 2, 1),
         ("alpha=1", 2, 2), ("alpha_hat", 2, 1), ("alpha_hat", 2, 2)])


def test_killed_job_resumes_when_the_sweep_is_submitted_again(grid, tmp_path):
    config, jobs, failure = grid.config, grid.jobs, grid.failure
    # wait() waited for every job, then named the killed one (and only it) with its log file
    assert [j.name for j in failure.failed] == ["seed0-alpha=0"] and failure.failed[0] is jobs[1]
    assert f"sweep job seed0-alpha=0 (id {jobs[1].job.job_id}) failed (logs: " in str(failure)
    assert "1 of 4 sweep job(s) failed; submit the sweep again" in str(failure)
    assert [r is None for r in failure.results] == [False, True, False, False]
    # the second submission left out the three finished jobs; the killed job went on from its checkpoint
    assert [(j.seed, j.chain) for j in grid.resumed] == [(0, "alpha=0")]
    outcome = next(o for o in grid.outcomes if o["chain"] == "alpha=0")
    assert outcome["attempt"] == 0 and outcome["trained"] == [("alpha=0", 2, 2)]
    # a finished grid: nothing left to submit
    assert pending_tasks(config) == []
    assert sweep.submit_sweep(config, "local", tmp_path / "submitit", progress=False) == []


def test_aggregated_results_equal_a_sequential_run(grid):
    reference, reference_records, config = grid.reference, grid.reference_records, grid.config
    assert config.config_hash() == reference.config_hash()
    records = read_jsonl(Path(config.results_dir) / "records.jsonl")
    ours = {(r["seed"], r["chain"], r["step"]): r for r in records}
    theirs = {(r["seed"], r["chain"], r["step"]): r for r in reference_records}
    assert len(records) == len(ours) and set(ours) == set(theirs) == KEYS
    for key in KEYS:
        assert {k: ours[key][k] for k in RESULT_FIELDS} == {k: theirs[key][k] for k in RESULT_FIELDS}, key
    # what the notebook aggregates
    table = results.load_records(config.results_dir)
    expected = results.load_records(reference.results_dir)
    columns = ["seed", "chain", "step", *RESULT_FIELDS]
    assert table[columns].equals(expected[columns])
    images_per_s = [r["images_per_s"] for r in records]
    print(f"\nCPU training throughput in the sweep jobs (1 thread, cnn4, batch 32): "
          f"{min(images_per_s):.1f} to {max(images_per_s):.1f} images/s")


def test_notebook_trains_through_the_sweep(grid, tmp_path):
    """Notebook 05 with executor="local": the missing chain of a results folder trained as a sweep job."""
    config, reference_records = grid.config, grid.reference_records
    results_dir = tmp_path / "results"
    shutil.copytree(config.results_dir, results_dir)
    for name in ("records.jsonl", "epochs.jsonl"):  # as if the alpha=1 chain had never run
        rows = [r for r in read_jsonl(results_dir / name) if r["chain"] != "alpha=1"]
        (results_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trained.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False,
        parameters=dict(train=True, executor="local", profile="paper", model="cnn4", epochs=2, batch_size=32, seeds=[0], steps=2,
                        alphas=[0.0, 1.0], include_alpha_hat=True, n_val=40, subset=64, device="cpu",
                        data_root=config.data_root, results_dir=str(results_dir),
                        checkpoint_dir=str(tmp_path / "checkpoints"),  # alpha = 1 needs no teacher
                        sweep_options={"num_threads": 1, "timeout_min": 20, "folder": str(tmp_path / "submitit")}))
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")
    assert "1 unfinished job(s) submitted (local)" in text and "seed0-alpha=1 (" in text
    records = {(r["seed"], r["chain"], r["step"]): r for r in read_jsonl(results_dir / "records.jsonl")}
    assert set(records) == KEYS
    expected = next(r for r in reference_records if r["chain"] == "alpha=1")
    assert {k: records[(0, "alpha=1", 2)][k] for k in RESULT_FIELDS} == {k: expected[k] for k in RESULT_FIELDS}
    assert f"6 (seed, chain, step) rows from {results_dir / 'records.jsonl'}" in text  # and it reported them


def test_papermill_sweep_keeps_every_executed_notebook(grid, tmp_path):
    config = grid.config
    empty = tmp_path / "no_results"
    sets = tmp_path / "sets.yaml"
    sets.write_text(f"- name: sweep-report\n  parameters:\n    results_dir: {config.results_dir}\n"
                    f"    figure_path: {tmp_path / 'summary.png'}\n"
                    f"- name: empty\n  parameters:\n    results_dir: {empty}\n")
    out = tmp_path / "runs" / "papermill"
    done = subprocess.run([sys.executable, str(SCRIPT), str(sets), "--output-dir", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["empty.ipynb", "sweep-report.ipynb"]

    def text_of(name):
        nb = nbformat.read(out / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code)  # executed to the end
        injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
        return injected[0].source, "".join(o.get("text", "") for c in code for o in c.get("outputs", [])
                                            if o.output_type == "stream")

    injected, text = text_of("sweep-report.ipynb")
    assert json.dumps(config.results_dir) in injected
    assert f"6 (seed, chain, step) rows from {Path(config.results_dir) / 'records.jsonl'}" in text
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    injected, text = text_of("empty.ipynb")
    assert json.dumps(str(empty)) in injected and results.no_results_message(empty) in text


# ----------------------------------------------------------------------------------- SLURM wiring, bad input


FAKE_SBATCH = """#!/bin/sh
# Stands in for sbatch: keeps the script, answers like sbatch.
n=$(ls "$SBATCH_LOG" | wc -l)
cp "$1" "$SBATCH_LOG/$n.sh"
echo "Submitted batch job $((1000 + n))"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch and srun stand-ins on PATH; returns the folder where every submitted sbatch script is kept
    (0.sh, 1.sh, ... in submission order; job ids 1000, 1001, ...)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir(), log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    return log


def sbatch_scripts(log: Path) -> list[str]:
    return [(log / f"{k}.sh").read_text() for k in range(len(list(log.iterdir())))]


def test_slurm_chain_arrays_depend_on_their_step1_job(tmp_path, fake_slurm):
    config = tiny_config(tmp_path, tmp_path / "data", seeds=(0, 1))
    jobs = sweep.submit_sweep(config, "slurm", tmp_path / "submitit", partition="gpu", gpus_per_job=1,
                              timeout_min=600, cpus_per_job=8, mem_gb=32, array_parallelism=2,
                              slurm_parameters={"account": "proj"})
    assert [(j.seed, j.chain, j.job.job_id) for j in jobs] == [
        (0, "shared", "1000_0"), (1, "shared", "1000_1"),
        (0, "alpha=0", "1001_0"), (0, "alpha=1", "1001_1"), (0, "alpha_hat", "1001_2"),
        (1, "alpha=0", "1002_0"), (1, "alpha=1", "1002_1"), (1, "alpha_hat", "1002_2")]
    scripts = sbatch_scripts(fake_slurm)
    assert len(scripts) == 3
    for script in scripts:
        for line in ("--partition=gpu", "--time=600", "--cpus-per-task=8", "--mem=32GB", "--account=proj",
                     "--gpus-per-node=1"):
            assert f"#SBATCH {line}" in script, (line, script)
    assert "#SBATCH --array=0-1%2" in scripts[0] and "--dependency" not in scripts[0]
    for k, step1 in ((1, "1000_0"), (2, "1000_1")):
        assert "#SBATCH --array=0-2%2" in scripts[k]
        assert f"#SBATCH --dependency=afterok:{step1}" in scripts[k]
        assert "#SBATCH --kill-on-invalid-dep=yes" in scripts[k]
    # each job is a checkpointable ChainJob cut to its seed and chain, under the grid's config_hash
    pickled = cloudpickle.loads(jobs[4].job.paths.submitted_pickle.read_bytes())
    assert isinstance(pickled.function, sweep.ChainJob) and hasattr(pickled.function, "checkpoint")
    job_config = pickled.function.config
    assert (job_config.seeds, job_config.alphas, job_config.include_alpha_hat) == ((0,), (), True)
    assert job_config.config_hash() == config.config_hash()


def test_slurm_resubmission_leaves_out_finished_jobs(tmp_path, fake_slurm):
    """Seed 0's step 1 and its alpha=1 chain have records: seed 0's other chains go without a dependency."""
    config = tiny_config(tmp_path, tmp_path / "data", seeds=(0, 1))
    results_dir = Path(config.results_dir)
    results_dir.mkdir(parents=True)
    finished = [(0, "shared", 1), (0, "alpha=1", 2), (1, "alpha=0", 2)]  # seed 1 has no step 1: not finished
    (results_dir / "records.jsonl").write_text("".join(
        json.dumps({"seed": s, "chain": c, "step": t, "config_hash": config.config_hash()}) + "\n"
        for s, c, t in finished) + json.dumps({"seed": 0, "chain": "alpha=0", "step": 2, "config_hash": "other"}))
    # no checkpoints here: the finished steps that pending ones need as teachers would be trained again too
    assert pending_tasks(config) == [(0, "shared", 1), (0, "alpha=0", 2), (0, "alpha_hat", 2), (1, "shared", 1),
                                     (1, "alpha=0", 2), (1, "alpha=1", 2), (1, "alpha_hat", 2)]
    jobs = sweep.submit_sweep(config, "slurm", tmp_path / "submitit", partition="gpu")
    assert [(j.seed, j.chain, j.job.job_id) for j in jobs] == [
        (1, "shared", "1000"), (0, "alpha=0", "1001_0"), (0, "alpha_hat", "1001_1"),
        (1, "alpha=0", "1002_0"), (1, "alpha=1", "1002_1"), (1, "alpha_hat", "1002_2")]
    scripts = sbatch_scripts(fake_slurm)  # submitit submits an array of one job as a plain job
    assert "#SBATCH --array" not in scripts[0] and "--dependency" not in scripts[0]
    assert "#SBATCH --array=0-1%" in scripts[1] and "--dependency" not in scripts[1]  # step 1 is finished
    assert "#SBATCH --dependency=afterok:1000\n" in scripts[2]
    with pytest.warns(RuntimeWarning, match="could not ask the SLURM queue"):  # no sacct here: said so
        assert len(sweep.submit_sweep(config, "slurm", tmp_path / "submitit", skip_finished=False)) == 8


def test_sweep_file_sets_the_cluster_and_the_command_line_overrides_it(tmp_path, fake_slurm):
    train = {k: v for k, v in tiny_config(tmp_path, tmp_path / "data", seeds=(0, 1)).to_dict().items()
             if k != "profile"}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "profile": "paper", "train": train,
        "cluster": {"executor": "slurm", "partition": "gpu-a", "gpus_per_job": 2, "timeout_min": 90,
                    "cpus_per_job": 4, "array_parallelism": 2, "folder": str(tmp_path / "submitit"),
                    "slurm_parameters": {"qos": "high"}}}))
    jobs = sweep.main(["--config", str(sweep_file), "--partition", "gpu-b", "--seeds", "1", "--no-wait",
                       "--no-progress"])
    assert [(j.seed, j.chain) for j in jobs] == [(1, "shared"), (1, "alpha=0"), (1, "alpha=1"), (1, "alpha_hat")]
    scripts = sbatch_scripts(fake_slurm)
    assert len(scripts) == 2
    for script in scripts:
        for line in ("--partition=gpu-b", "--gpus-per-node=2", "--time=90", "--cpus-per-task=4", "--qos=high"):
            assert f"#SBATCH {line}" in script, (line, script)
    assert "#SBATCH --array=0-2%2" in scripts[1] and "#SBATCH --dependency=afterok:1000\n" in scripts[1]
    assert all(Path(j.job.paths.submitted_pickle).is_relative_to(tmp_path / "submitit") for j in jobs)
    job_config = cloudpickle.loads(jobs[1].job.paths.submitted_pickle.read_bytes()).function.config
    assert job_config.seeds == (1,) and job_config.alphas == (0.0,) and job_config.epochs == 2
    assert job_config.config_hash() == tiny_config(tmp_path, tmp_path / "data").config_hash()


def test_committed_sweep_files(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.chdir(REPO)  # the files' paths are relative to the repository root
    # the paper's grid on SLURM: 4 step-1 jobs, then 4 arrays of 12 chain jobs waiting for them
    config, options = sweep.load_sweep_config(REPO / "sweeps" / "paper-slurm.yaml")
    paper = TrainConfig.from_profile("paper")
    assert config.config_hash() == paper.config_hash()
    assert (config.seeds, config.steps, config.alphas, config.include_alpha_hat, config.epochs) == \
        (paper.seeds, paper.steps, paper.alphas, True, 75)
    assert options["executor"] == "slurm" and options["gpus_per_job"] == 1
    assert not Path(config.results_dir).exists()
    jobs = sweep.main(["--config", "sweeps/paper-slurm.yaml", "--log-folder", str(tmp_path / "submitit"),
                       "--no-wait", "--no-progress"])
    assert len(jobs) == 52 and sweep.grid_cost(config)["jobs"] == 52
    scripts = sbatch_scripts(fake_slurm)
    assert len(scripts) == 5 and "#SBATCH --array=0-3%" in scripts[0]  # at most len(array) at once
    for k, script in enumerate(scripts[1:]):
        assert "#SBATCH --array=0-11%" in script and f"#SBATCH --dependency=afterok:1000_{k}" in script
    for script in scripts:
        assert "#SBATCH --time=1440" in script and "#SBATCH --gpus-per-node=1" in script
    # the grid behind the committed results: every job finished, nothing to submit
    config, options = sweep.load_sweep_config(REPO / "sweeps" / "h100-fast-4epochs.yaml")
    records = read_jsonl(REPO / "results" / "cifar10" / "records.jsonl")
    assert {r["config_hash"] for r in records} == {config.config_hash()}
    # every record's configuration is the file's, but for what the sweep cut to each job's seed and chain, and
    # for results_dir: the second run (seeds 2 and 3) wrote to results/cifar10b, then its records were appended
    # (and for the speed settings added to TrainConfig after these runs, which config_hash leaves out)
    cut = ("seeds", "alphas", "include_alpha_hat", "steps", "results_dir", "eval_every", "test_every",
           "chains_in_flight", "capture")
    # fields added after these records were written, at the values that reproduce the pipeline they ran
    later = {"teacher_bn": "eval", "data_order": "reshuffle", "alpha_hat_bounds": [0.0, 1.0], "model": "resnet50",
             "label_noise": 0.0}
    assert {k: config.to_dict()[k] for k in later} == later
    expected = {k: v for k, v in config.to_dict().items() if k not in cut and k not in later}
    assert all({k: v for k, v in r["config"].items() if k not in cut} == expected for r in records)
    assert {(r["seed"], r["config"]["results_dir"]) for r in records} == {
        (0, "results/cifar10"), (1, "results/cifar10"), (2, "results/cifar10b"), (3, "results/cifar10b")}
    assert len(records) == len(pending_tasks(dataclasses.replace(config, results_dir=str(tmp_path)))) == 76
    assert pending_tasks(config, device="cuda") == []  # its jobs ran with a GPU each (bf16): those records
    assert sweep.submit_sweep(config, **{**options, "folder": tmp_path / "local"}, progress=False) == []


@pytest.mark.parametrize("content, message", [
    ({"profile": "paper", "trian": {}}, r"unknown sweep file key\(s\) \['trian'\]"),
    ({"cluster": {"gpus": 1}}, r"unknown cluster option\(s\) \['gpus'\]; valid options: \['array_parallelism'"),
    ({"train": {"epoch": 3}}, r"unknown TrainConfig field\(s\) \['epoch'\]"),
    ({"train": {"epochs": 0}}, "TrainConfig.epochs must be an integer >= 1"),
    ({"profile": "turbo"}, "profile must be one of"),
    ([1, 2], "a sweep file must be a mapping"),
    ({"train": [1]}, "the sweep's 'train' must be a mapping"),
])
def test_bad_sweep_files(tmp_path, content, message):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep_config(path)


def test_cli_rejects_bad_sweep_files_before_any_submission(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(f"cluster: {{timeout_min: 0, folder: {tmp_path / 'logs'}}}\n")
    for path, message in ((tmp_path / "missing.yaml", "sweep file"), (bad, "timeout_min must be an integer >= 1")):
        done = subprocess.run([sys.executable, "-m", "sdlib.sweep", "--config", str(path)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("options, message", [
    (dict(executor="cloud"), "executor must be one of"),
    (dict(gpus=1), r"unknown cluster option\(s\) \['gpus'\]"),
    (dict(skip_finished="yes"), "skip_finished must be True or False"),
    (dict(gpus_per_job=-1), "gpus_per_job must be None or an integer >= 0"),
    (dict(timeout_min=0), "timeout_min must be an integer >= 1"),
    (dict(partition=""), "partition must be a non-empty string"),
    (dict(mem_gb=0), "mem_gb must be None or a finite number > 0"),
    (dict(array_parallelism=1.5), "array_parallelism must be an integer >= 1"),
    (dict(num_threads=0), "num_threads must be None or an integer >= 1"),
])
def test_bad_sweep_options_raise_before_any_submission(tmp_path, options, message):
    config = tiny_config(tmp_path, tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        sweep.submit_sweep(config, folder=tmp_path / "submitit", **options)
    assert not (tmp_path / "submitit").exists()
    with pytest.raises(ValueError, match="config must be a sdlib.train.TrainConfig"):
        sweep.submit_sweep({"epochs": 1}, folder=tmp_path / "submitit")
    with pytest.raises(ValueError, match="jobs must be a list of SweepJob"):
        sweep.wait([object()])
    with pytest.raises(ValueError, match="config must be a TrainConfig"):
        pending_tasks({"epochs": 1})


def test_cli_rejects_bad_values(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdlib.sweep", "--executor", "local", "--gpus-per-job", "-2",
                           "--log-folder", str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "gpus_per_job must be None or an integer >= 0" in done.stderr
    assert not (tmp_path / "logs").exists()


def test_papermill_sweep_rejects_bad_parameter_sets(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\].*'epochs'"):
        papermill_sweep.run_papermill_sweep(NOTEBOOK, [{"name": "a", "parameters": {"epoch": 1}}], out)
    assert not out.exists()  # checked before anything ran
    with pytest.raises(ValueError, match="name 'a' is used twice"):
        papermill_sweep.load_parameter_sets([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="name must be"):
        papermill_sweep.load_parameter_sets({"../x": {}})
    with pytest.raises(ValueError, match="must not be empty"):
        papermill_sweep.load_parameter_sets([])
    with pytest.raises(ValueError, match="keys 'name' and 'parameters'"):
        papermill_sweep.load_parameter_sets([{"name": "a", "params": {}}])
    (tmp_path / "sets.txt").write_text("[]")
    with pytest.raises(ValueError, match=r"must end in \.json, \.yaml or \.yml"):
        papermill_sweep.load_parameter_sets(tmp_path / "sets.txt")
    with pytest.raises(FileNotFoundError, match="parameter file"):
        papermill_sweep.load_parameter_sets(tmp_path / "missing.json")
    (tmp_path / "sets.json").write_text(json.dumps({"a": {"steps": 2, "bogus": 1}}))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sets.json"), "--output-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown parameter(s) ['bogus']" in done.stderr and not out.exists()


def test_grid_cost_counts_what_the_sweep_trained(grid):
    config, jobs, outcomes = grid.config, grid.jobs, grid.outcomes
    trained = {(chain, step) for o in outcomes for chain, step, _ in o["trained"]}
    epochs = read_jsonl(Path(config.results_dir) / "epochs.jsonl") + \
        read_jsonl(Path(config.results_dir) / "probe_epochs.jsonl")
    n_train = read_jsonl(Path(config.results_dir) / "records.jsonl")[0]["data"]["sizes"]["train"]
    cost = sweep.grid_cost(config, images_per_s=40.0, n_train_images=n_train)
    assert cost["jobs"] == len(jobs) and cost["models"] == len(trained) == 5
    assert cost["train_images"] == len(epochs) * (n_train // config.batch_size) * config.batch_size
    assert cost["seconds"] == cost["train_images"] / 40.0
    # the paper's grid: 4 seeds x (1 + 4 steps x (11 chains + alpha-hat + its probe)) models of 75 epochs
    paper = sweep.grid_cost(TrainConfig.from_profile("paper"))
    assert (paper["jobs"], paper["models"]) == (4 * 13, 4 * (1 + 4 * 13))
    assert paper["images_per_epoch"] == (50_000 - 5_000) // 16 * 16 and paper["seconds"] is None
    with pytest.raises(ValueError, match="images_per_s must be None or a finite number > 0"):
        sweep.grid_cost(config, images_per_s=0)


# ------------------------------------------------------------------------------- the queue, sweep files, errors

FAKE_SACCT = """#!/bin/sh
# Stands in for sacct as submitit calls it (-o JobID,State,NodeList --parsable2): a header, then the lines of
# $SACCT_OUT ("<job id>|<state>|"), or fails as told.
if [ -n "$SACCT_FAIL" ]; then echo "sacct: error: $SACCT_FAIL" >&2; exit 1; fi
echo "JobID|State|NodeList"
cat "$SACCT_OUT"
"""


@pytest.fixture
def fake_sacct(tmp_path, fake_slurm, monkeypatch) -> Path:
    """A sacct stand-in beside fake_slurm's sbatch; returns the file whose lines it prints."""
    out = tmp_path / "sacct.txt"
    out.write_text("")
    tool = tmp_path / "bin" / "sacct"
    tool.write_text(FAKE_SACCT)
    tool.chmod(stat.S_IRWXU)
    monkeypatch.setenv("SACCT_OUT", str(out))
    return out


def test_resubmission_leaves_out_jobs_still_queued(tmp_path, fake_sacct, capsys):
    """Old: a sweep resubmitted while its jobs were still queued submitted every one of them twice."""
    config = tiny_config(tmp_path, tmp_path / "data", seeds=(0, 1))
    folder = tmp_path / "submitit"
    first = sweep.submit_sweep(config, "slurm", folder, partition="gpu")
    assert [j.job.job_id for j in first] == ["1000_0", "1000_1", "1001_0", "1001_1", "1001_2", "1002_0", "1002_1",
                                             "1002_2"]
    # everything still waits in the queue: nothing is submitted again
    # (sacct shows a pending array as one line, "1001_[0-2%64]": submitit reads it as each of its jobs)
    fake_sacct.write_text("1000_[0-1%64]|PENDING|\n1001_[0-2%64]|PENDING|\n1002_[0-2%64]|PENDING|\n999|RUNNING|\n")
    assert sweep.submit_sweep(config, "slurm", folder, partition="gpu") == []
    assert "left out 8 job(s)" in capsys.readouterr().out
    assert len(sbatch_scripts(fake_slurm_log(tmp_path))) == 3
    # seed 0 still queued; seed 1's jobs were cancelled and seed 0's alpha=1 failed
    fake_sacct.write_text("1000_0|RUNNING|\n1000_1|CANCELLED by 0|\n1001_0|PENDING|\n1001_2|PENDING|\n"
                          "1001_1|FAILED|\n" + "".join(f"1002_{k}|CANCELLED by 0|\n" for k in range(3)))
    again = sweep.submit_sweep(config, "slurm", folder, partition="gpu")
    assert [(j.seed, j.chain, j.job.job_id) for j in again] == [
        (1, "shared", "1003"), (0, "alpha=1", "1004"), (1, "alpha=0", "1005_0"), (1, "alpha=1", "1005_1"),
        (1, "alpha_hat", "1005_2")]
    scripts = sbatch_scripts(fake_slurm_log(tmp_path))
    assert "#SBATCH --dependency=afterok:1000_0\n" in scripts[4]  # seed 0's step 1 is still queued: wait for it
    assert "#SBATCH --dependency=afterok:1003\n" in scripts[5]
    out = capsys.readouterr().out
    assert "left out 3 job(s)" in out and "seed0-shared (job 1000_0 RUNNING)" in out
    # the manifest holds every submission; the newest id of a job is the one asked about
    manifest = read_jsonl(folder / f"sweep-{config.config_hash()}.jsonl")
    assert len(manifest) == 13 and manifest[-1] == {**manifest[-1], "seed": 1, "chain": "alpha_hat",
                                                    "job_id": "1005_2", "executor": "slurm"}


def test_a_queue_that_cannot_be_asked_warns(tmp_path, fake_sacct, monkeypatch):
    config = tiny_config(tmp_path, tmp_path / "data")
    sweep.submit_sweep(config, "slurm", tmp_path / "submitit", partition="gpu")
    monkeypatch.setenv("SACCT_FAIL", "Unable to contact slurm controller")
    with pytest.warns(RuntimeWarning, match="could not ask the SLURM queue about job.*submitted again"):
        assert len(sweep.submit_sweep(config, "slurm", tmp_path / "submitit", partition="gpu")) == 4


def fake_slurm_log(tmp_path: Path) -> Path:
    return tmp_path / "sbatch"


def test_sweep_files_accept_1e_3_and_reject_duplicate_keys_and_bad_yaml(tmp_path):
    """Old: `lr: 1e-3` was rejected as a string (PyYAML's YAML 1.1), a key given twice passed silently (the last
    won), and a syntax error ended in an 18-frame yaml traceback."""
    path = tmp_path / "sweep.yaml"
    path.write_text("profile: fast\ntrain:\n  lr: 1e-3\n  l2_coef: 5E-5\n  alphas: [0, 1.5e-1, 1]\n")
    config, _ = sweep.load_sweep_config(path)
    assert (config.lr, config.l2_coef, config.alphas) == (1e-3, 5e-5, (0.0, 0.15, 1.0))
    path.write_text("train:\n  epochs: 2\n  lr: 1e-3\n  epochs: 3\n")
    with pytest.raises(ValueError, match=rf"sweep file {path}, line 4, column 3: .*key 'epochs' is given twice "
                                         r"\(first at line 2\)"):
        sweep.load_sweep_config(path)
    path.write_text("train:\n  seeds: [0, 1\ncluster: {}\n")
    with pytest.raises(ValueError, match=rf"sweep file {path}, line 3, column 8: not valid YAML"):
        sweep.load_sweep_config(path)
    json_path = tmp_path / "sweep.json"
    json_path.write_text('{"train": {"epochs": 2, "epochs": 3}}')
    with pytest.raises(ValueError, match=r"key\(s\) \['epochs'\] given twice"):
        sweep.load_sweep_config(json_path)
    json_path.write_text('{"train": {"epochs": 2,}}')
    with pytest.raises(ValueError, match=rf"sweep file {json_path}, line 1, column 24: not valid JSON: Expecting property name"):
        sweep.load_sweep_config(json_path)
    done = subprocess.run([sys.executable, "-m", "sdlib.sweep", "--config", str(path)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "line 3, column 8" in done.stderr


def test_a_failed_local_step1_job_is_reported_in_one_line(tmp_path):
    """Old: the local executor's step-1 failure was buried in a 25-frame traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "sdlib.sweep", "--executor", "local", "--profile", "paper", "--epochs", "1",
         "--seeds", "0", "--steps", "2", "--alphas", "1", "--no-alpha-hat", "--data-root", str(tmp_path / "none"),
         "--results-dir", str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"), "--device", "cpu",
         "--log-folder", str(tmp_path / "logs"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (message,) = [line for line in done.stderr.splitlines() if "sweep job" in line]
    assert "sweep job seed0-shared" in message and "failed (logs: " in message
    assert "FileNotFoundError: CIFAR-10 (train split) not found under" in message


def test_sweep_dry_run_lists_the_jobs_to_submit(tmp_path, fake_sacct, capsys):
    config = tiny_config(tmp_path, tmp_path / "data")
    train = {k: v for k, v in config.to_dict().items() if k not in ("profile",)}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": train, "cluster": {"executor": "slurm",
                                                               "folder": str(tmp_path / "submitit")}}))
    assert sweep.main(["--config", str(path), "--dry-run"]) == []
    out = capsys.readouterr().out
    assert f"config_hash: {config.config_hash()}" in out and "would submit 4 of 4 jobs (slurm)" in out
    assert "grid cost: 4 sweep jobs; 5 models x 2 epochs" in out and "pending: 4 of 4 (seed, chain, step)" in out
    assert not (tmp_path / "submitit").exists() and not fake_sacct.read_text()


def test_a_dry_run_fingerprints_the_data_as_often_for_any_number_of_jobs(tmp_path, tiny_cifar_root, fake_sacct,
                                                                          capsys, monkeypatch):
    """Which jobs are left is asked per job; the data are fingerprinted once for all of them (each fingerprint of
    CIFAR-10 lists 60,000 files: per job it took the paper grid's dry run 11 s)."""
    from sdlib import data

    calls = []
    fingerprint = data.data_fingerprint
    monkeypatch.setattr(data, "data_fingerprint", lambda root: calls.append(root) or fingerprint(root))
    counts = {}
    for seeds in ((0,), (0, 1, 2)):
        config = tiny_config(tmp_path, tiny_cifar_root, seeds=seeds)  # read only: a fingerprint writes nothing
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"train": {k: v for k, v in config.to_dict().items() if k != "profile"},
                                        "cluster": {"executor": "slurm", "folder": str(tmp_path / "submitit")}}))
        calls.clear()
        assert sweep.main(["--config", str(path), "--dry-run"]) == []
        assert f"would submit {4 * len(seeds)} of {4 * len(seeds)} jobs" in capsys.readouterr().out
        counts[seeds] = len(calls)
    assert counts[(0,)] == counts[(0, 1, 2)] > 0, counts
