"""The grid as cluster jobs (sdlib.sweep with submitit's local executor) and papermill sweeps.

One tiny real-image grid (ResNet-50 on CPU: 64 training, 40 validation, 64 test images, batch 32, 2 epochs,
2 steps, alphas 0 and 1 plus alpha-hat, one seed) is trained twice: sequentially by run_chains in this process
(the reference), and as submitit jobs (one step-1 job, then three chain jobs), one of which is preempted in the
middle of its step 2 through submitit's own signal / checkpoint / requeue path. The sweep must give the reference's
results exactly, with the chain jobs started only after the step-1 job finished and the preempted job resuming
from its epoch checkpoint rather than starting over. A fake ``sbatch`` checks the SLURM dependency wiring.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cloudpickle
import nbformat
import pytest
import torch

from sdlib import results, sweep
from sdlib.train import TrainConfig, run_chains
from tiny import tiny_config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "05_cifar10_self_distillation.ipynb"
SCRIPT = REPO / "scripts" / "papermill_sweep.py"
RESULT_FIELDS = ("alpha", "alpha_hat", "probe_val_acc", "probe_test_acc", "epochs", "val_acc", "val_loss",
                 "test_acc", "test_loss", "train_loss")
KEYS = {(0, "shared", 1), (0, "alpha=0", 2), (0, "alpha=1", 2), (0, "alpha_hat", 2)}

# The preemption hook below is defined in this module: ship it to the job processes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PreemptOnce:
    """on_event hook of a ChainJob: on its first attempt, right after ``epoch`` of (chain, step) has been
    checkpointed, send this job process submitit's preemption signal (USR2), as SLURM would."""

    def __init__(self, chain: str, step: int, epoch: int):
        self.chain, self.step, self.epoch = chain, step, epoch

    def __call__(self, event):
        if (event["event"], event["chain"], event["step"], event["epoch"], event["attempt"]) == \
                ("epoch_end", self.chain, self.step, self.epoch, 0):
            from submitit.local.local import LocalJobEnvironment

            os.kill(os.getpid(), LocalJobEnvironment._usr_sig())


@pytest.fixture(scope="module")
def data_root(tiny_cifar_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data") / "cifar10"  # a private copy: loading writes a decode cache
    shutil.copytree(tiny_cifar_root, root)
    return root


@pytest.fixture(scope="module")
def grid(data_root, tmp_path_factory):
    """(reference config, reference records, sweep config, sweep jobs, their results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine; the jobs get num_threads=1 too (same arithmetic)
    root = tmp_path_factory.mktemp("sweep")
    try:
        reference = tiny_config(root / "reference", data_root)
        reference_records = run_chains(reference, progress=False)
        config = tiny_config(root / "sweep", data_root)
        jobs = sweep.submit_sweep(config, "local", root / "submitit", num_threads=1, progress=False,
                                  on_event=PreemptOnce("alpha=1", 2, 1), timeout_min=20)
        outcomes = sweep.wait(jobs, progress=False)
        yield reference, reference_records, config, jobs, outcomes
    finally:
        torch.set_num_threads(threads)
        for folder in ("reference", "sweep"):  # ~0.5 GB of ResNet-50 checkpoints
            shutil.rmtree(root / folder / "checkpoints", ignore_errors=True)


def test_jobs_and_dependencies(grid):
    _, _, config, jobs, outcomes = grid
    assert [(j.seed, j.chain) for j in jobs] == [(0, "shared"), (0, "alpha=0"), (0, "alpha=1"), (0, "alpha_hat")]
    assert len({j.job.job_id for j in jobs}) == 4
    by_chain = {o["chain"]: o for o in outcomes}
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
    _, _, config, jobs, outcomes = grid
    by_chain = {o["chain"]: o for o in outcomes}
    # the alpha=1 job was requeued once by submitit and its second attempt trained epoch 2 only
    assert by_chain["alpha=1"]["attempt"] == 1
    assert by_chain["alpha=1"]["trained"] == [("alpha=1", 2, 2)]
    assert by_chain["alpha=0"]["attempt"] == 0 and by_chain["alpha=0"]["trained"] == [("alpha=0", 2, 1),
                                                                                      ("alpha=0", 2, 2)]
    # the alpha-hat job trained its own alpha = 0 probe, then its step
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


def test_aggregated_results_equal_a_sequential_run(grid):
    reference, reference_records, config, _, _ = grid
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
    print(f"\nCPU training throughput in the sweep jobs (1 thread, ResNet-50, batch 32): "
          f"{min(images_per_s):.1f} to {max(images_per_s):.1f} images/s")


def test_papermill_sweep_keeps_every_executed_notebook(grid, tmp_path):
    _, _, config, _, _ = grid
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


def test_slurm_chain_arrays_depend_on_their_step1_job(tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir(), log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    config = tiny_config(tmp_path, tmp_path / "data", seeds=(0, 1))
    jobs = sweep.submit_sweep(config, "slurm", tmp_path / "submitit", partition="gpu", gpus_per_job=1,
                              timeout_min=600, cpus_per_job=8, mem_gb=32, array_parallelism=2,
                              slurm_parameters={"account": "proj"})
    assert [(j.seed, j.chain, j.job.job_id) for j in jobs] == [
        (0, "shared", "1000_0"), (1, "shared", "1000_1"),
        (0, "alpha=0", "1001_0"), (0, "alpha=1", "1001_1"), (0, "alpha_hat", "1001_2"),
        (1, "alpha=0", "1002_0"), (1, "alpha=1", "1002_1"), (1, "alpha_hat", "1002_2")]
    scripts = [(log / f"{k}.sh").read_text() for k in range(3)]
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


@pytest.mark.parametrize("options, message", [
    (dict(executor="cloud"), "executor must be one of"),
    (dict(gpus_per_job=-1), "gpus_per_job must be an integer >= 0"),
    (dict(timeout_min=0), "timeout_min must be an integer >= 1"),
    (dict(partition=""), "partition must be a non-empty string"),
    (dict(mem_gb=0), "mem_gb must be a number > 0"),
    (dict(array_parallelism=1.5), "array_parallelism must be an integer >= 1"),
    (dict(num_threads=0), "num_threads must be an integer >= 1"),
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


def test_cli_rejects_bad_values(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdlib.sweep", "--executor", "local", "--gpus-per-job", "-2",
                           "--log-folder", str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "gpus_per_job must be an integer >= 0" in done.stderr
    assert not (tmp_path / "logs").exists()


def test_papermill_sweep_rejects_bad_parameter_sets(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\].*'epochs'"):
        sweep.run_papermill_sweep(NOTEBOOK, [{"name": "a", "parameters": {"epoch": 1}}], out)
    assert not out.exists()  # checked before anything ran
    with pytest.raises(ValueError, match="name 'a' is used twice"):
        sweep.load_parameter_sets([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="name must be"):
        sweep.load_parameter_sets({"../x": {}})
    with pytest.raises(ValueError, match="must not be empty"):
        sweep.load_parameter_sets([])
    with pytest.raises(ValueError, match="keys 'name' and 'parameters'"):
        sweep.load_parameter_sets([{"name": "a", "params": {}}])
    (tmp_path / "sets.txt").write_text("[]")
    with pytest.raises(ValueError, match=r"must end in \.json, \.yaml or \.yml"):
        sweep.load_parameter_sets(tmp_path / "sets.txt")
    with pytest.raises(FileNotFoundError, match="parameter file"):
        sweep.load_parameter_sets(tmp_path / "missing.json")
    (tmp_path / "sets.json").write_text(json.dumps({"a": {"steps": 2, "bogus": 1}}))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sets.json"), "--output-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown parameter(s) ['bogus']" in done.stderr and not out.exists()


def test_grid_cost_counts_what_the_sweep_trained(grid):
    _, _, config, jobs, outcomes = grid
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
    with pytest.raises(ValueError, match="images_per_s must be a number > 0"):
        sweep.grid_cost(config, images_per_s=0)
