"""The grid of self-distillation chains as submitit jobs: ``python -m sdlib.sweep --help``.

Per seed a step-1 job, then one job per (seed, chain) (:func:`sdlib.chains.job_configs`): on SLURM an array that
depends on the seed's step-1 job, locally submitted once it has finished. Preempted jobs are requeued and resume.
Submitting again leaves out the finished jobs and those still queued or running (``folder/sweep-<hash>.jsonl``,
their state submitit's). Sweep files: :func:`load_sweep_config`, ``sweeps/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from sdlib.chains import grid_cost, job_config_hash, job_configs, pending_tasks, run_chains
from sdlib.checks import boolean, check, integer, kind, number, optional
from sdlib.config import TrainConfig
from sdlib.parameter_files import read_mapping
from sdlib.records import SHARED_CHAIN
from sdlib.train import _parser as train_parser, config_overrides, print_dry_run

__all__ = ["EXECUTORS", "SWEEP_OPTIONS", "ChainJob", "SweepJob", "SweepError", "job_configs", "job_device",
           "grid_cost", "make_executor", "queued_jobs", "submit_sweep", "wait", "load_sweep_config",
           "main"]

EXECUTORS = ("local", "slurm", "debug")
# What a sweep file's ``cluster`` section may hold: the keyword arguments of submit_sweep and make_executor.
SWEEP_OPTIONS = ("executor", "folder", "num_threads", "partition", "gpus_per_job", "timeout_min", "cpus_per_job",
                 "mem_gb", "array_parallelism", "max_requeues", "job_name", "slurm_parameters")


def job_device(config, executor: str = "local", gpus_per_job: int | None = None) -> str | None:
    """The device the jobs of ``config`` run on, for the hash they record: ``config.device`` where named; with
    "auto", cuda for jobs given a GPU (SLURM's default: 1), cpu for jobs given none (local jobs by default), and
    None for debug jobs (they run in this process)."""
    if config.device != "auto" or executor == "debug":
        return None if config.device == "auto" else config.device
    return "cuda" if (gpus_per_job if gpus_per_job is not None else int(executor == "slurm")) > 0 else "cpu"


class ChainJob:
    """One job: :func:`sdlib.chains.run_chains` on a config cut to one seed and chain, requeued on a preemption.

    on_event: a picklable callable given every training event with ``attempt`` added. Returns a dict: seed, chain,
    attempt (times requeued), started_at / finished_at, trained (``(chain, step, epoch)`` of this attempt), records."""

    def __init__(self, config, seed: int, chain: str, num_threads: int | None = None,
                 progress: bool = True, on_event: Callable[[dict], None] | None = None):
        self.config, self.seed, self.chain = config, seed, chain
        self.num_threads, self.progress, self.on_event = num_threads, progress, on_event
        self.attempt = 0

    def __repr__(self) -> str:
        return f"ChainJob(seed={self.seed}, chain={self.chain!r}, attempt={self.attempt})"

    def __call__(self) -> dict:
        import torch

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
        """Requeue this job unchanged but counted (``run_chains`` resumes from its own checkpoints)."""
        import submitit

        self.attempt += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclasses.dataclass
class SweepJob:
    """A submitted job: its seed, chain ("shared" for step 1) and submitit Job."""

    seed: int
    chain: str
    job: Any

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.chain}"


class SweepError(RuntimeError):
    """Jobs of a sweep failed: ``failed`` (those SweepJobs) and ``results`` (:func:`wait`'s, None where failed)."""

    def __init__(self, message: str, failed: list[SweepJob], results: list[dict | None]):
        super().__init__(message)
        self.failed, self.results = failed, results


def make_executor(executor: str = "local", folder: str | os.PathLike = "runs/submitit", *,
                  partition: str | None = None, gpus_per_job: int | None = None, timeout_min: int = 1440,
                  cpus_per_job: int | None = None, mem_gb: float | None = None, array_parallelism: int = 64,
                  max_requeues: int = 3, job_name: str = "sdlib-sweep", slurm_parameters: dict | None = None):
    """A ``submitit.AutoExecutor`` for ``executor`` ("local", "slurm" or "debug"), its options checked first.
    gpus_per_job: default 1 on SLURM, 0 locally. slurm_parameters: extra ``#SBATCH`` options (``{"qos": "high"}``)."""
    import submitit

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if partition is not None and (not isinstance(partition, str) or not partition):
        raise ValueError(f"partition must be a non-empty string or None, got {partition!r}")
    if slurm_parameters is not None and not isinstance(slurm_parameters, dict):
        raise ValueError(f"slurm_parameters must be a dict or None, got {slurm_parameters!r}")
    check("gpus_per_job", gpus_per_job, optional(integer(0))), check("cpus_per_job", cpus_per_job, optional(integer(1)))
    check("mem_gb", mem_gb, optional(number(0, low_open=True)))
    for name, value, minimum in (("timeout_min", timeout_min, 1), ("array_parallelism", array_parallelism, 1),
                                 ("max_requeues", max_requeues, 0)):
        check(name, value, integer(minimum))
    ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=executor, slurm_max_num_timeout=max_requeues,
                               local_max_num_timeout=max_requeues)
    gpus = (1 if executor == "slurm" else 0) if gpus_per_job is None else gpus_per_job
    params = {"timeout_min": timeout_min, "name": job_name, "gpus_per_node": gpus, "cpus_per_task": cpus_per_job,
              "mem_gb": mem_gb}
    if executor == "slurm":  # submitit's default signal: USR2 90 s before the limit, time for one atomic save
        params.update(slurm_array_parallelism=array_parallelism, slurm_partition=partition,
                      slurm_additional_parameters=dict(slurm_parameters or {}))
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None and v != {}})
    return ex


def _local_job_alive(job_id: str) -> bool:
    """Whether a local job of an earlier submission (its id is its pid) still runs: submitit knows a local job's
    state only in the process that submitted it."""
    try:
        os.kill(int(job_id), 0)
        return b"submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()  # a reused pid is not our job
    except (ValueError, ProcessLookupError, PermissionError, OverflowError):
        return False
    except OSError:
        return True


def queued_jobs(config, executor: str = "local", folder: str | os.PathLike = "runs/submitit",
                config_hash: str | None = None) -> dict[tuple[int, str], tuple[str, str]]:
    """``{(seed, chain): (job id, state)}`` of the jobs an earlier :func:`submit_sweep` into ``folder`` submitted
    that are still queued or running: on SLURM by submitit's state (one ``sacct``; unknown: left out, with a
    RuntimeWarning), locally by whether the job's process runs."""
    manifest = Path(folder) / f"sweep-{config_hash or config.config_hash()}.jsonl"
    if executor == "debug" or not manifest.is_file():
        return {}
    latest = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a torn line: not known to be queued
            entry = json.loads(line)
            if entry["executor"] == executor:
                latest[(entry["seed"], entry["chain"])] = str(entry["job_id"])
    if executor != "slurm":
        return {key: (job_id, "RUNNING") for key, job_id in latest.items() if _local_job_alive(job_id)}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()  # a fresh one: the shared watcher caches states across submissions
    for job_id in latest.values():
        watcher.register_job(job_id)
    watcher.update()
    states = {key: watcher.get_state(job_id, mode="cache") for key, job_id in latest.items()}
    unknown = [latest[key] for key, state in states.items() if state == "UNKNOWN"]
    if unknown:
        warnings.warn(f"could not ask the SLURM queue about job(s) {', '.join(unknown)} (sacct, through submitit): "
                      "if they are still queued, they will be submitted again", RuntimeWarning, stacklevel=3)
    return {key: (latest[key], state) for key, state in states.items()
            if state != "UNKNOWN" and not watcher.is_done(latest[key], mode="cache")}


def _unfinished(jobs_of_grid: list[tuple[int, str, TrainConfig]], device: str | None,
                fingerprint: str | None) -> list:
    """The jobs with a step left to train (:func:`sdlib.chains.pending_tasks`), asked with the data's
    ``fingerprint`` taken once by the caller rather than once per job (0.2 s each for CIFAR-10: 11 s for the paper
    grid's 52 jobs). The jobs themselves are submitted with their configs as they were."""
    return [(s, c, cfg) for s, c, cfg in jobs_of_grid
            if pending_tasks(dataclasses.replace(cfg, data_fingerprint=fingerprint), device=device)]


def submit_sweep(config, executor: str = "local", folder: str | os.PathLike = "runs/submitit", *,
                 num_threads: int | None = None, progress: bool = True,
                 on_event: Callable[[dict], None] | None = None, skip_finished: bool = True,
                 skip_queued: bool = True, **cluster) -> list[SweepJob]:
    """Submit the grid of ``config`` as jobs; return them (step-1 jobs first, then chains).

    skip_finished / skip_queued: leave out the jobs whose steps all have a record / the jobs of an earlier
    submission still queued or running (:func:`queued_jobs`; printed). cluster: :func:`make_executor`'s options.
    SLURM returns at once; local and debug first wait for the step-1 jobs (a failed one raises :class:`SweepError`
    naming its log), then submit the chains. :func:`wait` waits for the rest."""
    jobs_of_grid = job_configs(config)  # validates config
    check("num_threads", num_threads, optional(integer(1)))
    check("on_event", on_event, optional(kind("callable", callable)))
    check("skip_finished", skip_finished, boolean()), check("skip_queued", skip_queued, boolean())
    _check_options(cluster)
    ex = make_executor(executor, folder, **cluster)  # validates the cluster options before any submission
    device = job_device(config, executor, cluster.get("gpus_per_job"))
    fingerprint = config.resolved_data_fingerprint()  # once, for the questions asked here
    config_hash = job_config_hash(dataclasses.replace(config, data_fingerprint=fingerprint), device)  # the jobs'
    if skip_finished:
        jobs_of_grid = _unfinished(jobs_of_grid, device, fingerprint)
    active = queued_jobs(config, executor, folder, config_hash) if skip_queued else {}
    waiting = {s for s, c in active if c == SHARED_CHAIN} if executor != "slurm" else set()
    left_out = [(s, c) for s, c, _ in jobs_of_grid if (s, c) in active or s in waiting]
    jobs_of_grid = [(s, c, cfg) for s, c, cfg in jobs_of_grid if (s, c) not in left_out]
    if left_out:
        print(f"left out {len(left_out)} job(s) of an earlier submission still queued or running (or waiting "
              "for one): " + ", ".join(f"seed{s}-{c}" + (f" (job {active[(s, c)][0]} {active[(s, c)][1]})"
                                                          if (s, c) in active else "") for s, c in left_out))

    def submit(items) -> list[SweepJob]:
        jobs = ex.submit_array([ChainJob(cfg, s, c, num_threads, progress, on_event) for s, c, cfg in items])
        jobs = [SweepJob(s, c, job) for (s, c, _), job in zip(items, jobs)]
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"sweep-{config_hash}.jsonl", "a", encoding="utf-8") as manifest:
            manifest.writelines(json.dumps({"job_id": str(j.job.job_id), "seed": j.seed, "chain": j.chain,
                                            "executor": executor, "submitted_at": time.time()}) + "\n" for j in jobs)
        return jobs

    shared = [t for t in jobs_of_grid if t[1] == SHARED_CHAIN]
    chains = [t for t in jobs_of_grid if t[1] != SHARED_CHAIN]
    submitted = submit(shared) if shared else []
    step1_ids = {s: id_ for (s, c), (id_, _) in active.items() if c == SHARED_CHAIN}
    step1_ids.update({j.seed: j.job.job_id for j in submitted})
    ready = [t for t in chains if t[0] not in step1_ids]  # their step 1 is finished
    submitted += submit(ready) if ready else []
    for seed, step1_id in sorted(step1_ids.items()):
        seed_chains = [t for t in chains if t[0] == seed]
        if seed_chains and executor == "slurm":
            extra = dict(cluster.get("slurm_parameters") or {})
            ex.update_parameters(slurm_additional_parameters={**extra, "dependency": f"afterok:{step1_id}",
                                                              "kill_on_invalid_dep": "yes"})
            submitted += submit(seed_chains)
            ex.update_parameters(slurm_additional_parameters=extra)
        elif seed_chains:  # no dependencies outside SLURM: wait for step 1 (of this submission: see waiting)
            step1 = next(j for j in submitted if j.seed == seed and j.chain == SHARED_CHAIN)
            if _failure(step1):
                raise SweepError(_failure(step1), [step1], [None])
            submitted += submit(seed_chains)
    return submitted


def _failure(sweep_job: SweepJob) -> str | None:
    """None when the job succeeded (after waiting for it), else one line: the job, its log and its error's last
    ``SomeError: ...`` line (not the traceback submitit's error carries)."""
    try:
        sweep_job.job.result()
        return None
    except Exception as error:
        named = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b(?:.*:.*|\s*$))", str(error),
                           re.MULTILINE)
        paths = getattr(sweep_job.job, "paths", None)
        return (f"sweep job {sweep_job.name} (id {sweep_job.job.job_id}) failed"
                + (f" (logs: {paths.stderr})" if paths is not None else "") + ": "
                + (named[-1].strip() if named else str(error).strip().split("\n")[0] or type(error).__name__))


def wait(jobs: Sequence[SweepJob], progress: bool = True) -> list[dict]:
    """Every job's result (:class:`ChainJob`'s dict), in order; failed jobs do not stop the wait: then
    :class:`SweepError` names each (id, log) and carries the others' results."""
    if isinstance(jobs, SweepJob) or not all(isinstance(j, SweepJob) for j in jobs):
        raise ValueError("jobs must be a list of SweepJob, as returned by submit_sweep")
    failures = [_failure(j) for j in tqdm(jobs, desc="sweep jobs", unit="job", disable=not progress)]
    results = [None if failure else j.job.result() for j, failure in zip(jobs, failures)]
    failed = [j for j, failure in zip(jobs, failures) if failure]
    if failed:
        raise SweepError(f"{len(failed)} of {len(jobs)} sweep job(s) failed; submit the sweep again to resume "
                         "them:\n" + "\n".join(f for f in failures if f), failed, results)
    return results


# ------------------------------------------------------------------------------------------------ sweep files


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(SWEEP_OPTIONS))
    if unknown:
        raise ValueError(f"unknown cluster option(s) {unknown}; valid options: {sorted(SWEEP_OPTIONS)}")


def load_sweep_config(source, *, profile: str | None = None, train: dict | None = None,
                      options: dict | None = None) -> tuple[TrainConfig, dict]:
    """A sweep from a YAML/JSON file (or the parsed mapping; None: no file): ``(TrainConfig, options of
    submit_sweep)``. The file holds up to three keys::

        profile: paper            # the TrainConfig profile (default "paper")
        train: {seeds: [0, 1]}    # TrainConfig fields on top of the profile
        cluster:                  # keyword arguments of submit_sweep (executor, folder, num_threads) and of
          executor: slurm         # make_executor (partition, gpus_per_job, timeout_min, ...: SWEEP_OPTIONS)

    ``profile``, ``train`` and ``options`` (the command line's) override the file. Unknown keys raise ValueError."""
    sweep = {} if source is None else read_mapping(source, "sweep file")
    if not isinstance(sweep, dict):
        raise ValueError(f"a sweep file must be a mapping with keys profile, train, cluster; got "
                         f"{type(sweep).__name__}")
    unknown = sorted(set(sweep) - {"profile", "train", "cluster"})
    if unknown:
        raise ValueError(f"unknown sweep file key(s) {unknown}; valid keys: ['cluster', 'profile', 'train']")
    sections = {}
    for key, override in (("train", train), ("cluster", options)):
        for value in (sweep.get(key) or {}, override or {}):
            if not isinstance(value, dict):
                raise ValueError(f"the sweep's {key!r} must be a mapping, got {value!r}")
        sections[key] = {**(sweep.get(key) or {}), **(override or {})}
    _check_options(sections["cluster"])
    return TrainConfig.from_profile(profile or sweep.get("profile") or "paper", **sections["train"]), \
        sections["cluster"]


# ---------------------------------------------------------------------------------------------- command line


def _parser():
    p = train_parser()
    p.prog = "python -m sdlib.sweep"
    p.description = ("Submit the grid of self-distillation chains as jobs (submitit): one step-1 job per seed, "
                     "then one job per (seed, chain) depending on it; jobs already finished, and jobs of an earlier "
                     "submission still queued or running, are left out. Training options as in sdlib.train; "
                     "options given here override --config.")
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
    """--dry-run: sdlib.train's (as the jobs would run), then the jobs a submission would make now."""
    executor, folder = options.get("executor", "local"), options.get("folder", "runs/submitit")
    device = job_device(config, executor, options.get("gpus_per_job"))
    fingerprint = print_dry_run(config, device)
    jobs = [(s, c) for s, c, _ in _unfinished(job_configs(config), device, fingerprint)]
    active = queued_jobs(config, executor, folder,
                         job_config_hash(dataclasses.replace(config, data_fingerprint=fingerprint), device))
    print(f"would submit {len([j for j in jobs if j not in active])} of {len(job_configs(config))} jobs "
          f"({executor}); {len(active)} still queued or running:")
    print("".join(f"  seed{s}-{c}" + (f" (queued: job {active[(s, c)][0]})" if (s, c) in active else "") + "\n"
                  for s, c in jobs), end="")


def main(argv: list[str] | None = None) -> list[SweepJob]:
    """The command line: the sweep file and the options over it (bad values: exit code 2), submitted, waited for."""
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
    config_hash = job_config_hash(config, job_device(config, executor, options.get("gpus_per_job")))
    print(f"submitted {len(jobs)} jobs ({executor}); config_hash {config_hash}; logs in {folder}"
          + (f"; {skipped} finished job(s) left out" if skipped else ""))
    print("".join(f"  {j.name}: job {j.job.job_id}\n" for j in jobs), end="")
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
