"""The full grid of self-distillation chains as cluster jobs (submitit), and papermill sweeps of a notebook.

A grid (a :class:`sdlib.train.TrainConfig`: seeds x chains x steps) becomes one job per seed for the shared
step-1 model and one job per (seed, chain) for steps 2..steps of that chain::

    seed 0:  shared(step 1) ──afterok──> alpha=0 (steps 2..5), alpha=0.1, ..., alpha=1, alpha_hat
    seed 1:  shared(step 1) ──afterok──> ...

Each job is a :class:`ChainJob`, which calls :func:`sdlib.train.run_chains` with a config cut to its seed and
chain (``seeds=(s,)``, ``alphas=(a,)`` or none, ``include_alpha_hat`` only for the alpha-hat job, ``steps=1``
for the shared job). That composes because ``config_hash`` leaves out seeds, alphas, steps and paths: a chain
job finds the shared step-1 record of its seed (same hash) in ``results_dir/records.jsonl``, skips it and loads
the step-1 weights from ``checkpoint_dir/<hash>/seed<s>/shared/step1.pt`` as the teacher of step 2. All jobs
write one ``results_dir`` through :class:`sdlib.store.ResultsStore`: each record and epoch line is appended under
an ``fcntl.flock`` lock of the folder, so concurrent jobs (of this grid or of another config) neither lose nor
tear records.

The alpha-hat job trains its own alpha = 0 probe at step 2, where a sequential run reuses the alpha = 0 chain's
step 2 (the probe is that very model: same teacher, same init and data order, both seeded by (seed, step)):
one extra model per seed, in exchange for no dependency between chain jobs.

Dependencies. On SLURM the chain jobs of a seed are an array submitted with ``--dependency=afterok:<step-1 job>``
(and ``--kill-on-invalid-dep=yes``, so a failed step 1 cancels them instead of leaving them pending). The local
and debug executors have no dependencies, so :func:`submit_sweep` submits a seed's chain jobs only once that
seed's step-1 job has finished (it blocks for the step-1 phase). Training step 1 inside every chain job instead
would race: several processes writing one resumable state file.

Preemption and time limits. :class:`ChainJob` has a ``checkpoint()`` method returning
``submitit.helpers.DelayedSubmission(self)``: on SLURM's warning signal (or a preemption) submitit pickles the
job and requeues it; the requeued job calls ``run_chains`` again, which skips finished steps and resumes the
unfinished one from its last epoch checkpoint (``step<t>.state.pt``).

Resubmission. :func:`submit_sweep` leaves out the jobs whose every step already has a record of the config
in ``results_dir`` (and submits the chains of a seed whose step 1 is finished without a dependency), so the same
command, run again after a failure, a kill or a cancelled job, submits only what is missing; an unfinished step
resumes from its last epoch checkpoint. Jobs of an earlier submission still queued or running are left out too: every submitted job is
noted in ``folder/sweep-<config_hash>.jsonl`` and looked up in ``squeue`` (or, locally, among the running
processes) before submitting again.

Sweep files. The whole sweep (profile, training fields, where and how the jobs run) can live in one YAML or JSON
file, read by :func:`load_sweep_config` and ``--config``; ``sweeps/`` has the paper's grid on SLURM and the run
behind the committed results. Options given on the command line override the file.

Command line (``python -m sdlib.sweep --help``)::

    python -m sdlib.sweep --config sweeps/paper-slurm.yaml --partition gpu-long
    python -m sdlib.sweep --executor slurm --partition gpu --gpus-per-job 1 --time 2880 --profile paper
    python -m sdlib.sweep --executor local --profile fast --epochs 2 --seeds 0 --alphas 0,1

Papermill sweeps: :func:`run_papermill_sweep` (and ``scripts/papermill_sweep.py``) run a notebook once per
parameter set and keep every executed notebook.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from sdlib.records import SHARED_CHAIN, chain_name

__all__ = [
    "EXECUTORS",
    "ChainJob",
    "SweepJob",
    "SweepError",
    "SWEEP_OPTIONS",
    "job_configs",
    "load_sweep_config",
    "make_executor",
    "CIFAR10_TRAIN_IMAGES",
    "grid_cost",
    "submit_sweep",
    "queued_jobs",
    "wait",
    "load_parameter_sets",
    "run_papermill_sweep",
    "main",
]

EXECUTORS = ("local", "slurm", "debug")
ALPHA_HAT = chain_name(None)
CIFAR10_TRAIN_IMAGES = 50_000  # before the validation split
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")  # a parameter set's name: a safe file name


# ------------------------------------------------------------------------------------------------------ jobs


def job_configs(config) -> list[tuple[int, str, Any]]:
    """The jobs of a grid: ``(seed, chain, config of the job)`` with chain ``"shared"`` for the step-1 job of
    each seed, then one per chain (fixed alphas in order, then ``"alpha_hat"``), seed by seed.

    Every job config has the same ``config_hash`` as ``config`` (only seeds / alphas / steps differ)."""
    from sdlib.train import TrainConfig  # torch: imported when jobs are built, not for papermill sweeps

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a sdlib.train.TrainConfig, got {type(config).__name__}")
    jobs = []
    for seed in config.seeds:
        jobs.append((seed, SHARED_CHAIN, dataclasses.replace(config, seeds=(seed,), steps=1, alphas=(),
                                                             include_alpha_hat=False)))
        if config.steps < 2:
            continue
        for alpha in config.alphas:
            jobs.append((seed, chain_name(alpha), dataclasses.replace(config, seeds=(seed,), alphas=(alpha,),
                                                                      include_alpha_hat=False)))
        if config.include_alpha_hat:
            jobs.append((seed, ALPHA_HAT, dataclasses.replace(config, seeds=(seed,), alphas=(),
                                                              include_alpha_hat=True)))
    # the composition relies on one config_hash (compared without fingerprinting the data once per job)
    assert all(c.hashed_fields() == config.hashed_fields() and c.data_root == config.data_root
               and c.data_fingerprint == config.data_fingerprint for _, _, c in jobs)
    return jobs


def job_device(config, executor: str = "local", gpus_per_job: int | None = None) -> str | None:
    """The device the jobs of ``config`` run on, for the hash they record (:func:`sdlib.chains.job_config`):
    ``config.device`` where named; with "auto", cuda for jobs given a GPU (``gpus_per_job`` >= 1; SLURM's
    default is 1) and cpu for jobs given none (local jobs by default: submitit hides the GPUs from them), or
    None for debug jobs, which run in this process ("auto" resolved here)."""
    if config.device != "auto":
        return config.device
    if executor == "debug":
        return None
    if gpus_per_job is None:
        gpus_per_job = 1 if executor == "slurm" else 0  # make_executor's defaults
    return "cuda" if gpus_per_job > 0 else "cpu"


def grid_cost(config, images_per_s: float | None = None, n_train_images: int | None = None) -> dict:
    """What the sweep of ``config`` trains: jobs, models, training images and (given a measured throughput)
    training seconds. Evaluation passes are not counted (they are a small part at 45,000 vs 10,000 images).

    models : per seed, the shared step-1 model, one model per (chain, step >= 2), and one alpha = 0 probe per
    alpha-hat step (the sweep's alpha-hat job trains its own probe at step 2 too).
    n_train_images : images per epoch before dropping the last partial batch; default CIFAR-10's 50,000 minus
    ``n_val`` (cut to ``subset``). Returns a dict: jobs, models, images_per_epoch, train_images, images_per_s,
    seconds (None without ``images_per_s``), formula (the computation in words).
    """
    jobs = job_configs(config)
    if images_per_s is not None and (isinstance(images_per_s, bool) or not isinstance(images_per_s, (int, float))
                                     or not images_per_s > 0):
        raise ValueError(f"images_per_s must be a number > 0 or None, got {images_per_s!r}")
    if n_train_images is None:
        n_train_images = CIFAR10_TRAIN_IMAGES - config.n_val
        if config.subset is not None:
            n_train_images = min(n_train_images, config.subset)
    _check_int("n_train_images", n_train_images, 1)
    per_seed = 1 + (config.steps - 1) * (len(config.alphas) + 2 * config.include_alpha_hat)
    models = per_seed * len(config.seeds)
    images_per_epoch = n_train_images // config.batch_size * config.batch_size  # the last partial batch is dropped
    train_images = models * config.epochs * images_per_epoch
    seconds = None if images_per_s is None else train_images / images_per_s
    formula = (f"{models} models x {config.epochs} epochs x {images_per_epoch:,} images = {train_images:,} images"
               + ("" if seconds is None else f"; / {images_per_s:g} images/s = {seconds:,.0f} s "
                  f"= {seconds / 3600:,.1f} h (one worker)"))
    return {"jobs": len(jobs), "models": models, "images_per_epoch": images_per_epoch,
            "train_images": train_images, "images_per_s": images_per_s, "seconds": seconds, "formula": formula}


class ChainJob:
    """One cluster job: :func:`sdlib.train.run_chains` on a config cut to one seed and one chain.

    A callable (what submitit runs) with a ``checkpoint()`` method (what submitit calls on a preemption or time
    limit): the job is requeued as it is, and the next call resumes from the training checkpoints.

    config : the job's TrainConfig (from :func:`job_configs`). seed, chain : for names and logs.
    num_threads : torch CPU threads in the job (None: torch's default).
    on_event : optional picklable callable given every training event (see ``run_chains``' callback) with
        ``attempt`` added; raising from it stops the job.

    Returns a dict: seed, chain, attempt (0, or how many times the job was requeued), started_at / finished_at
    (``time.time()`` of this attempt), trained (``(chain, step, epoch)`` of every epoch this attempt trained) and
    records (what ``run_chains`` returned: the job's records, step 1 included).
    """

    def __init__(self, config, seed: int, chain: str, num_threads: int | None = None,
                 progress: bool = True, on_event: Callable[[dict], None] | None = None):
        self.config, self.seed, self.chain = config, seed, chain
        self.num_threads, self.progress, self.on_event = num_threads, progress, on_event
        self.attempt = 0

    def __repr__(self) -> str:
        return f"ChainJob(seed={self.seed}, chain={self.chain!r}, attempt={self.attempt})"

    def __call__(self) -> dict:
        import torch

        from sdlib.train import run_chains

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        started, trained = time.time(), []

        def callback(event):
            if event["event"] == "epoch_end":
                trained.append((event["chain"], event["step"], event["epoch"]))
            if self.on_event is not None:
                self.on_event({**event, "attempt": self.attempt})

        records = run_chains(self.config, progress=self.progress, callback=callback)
        return {"seed": self.seed, "chain": self.chain, "attempt": self.attempt, "started_at": started,
                "finished_at": time.time(), "trained": trained, "records": records}

    def checkpoint(self, *args, **kwargs):
        """Requeue this job unchanged (but counted): ``run_chains`` itself resumes from its checkpoints."""
        import submitit

        self.attempt += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class SweepJob:
    """A submitted job: its seed, chain ("shared" for step 1) and the submitit Job (``job.job_id``,
    ``job.state``, ``job.result()``, ``job.stdout()``, ``job.stderr()``)."""

    seed: int
    chain: str
    job: Any

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.chain}"


class SweepError(RuntimeError):
    """Jobs of a sweep failed. ``failed``: those SweepJobs; ``results``: what :func:`wait` got, in the order
    given, None for a failed job."""

    def __init__(self, message: str, failed: list[SweepJob], results: list[dict | None]):
        super().__init__(message)
        self.failed, self.results = failed, results


def _check_int(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def make_executor(executor: str = "local", folder: str | os.PathLike = "runs/submitit", *,
                  partition: str | None = None, gpus_per_job: int | None = None, timeout_min: int = 1440,
                  cpus_per_job: int | None = None, mem_gb: float | None = None, array_parallelism: int = 64,
                  max_requeues: int = 3, job_name: str = "sdlib-sweep", slurm_parameters: dict | None = None):
    """A submitit executor (``submitit.AutoExecutor``) for ``executor`` in ("local", "slurm", "debug").

    folder : submitit's folder for pickles and logs (``%j`` is added per job). partition : SLURM partition.
    gpus_per_job : GPUs per job (default 1 on SLURM, 0 locally). timeout_min : time limit per job in minutes
    (a job reaching it is checkpointed and requeued, at most ``max_requeues`` times). cpus_per_job, mem_gb :
    per job (None: the cluster's default). array_parallelism : how many jobs of an array run at once (SLURM).
    slurm_parameters : extra ``#SBATCH`` options, e.g. ``{"account": "proj", "qos": "high"}``.
    """
    import submitit

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if partition is not None and (not isinstance(partition, str) or not partition):
        raise ValueError(f"partition must be a non-empty string or None, got {partition!r}")
    gpus_per_job = _check_int("gpus_per_job", gpus_per_job, 0, allow_none=True)
    _check_int("timeout_min", timeout_min, 1)
    cpus_per_job = _check_int("cpus_per_job", cpus_per_job, 1, allow_none=True)
    if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or mem_gb <= 0):
        raise ValueError(f"mem_gb must be a number > 0 or None, got {mem_gb!r}")
    _check_int("array_parallelism", array_parallelism, 1)
    _check_int("max_requeues", max_requeues, 0)
    if slurm_parameters is not None and not isinstance(slurm_parameters, dict):
        raise ValueError(f"slurm_parameters must be a dict or None, got {slurm_parameters!r}")

    ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=executor, slurm_max_num_timeout=max_requeues,
                               local_max_num_timeout=max_requeues)
    params: dict[str, Any] = {"timeout_min": timeout_min, "name": job_name,
                              "gpus_per_node": (1 if executor == "slurm" else 0) if gpus_per_job is None
                              else gpus_per_job}
    if cpus_per_job is not None:
        params["cpus_per_task"] = cpus_per_job
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if executor == "slurm":
        params["slurm_array_parallelism"] = array_parallelism
        # submitit's SLURM default signal: USR2 90 s before the limit, time enough for one atomic save
        if partition is not None:
            params["slurm_partition"] = partition
        if slurm_parameters:
            params["slurm_additional_parameters"] = dict(slurm_parameters)
    ex.update_parameters(**params)
    return ex


# States in which a SLURM job still holds its place (squeue's long names).
_ACTIVE_SLURM_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"})


def _manifest(folder: str | os.PathLike, config_hash: str) -> Path:
    """Where :func:`submit_sweep` notes every job it submitted (job id, seed, chain, executor): the ids to ask
    the queue about on a resubmission."""
    return Path(folder) / f"sweep-{config_hash}.jsonl"


def _squeue_states() -> dict[str, str]:
    """``job id -> state`` of this user's jobs in the SLURM queue (``squeue``, array tasks one per line)."""
    import getpass
    import subprocess

    try:
        done = subprocess.run(["squeue", "--noheader", "--array", "--user", getpass.getuser(),
                               "--format=%i|%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"could not ask the SLURM queue (squeue: {error})") from None
    if done.returncode != 0:
        raise RuntimeError(f"could not ask the SLURM queue (squeue exited with {done.returncode}: "
                           f"{done.stderr.strip()[:300]})")
    states = {}
    for line in done.stdout.splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            states[job_id.strip()] = state.strip().split()[0] if state.strip() else ""
    return states


def _local_job_alive(job_id: str) -> bool:
    """A local submitit job (its id is the pid of its process) that still runs here."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError, OverflowError):
        return False
    try:  # a reused pid is not our job
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def queued_jobs(config, executor: str = "local", folder: str | os.PathLike = "runs/submitit",
                config_hash: str | None = None) -> dict[tuple[int, str], tuple[str, str]]:
    """The jobs of ``config``'s grid that an earlier :func:`submit_sweep` (same ``folder``) submitted and that
    are still queued or running: ``{(seed, chain): (job id, state)}``.

    SLURM: the ids noted in ``folder/sweep-<config_hash>.jsonl`` are looked up in ``squeue`` (this user's
    jobs, array tasks one per line; states PENDING, RUNNING, REQUEUED, ...). Local: whether the job's process
    still runs. Debug: none (they run in the submitting process). Raises RuntimeError where squeue cannot be
    asked (submit_sweep then warns and goes on)."""
    if config_hash is None:
        config_hash = config.config_hash()
    manifest = _manifest(folder, config_hash)
    if executor == "debug" or not manifest.is_file():
        return {}
    latest = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line: that job is then not known to be queued
        if isinstance(entry, dict) and entry.get("executor") == executor:
            latest[(entry["seed"], entry["chain"])] = str(entry["job_id"])
    if not latest:
        return {}
    if executor == "slurm":
        states = _squeue_states()
        return {key: (job_id, states[job_id]) for key, job_id in latest.items()
                if states.get(job_id) in _ACTIVE_SLURM_STATES}
    return {key: (job_id, "RUNNING") for key, job_id in latest.items() if _local_job_alive(job_id)}


def _note_submitted(folder, config_hash: str, executor: str, jobs: list["SweepJob"]) -> None:
    path = _manifest(folder, config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"job_id": str(j.job.job_id), "seed": j.seed, "chain": j.chain,
                                      "executor": executor, "submitted_at": time.time()}) + "\n" for j in jobs)


def submit_sweep(config, executor: str = "local", folder: str | os.PathLike = "runs/submitit", *,
                 num_threads: int | None = None, progress: bool = True,
                 on_event: Callable[[dict], None] | None = None, skip_finished: bool = True,
                 skip_queued: bool = True, **cluster) -> list[SweepJob]:
    """Submit the grid of ``config`` (a TrainConfig) as jobs; return them (step-1 jobs first, then chains).

    skip_finished : leave out every job whose steps all have a record of this config in ``results_dir``, and
    submit the chains of a seed whose step-1 job is finished without waiting for it; an empty list means the
    grid is complete.

    skip_queued : leave out the jobs an earlier submission (same ``folder``) made that are still queued or
    running (:func:`queued_jobs`: SLURM's ``squeue``, or the local processes), so a sweep resubmitted while its
    jobs wait is not submitted twice; it prints what it left out. On SLURM the chains of a seed whose step-1 job
    is still queued depend on that job; locally they are left out until it has finished. Where the queue
    cannot be asked, a RuntimeWarning says so and nothing is left out for that reason.

    executor : "local" (subprocesses on this machine), "slurm" (sbatch through submitit) or "debug" (in this
    process, when ``result()`` is asked: for stepping through with a debugger). ``cluster`` : the options of
    :func:`make_executor` (partition, gpus_per_job, timeout_min, cpus_per_job, mem_gb, array_parallelism,
    max_requeues, job_name, slurm_parameters). num_threads / progress / on_event : passed to every
    :class:`ChainJob`.

    SLURM: returns at once; the chain jobs of a seed wait in the queue for ``afterok`` of its step-1 job. Local
    and debug: blocks until every step-1 job has finished (a failed one raises :class:`SweepError` with the
    job's error in one line and its log file), then submits the chains.
    Wait for the rest with :func:`wait`; read the results with :func:`sdlib.results.load_records` on
    ``config.results_dir``.
    """
    import warnings

    from sdlib.chains import job_config_hash, pending_tasks

    jobs_of_grid = job_configs(config)  # validates config
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if on_event is not None and not callable(on_event):
        raise ValueError(f"on_event must be callable or None, got {on_event!r}")
    for name, value in (("skip_finished", skip_finished), ("skip_queued", skip_queued)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    _check_options(cluster)
    ex = make_executor(executor, folder, **cluster)  # validates the cluster options before any submission
    device = job_device(config, executor, cluster.get("gpus_per_job"))
    config_hash = job_config_hash(config, device)  # the hash the jobs record
    if skip_finished:
        jobs_of_grid = [(s, c, cfg) for s, c, cfg in jobs_of_grid if pending_tasks(cfg, device=device)]
    active = {}
    if skip_queued:
        try:
            active = queued_jobs(config, executor, folder, config_hash)
        except RuntimeError as error:
            warnings.warn(f"{error}; jobs of this sweep still queued would be submitted again", RuntimeWarning,
                          stacklevel=2)
    left_out = [(s, c) for s, c, _ in jobs_of_grid if (s, c) in active]
    jobs_of_grid = [(s, c, cfg) for s, c, cfg in jobs_of_grid if (s, c) not in active]
    if executor != "slurm":  # no dependency on a job of another submission: wait for its step 1 to finish
        waiting = {s for s, c in active if c == SHARED_CHAIN}
        left_out += [(s, c) for s, c, _ in jobs_of_grid if s in waiting]
        jobs_of_grid = [(s, c, cfg) for s, c, cfg in jobs_of_grid if s not in waiting]
    if left_out:
        print(f"left out {len(left_out)} job(s) of an earlier submission still queued or running (or waiting "
              "for one): " + ", ".join(f"seed{s}-{c}" + (f" (job {active[(s, c)][0]} {active[(s, c)][1]})"
                                                          if (s, c) in active else "") for s, c in left_out))

    def job(seed, chain, job_config):
        return ChainJob(job_config, seed, chain, num_threads=num_threads, progress=progress, on_event=on_event)

    def submit(items) -> list[SweepJob]:
        jobs = [SweepJob(s, c, j) for (s, c, _), j in zip(items, ex.submit_array([job(*t) for t in items]))]
        _note_submitted(folder, config_hash, executor, jobs)
        return jobs

    shared = [(s, c, cfg) for s, c, cfg in jobs_of_grid if c == SHARED_CHAIN]
    chains = [(s, c, cfg) for s, c, cfg in jobs_of_grid if c != SHARED_CHAIN]
    first = submit(shared) if shared else []
    submitted = list(first)
    step1_ids = {step1.seed: step1.job.job_id for step1 in first}
    step1_ids.update({s: active[(s, c)][0] for s, c in active if c == SHARED_CHAIN and s not in step1_ids})
    ready = [t for t in chains if t[0] not in step1_ids]  # their step 1 is finished
    if ready:
        submitted.extend(submit(ready))
    for seed, step1_id in sorted(step1_ids.items()):
        seed_chains = [t for t in chains if t[0] == seed]
        if not seed_chains:
            continue
        if executor == "slurm":
            extra = dict(cluster.get("slurm_parameters") or {})
            ex.update_parameters(slurm_additional_parameters={**extra, "dependency": f"afterok:{step1_id}",
                                                              "kill_on_invalid_dep": "yes"})
            submitted.extend(submit(seed_chains))
            ex.update_parameters(slurm_additional_parameters=extra)
        else:
            _result(next(j for j in first if j.seed == seed))  # no dependencies outside SLURM: wait for step 1
            submitted.extend(submit(seed_chains))
    return submitted


def _last_error_line(error: Exception) -> str:
    """The line of a job's error that says what went wrong (``ValueError: ...``), not its traceback."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:", line) or \
                re.match(r"^[A-Za-z_][\w.]*(Error|Exception)$", line):
            return line
    return lines[0] if lines else type(error).__name__  # e.g. submitit's "Job ... has not produced any output"


def _failure(sweep_job: SweepJob, error: Exception) -> str:
    paths = getattr(sweep_job.job, "paths", None)
    where = f" (logs: {paths.stderr})" if paths is not None else ""
    return f"sweep job {sweep_job.name} (id {sweep_job.job.job_id}) failed{where}: {_last_error_line(error)}"


def _result(sweep_job: SweepJob):
    try:
        return sweep_job.job.result()
    except Exception as error:  # submitit's FailedJobError / UncompletedJobError carry the job's log tail
        raise SweepError(_failure(sweep_job, error), [sweep_job], [None]) from None


def wait(jobs: Sequence[SweepJob], progress: bool = True) -> list[dict]:
    """Wait for every job and return their results (the dicts of :class:`ChainJob`), in the order given.

    Failed jobs do not stop the wait: once every job has ended, :class:`SweepError` (a RuntimeError) names
    each failed one (seed, chain, id, log file) and carries the others' results. Submitting the same sweep
    again then submits only the unfinished jobs, which resume from their checkpoints."""
    if isinstance(jobs, SweepJob) or not all(isinstance(j, SweepJob) for j in jobs):
        raise ValueError("jobs must be a list of SweepJob, as returned by submit_sweep")
    results, failed, messages = [], [], []
    for sweep_job in tqdm(jobs, desc="sweep jobs", unit="job", disable=not progress):
        try:
            results.append(sweep_job.job.result())
        except Exception as error:
            results.append(None)
            failed.append(sweep_job)
            messages.append(_failure(sweep_job, error))
    if failed:
        raise SweepError(f"{len(failed)} of {len(jobs)} sweep job(s) failed; submit the sweep again to resume "
                         "them:\n" + "\n".join(messages), failed, results)
    return results


# ------------------------------------------------------------------------------------------------ sweep files

# What a sweep file's ``cluster`` section may hold: the keyword arguments of submit_sweep and make_executor.
SWEEP_OPTIONS = ("executor", "folder", "num_threads", "partition", "gpus_per_job", "timeout_min", "cpus_per_job",
                 "mem_gb", "array_parallelism", "max_requeues", "job_name", "slurm_parameters")


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(SWEEP_OPTIONS))
    if unknown:
        raise ValueError(f"unknown cluster option(s) {unknown}; valid options: {sorted(SWEEP_OPTIONS)}")


def _yaml_loader():
    """PyYAML's SafeLoader, stricter and closer to YAML 1.2: a key given twice in one mapping raises (PyYAML
    keeps the last silently), and ``1e-3`` / ``5E+4`` are numbers (YAML 1.1, hence PyYAML, wants a dot: ``1.0e-3``,
    and reads ``1e-3`` as the string "1e-3")."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": merged keys may be given again
                continue
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"in the mapping starting at line {node.start_mark.line + 1}", node.start_mark,
                    f"key {key!r} is given twice (first at line {seen[key] + 1}); remove one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _json_object(pairs):
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} given twice in one object; remove one")
    return dict(pairs)


def _read_mapping(source, what: str) -> dict:
    """A JSON/YAML file (or an already-parsed mapping) as a dict. A malformed file raises ValueError naming the
    file, the line and what is wrong (no parser traceback); so does a key given twice."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            line = path.read_bytes()[:error.start].count(b"\n") + 1
            raise ValueError(f"{what} {path}, line {line}: not UTF-8 text (byte {error.object[error.start]:#04x}); "
                             f"save it as UTF-8") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                source = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = "; ".join(str(part) for part in (getattr(error, "context", None),
                                                          getattr(error, "problem", None)) if part) or str(error)
                if "'\\t'" in problem:
                    problem += " (YAML indents with spaces, not tabs)"
                raise ValueError(f"{what} {path}{where}: not valid YAML: {problem}") from None
        elif path.suffix.lower() == ".json":
            try:
                source = json.loads(text, object_pairs_hook=_json_object)
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} {path}, line {error.lineno}, column {error.colno}: not valid JSON: "
                                 f"{error.msg}") from None
            except ValueError as error:
                raise ValueError(f"{what} {path}: {error}") from None
        else:
            raise ValueError(f"{what} must end in .json, .yaml or .yml, got {path.name!r}")
    return source


def load_sweep_config(source, *, profile: str | None = None, train: dict | None = None,
                      options: dict | None = None):
    """A sweep from a YAML/JSON file (or the parsed mapping): ``(TrainConfig, options of submit_sweep)``.

    The file holds up to three keys::

        profile: paper            # the TrainConfig profile (default "paper")
        train: {seeds: [0, 1]}    # TrainConfig fields on top of the profile
        cluster:                  # keyword arguments of submit_sweep: executor, folder, num_threads, and
          executor: slurm         # make_executor's partition, gpus_per_job, timeout_min, cpus_per_job, mem_gb,
          partition: gpu          # array_parallelism, max_requeues, job_name, slurm_parameters
          gpus_per_job: 1
          timeout_min: 1440

    ``profile``, ``train`` and ``options`` override the file (the command line's options, say). Unknown keys
    raise ValueError naming them and the valid ones; the values are checked by TrainConfig here and by
    :func:`make_executor` when the sweep is submitted, before any job is. ``source=None``: no file.
    Then ``config, options = load_sweep_config(path)`` and ``submit_sweep(config, **options)``.
    """
    from sdlib.train import TrainConfig

    sweep = {} if source is None else _read_mapping(source, "sweep file")
    if not isinstance(sweep, dict):
        raise ValueError(f"a sweep file must be a mapping with keys profile, train, cluster; got "
                         f"{type(sweep).__name__}")
    unknown = sorted(set(sweep) - {"profile", "train", "cluster"})
    if unknown:
        raise ValueError(f"unknown sweep file key(s) {unknown}; valid keys: ['cluster', 'profile', 'train']")
    sections = {}
    for key, override in (("train", train), ("cluster", options)):
        section = sweep.get(key) or {}
        for value in (section, override or {}):
            if not isinstance(value, dict):
                raise ValueError(f"the sweep's {key!r} must be a mapping, got {value!r}")
        sections[key] = {**section, **(override or {})}
    _check_options(sections["cluster"])
    train_fields = dict(sections["train"])
    for name in ("seeds", "alphas"):  # YAML/JSON lists
        if isinstance(train_fields.get(name), list):
            train_fields[name] = tuple(train_fields[name])
    config = TrainConfig.from_profile(profile or sweep.get("profile") or "paper", **train_fields)
    return config, sections["cluster"]


# ----------------------------------------------------------------------------------------------- papermill


def load_parameter_sets(source) -> list[tuple[str, dict]]:
    """Parameter sets from a JSON/YAML file (or the already-parsed object): ``[(name, parameters), ...]``.

    Accepted forms: a list of ``{"name": ..., "parameters": {...}}``, or a mapping ``{name: {...}, ...}``.
    Names must be unique and usable as file names (letters, digits, ``_ . = -``)."""
    source = _read_mapping(source, "parameter file")
    if isinstance(source, dict):
        entries = [{"name": name, "parameters": params} for name, params in source.items()]
    elif isinstance(source, list):
        entries = source
    else:
        raise ValueError("parameter sets must be a list of {name, parameters} or a mapping name -> parameters, "
                         f"got {type(source).__name__}")
    if not entries:
        raise ValueError("parameter sets must not be empty")
    sets, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"name", "parameters"} or "name" not in entry:
            raise ValueError(f"parameter set #{i} must be a mapping with keys 'name' and 'parameters', got {entry!r}")
        name, params = entry["name"], entry.get("parameters") or {}
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"parameter set #{i}: name must be letters, digits, '_', '.', '=', '-' (a file "
                             f"name), got {name!r}")
        if name in seen:
            raise ValueError(f"parameter set #{i}: name {name!r} is used twice")
        if not isinstance(params, dict):
            raise ValueError(f"parameter set {name!r}: parameters must be a mapping, got {params!r}")
        seen.add(name)
        sets.append((name, dict(params)))
    return sets


def run_papermill_sweep(notebook: str | os.PathLike, parameter_sets, output_dir: str | os.PathLike =
                        "runs/papermill", *, kernel_name: str = "python3", cwd: str | os.PathLike | None = None,
                        progress: bool = True, stop_on_error: bool = True) -> list[Path]:
    """Execute ``notebook`` once per parameter set; keep each executed notebook as ``output_dir/<name>.ipynb``.

    parameter_sets : a JSON/YAML file or what :func:`load_parameter_sets` accepts. Every parameter is checked
    against the notebook's ``parameters`` cell (``papermill.inspect_notebook``) before anything runs: an unknown
    one raises ValueError listing the valid ones. cwd : the kernel's working directory (default: the
    notebook's folder). A failing notebook is kept too (papermill writes it up to the failing cell); with
    ``stop_on_error`` the sweep stops there (papermill's PapermillExecutionError), else it goes on and
    raises RuntimeError naming every failed set at the end. Returns the paths of the executed notebooks.
    """
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    sets = load_parameter_sets(parameter_sets)
    known = papermill.inspect_notebook(str(notebook))
    for name, params in sets:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"parameter set {name!r}: unknown parameter(s) {unknown} for {notebook.name}; "
                             f"its parameters are {sorted(known)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs, failed = [], []
    for name, params in tqdm(sets, desc=f"papermill {notebook.name}", unit="notebook", disable=not progress):
        output = output_dir / f"{name}.ipynb"
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel_name,
                                       cwd=str(cwd if cwd is not None else notebook.parent), progress_bar=False)
        except papermill.PapermillExecutionError as error:
            if stop_on_error:
                raise
            failed.append(f"{name}: {error.ename}: {error.evalue}")
        outputs.append(output)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(sets)} notebook run(s) failed (kept in {output_dir}): "
                           + "; ".join(failed))
    return outputs


# ---------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    from sdlib.train import _parser as train_parser

    p = train_parser()
    p.prog = "python -m sdlib.sweep"
    p.description = ("Submit the grid of self-distillation chains as jobs (submitit): one step-1 job per seed, "
                     "then one job per (seed, chain) depending on it; jobs already finished, and jobs of an earlier "
                     "submission still queued or running (squeue, or the local processes), are left out. "
                     "Training options as in sdlib.train; options given here override --config.")
    p.add_argument("--config", metavar="SWEEP_FILE",
                   help="a YAML/JSON sweep file (profile, train, cluster), e.g. sweeps/paper-slurm.yaml")
    g = p.add_argument_group("cluster (default: the sweep file's, else these)")
    g.add_argument("--executor", choices=EXECUTORS,
                   help="slurm: sbatch job arrays; local (default): subprocesses here; debug: in this process")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--gpus-per-job", type=int, help="GPUs per job (default: 1 on slurm, 0 locally)")
    g.add_argument("--time", type=int, dest="timeout_min",
                   help="time limit per job in minutes; a job reaching it is requeued and resumes (default 1440)")
    g.add_argument("--cpus", type=int, dest="cpus_per_job", help="CPUs per job")
    g.add_argument("--mem-gb", type=float, help="memory per job in GB")
    g.add_argument("--array-parallelism", type=int, help="jobs of one array running at once (slurm; default 64)")
    g.add_argument("--max-requeues", type=int, help="requeues after time limits (default 3)")
    g.add_argument("--log-folder", dest="folder", help="submitit's pickles and logs (default runs/submitit)")
    g.add_argument("--threads", type=int, dest="num_threads", help="torch CPU threads per job")
    g.add_argument("--no-wait", action="store_true", help="submit and return (slurm); default: wait and summarize")
    g.add_argument("--estimate", type=float, metavar="IMAGES_PER_S",
                   help="print the grid's cost at this measured training throughput and exit (submits nothing)")
    return p


def _print_dry_run(config, options: dict) -> None:
    """--dry-run: the config's hash, the jobs a submission would make now, and the grid's cost."""
    from sdlib.chains import job_config_hash, pending_tasks

    executor, folder = options.get("executor", "local"), options.get("folder", "runs/submitit")
    device = job_device(config, executor, options.get("gpus_per_job"))
    config_hash = job_config_hash(config, device)  # the hash the jobs record
    jobs = [(s, c) for s, c, cfg in job_configs(config) if pending_tasks(cfg, device=device)]
    try:
        active = queued_jobs(config, executor, folder, config_hash)
    except RuntimeError as error:
        active = {}
        print(f"({error})")
    print(f"config_hash {config_hash}; results in {config.results_dir}")
    print(f"would submit {len([j for j in jobs if j not in active])} of {len(job_configs(config))} jobs "
          f"({executor}); {len(active)} still queued or running:")
    for seed, chain in jobs:
        print(f"  seed{seed}-{chain}" + (f" (queued: job {active[(seed, chain)][0]})" if (seed, chain) in active
                                         else ""))
    cost = grid_cost(config)
    print(f"grid cost: {cost['jobs']} jobs; {cost['formula']}")


def main(argv: list[str] | None = None) -> list[SweepJob]:
    """The command line: read the sweep file (if any) and the options over it, build the TrainConfig and the
    executor (bad values: a clear error, exit code 2), submit the unfinished jobs, and (unless --no-wait) wait
    for them and print where the results are."""
    from sdlib.train import config_overrides

    parser = _parser()
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in SWEEP_OPTIONS if getattr(args, k, None) is not None}
    try:
        config, options = load_sweep_config(args.config, profile=args.profile, train=config_overrides(args),
                                            options=options)
        if args.skip_bad_lines:
            raise ValueError("--skip-bad-lines applies to python -m sdlib.train only; delete the unreadable line "
                             "that the error names (a sweep's jobs never skip lines)")
        if args.dry_run:
            _print_dry_run(config, options)
            return []
        if args.estimate is not None:
            cost = grid_cost(config, args.estimate)
            print(f"{cost['jobs']} jobs; {cost['formula']}")
            return []
        jobs = submit_sweep(config, progress=not args.no_progress, **options)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except SweepError as error:  # a step-1 job failed (local executor): one line, and where its log is
        raise SystemExit(f"{parser.prog}: {error}") from None
    executor, folder = options.get("executor", "local"), options.get("folder", "runs/submitit")
    skipped = len(job_configs(config)) - len(jobs)
    from sdlib.chains import job_config_hash

    config_hash = job_config_hash(config, job_device(config, executor, options.get("gpus_per_job")))
    print(f"submitted {len(jobs)} jobs ({executor}); config_hash {config_hash}; logs in {folder}"
          + (f"; {skipped} finished job(s) left out" if skipped else ""))
    for j in jobs:
        print(f"  {j.name}: job {j.job.job_id}")
    if jobs and not args.no_wait:
        try:
            wait(jobs, progress=not args.no_progress)
        except SweepError as error:
            raise SystemExit(f"{error}\nrecords so far in {Path(config.results_dir) / 'records.jsonl'}") from None
    if not args.no_wait:
        print(f"all jobs finished; records in {Path(config.results_dir) / 'records.jsonl'}")
    return jobs


if __name__ == "__main__":
    main()
