"""Chains of self-distillation steps: the shared step-1 model per seed, the fixed-alpha chains and the alpha-hat
chain (Algorithm 1), resumable, with their records and provenance.

Layout of a run (see :func:`run_chains`)::

    results_dir/records.jsonl        one JSON object per (config_hash, seed, chain, step): final metrics, config,
                                     provenance (appended through sdlib.store; other configs' records stay)
    results_dir/epochs.jsonl         one per (config_hash, seed, chain, step, epoch): the training curves
    results_dir/probe_epochs.jsonl   the same for the alpha-hat chain's alpha = 0 probes (chain "alpha_hat_probe")
    checkpoint_dir/<config_hash>/seed<s>/<chain>/step<t>.pt        final weights, the next step's teacher
    checkpoint_dir/<config_hash>/seed<s>/<chain>/step<t>.state.pt  resumable state while the step trains
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from sdlib import data as cifar
from sdlib.alpha import least_squares_alpha
from sdlib.checks import check, integer, kind, number, optional
from sdlib.config import LABEL_NOISE, NUM_CLASSES, TrainConfig, derive_seed, device_precision, effective_config, \
    resolve_device
from sdlib.models import build_model
from sdlib.records import ALPHA_HAT_CHAIN, PROBE_CHAIN, SHARED_CHAIN, chain_name, remove_stale_temporaries
from sdlib.store import ResultsStore, check_writable_dir
from sdlib.step import Member, atomic_torch_save, distill_group, load_checkpoint

__all__ = ["run_chains", "pending_tasks", "grid_tasks", "job_configs", "grid_cost", "provenance", "DataMismatchError",
           "job_config", "job_config_hash", "noisy_splits"]


# --------------------------------------------------------------------------------------- records and provenance


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = []
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine() or device.type


def provenance(device: torch.device) -> dict:
    """Where and with what a result was produced (the date is filled in per record). ``git_commit``: the
    environment variable ``SDLIB_GIT_COMMIT`` where set (a launcher that ships a copy of the working tree names
    the commit it sent; ``git_dirty`` is then None: unknown), else git's HEAD, else "unknown"."""
    commit, status = os.environ.get("SDLIB_GIT_COMMIT") or None, None
    if commit is None:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": None if status is None else bool(status),
            "device_name": _device_name(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------- chains


def noisy_splits(data, rate: float, seed: int):
    """The splits a seed trains on: ``data`` with ``rate`` of its training and of its validation labels replaced
    by another class (:func:`sdlib.data.symmetric_label_noise`: exactly ``round(rate * n)`` of each split, drawn
    from streams keyed by the seed, so the same labels for every step and chain of a seed). Test labels stay
    clean. ``meta["label_noise"]`` records the rate and how many labels of each split were changed."""
    labels = {}
    for k, part in enumerate(("train", "val")):
        clean = getattr(data, f"y_{part}")
        if rate == 0.0 or len(clean) == 0:
            labels[part] = clean
            continue
        noisy = cifar.symmetric_label_noise(clean.cpu().numpy(), rate, NUM_CLASSES,
                                            seed=derive_seed(seed, k, 0, LABEL_NOISE))
        labels[part] = torch.from_numpy(noisy).to(clean.device)
    counts = {f"{part}_changed": int((labels[part] != getattr(data, f"y_{part}")).sum()) for part in labels}
    meta = {**data.meta, "label_noise": {"rate": rate, "seed": seed, **counts}}
    return dataclasses.replace(data, y_train=labels["train"], y_val=labels["val"], meta=meta)


# A record's metrics, in the order its JSON line holds them (from the model's summary).
_RECORD_METRICS = ("alpha", "alpha_hat", "alpha_hat_unconstrained", "probe_val_acc", "probe_test_acc", "epochs",
                   "val_acc", "val_loss", "test_acc", "test_loss", "best_test_acc", "best_test_epoch", "train_loss",
                   "wall_time_s", "images_per_s")


def _checkpoint(root: Path, key: tuple, suffix: str = ".pt") -> Path:
    """Where the final model of ``key`` = (seed, chain, step) lives under ``root`` (``.state.pt``: while it trains)."""
    return root / f"seed{key[0]}" / key[1] / f"step{key[2]}{suffix}"


def _teacher(key: tuple) -> tuple:
    """The model a step distills from: its chain's previous step (a probe's: the alpha-hat chain's), the shared
    step-1 model at step 2."""
    seed, chain, step = key
    previous = ALPHA_HAT_CHAIN if chain == PROBE_CHAIN else chain
    return (seed, SHARED_CHAIN, 1) if step == 2 else (seed, previous, step - 1)


def _probe(config: TrainConfig, seed: int, step: int) -> tuple:
    """The alpha = 0 probe of an alpha-hat step. At step 2 it (teacher: the shared model; init and data order of
    (seed, 2)) is exactly the alpha = 0 chain's step 2: that one where the chain is part of the run."""
    return (seed, chain_name(0.0), 2) if step == 2 and 0.0 in config.alphas else (seed, PROBE_CHAIN, step)


def _needs(config: TrainConfig, key: tuple) -> list[tuple]:
    """The models whose final checkpoints training ``key`` reads: its teacher, and for the alpha-hat chain the
    step-1 model and the probe (their validation outputs)."""
    seed, chain, step = key
    if step < 2 or chain == chain_name(1.0):  # alpha = 1: the labels alone
        return []
    extra = [(seed, SHARED_CHAIN, 1), _probe(config, seed, step)] if chain == ALPHA_HAT_CHAIN else []
    return [_teacher(key), *extra]


class _ChainRunner:
    """The bookkeeping of :func:`run_chains`: which model of (seed, chain, step) exists where, and training the
    missing ones with the right teacher."""

    def __init__(self, config: TrainConfig, device: torch.device, progress: bool, callback, store: ResultsStore,
                 config_hash: str):
        self.config, self.device, self.progress, self.callback = config, device, progress, callback
        self.hash, self.store, self.records = config_hash, store, store.records(config_hash)
        self.ckpt_root = Path(config.checkpoint_dir) / config_hash
        self.clean_data = self.data = self.data_seed = self.provenance = None  # data: with the seed's label noise
        self.models: dict[tuple, torch.nn.Module] = {}  # final models of the latest step, as teachers
        self.summaries: dict[tuple, dict] = {}  # metrics + val_probs of every model met so far

    def ensure_data(self, seed: int):
        """Load the splits once; ``self.data``: those of ``seed`` (its label noise, if any)."""
        if self.clean_data is None:
            c = self.config
            self.clean_data = cifar.load_splits(c.data_root, n_val=c.n_val, split_seed=c.split_seed, subset=c.subset,
                                                device=self.device, download=False,
                                                progress=None if self.progress else False)
            _check_fingerprint(c, self.clean_data.meta["fingerprint"])
            self.provenance = provenance(self.device)
        if self.data_seed != seed:
            self.data, self.data_seed = noisy_splits(self.clean_data, self.config.label_noise, seed), seed

    def _load_or_train(self, key, cache: dict):
        """``cache[key]``: in memory, else from the final checkpoint of ``key``, else trained (again)."""
        if key not in cache:
            if _checkpoint(self.ckpt_root, key).is_file():
                self.load_final(key)
            else:
                self.train([key])
        return cache[key]

    def model(self, key) -> torch.nn.Module:
        return self._load_or_train(key, self.models)

    def summary(self, key) -> dict:
        return self._load_or_train(key, self.summaries)

    def load_final(self, key):
        checkpoint = load_checkpoint(_checkpoint(self.ckpt_root, key))
        channels_last = device_precision(self.config, self.device)[1]
        model = build_model(model=self.config.model, empty=True).to(
            self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.load_state_dict(checkpoint["model"])
        self.models[key], self.summaries[key] = model.eval(), checkpoint["summary"]

    def alpha_for(self, key) -> tuple[float, dict]:
        """The alpha of a step and, for the alpha-hat chain, the probe's alpha_hat / accuracies."""
        seed, chain, step = key
        if chain in (SHARED_CHAIN, PROBE_CHAIN):
            return (1.0 if chain == SHARED_CHAIN else 0.0), {}
        if chain != ALPHA_HAT_CHAIN:  # the config's alpha itself: the chain's name rounds it to 6 digits
            return {chain_name(a): a for a in self.config.alphas}[chain], {}
        probe = self.summary(_probe(self.config, seed, step))
        f1 = self.summary((seed, SHARED_CHAIN, 1))["val_probs"]
        self.ensure_data(seed)
        onehot = F.one_hot(self.data.y_val.cpu(), NUM_CLASSES).double().numpy()
        f1, g = f1.cpu().double().numpy(), probe["val_probs"].cpu().double().numpy()
        # Algorithm 1: the least-squares alpha over all reals, then clipped to alpha_hat_bounds (None: not at all).
        unconstrained = least_squares_alpha(onehot, f1, g, bounds=None)
        bounds = self.config.alpha_hat_bounds
        alpha_hat = unconstrained if bounds is None else min(max(unconstrained, bounds[0]), bounds[1])
        return alpha_hat, {"alpha_hat": alpha_hat, "alpha_hat_unconstrained": unconstrained,
                           "probe_val_acc": probe["val_acc"], "probe_test_acc": probe["test_acc"]}

    def append_epoch(self, log: dict, probe: bool) -> None:
        self.store.append_epoch({**log, "config_hash": self.hash, "profile": self.config.profile}, probe=probe)

    def train(self, keys):
        """Train the models ``keys`` (all of one (seed, step)) in flight (:func:`sdlib.step.distill_group`), each
        with its alpha and teacher; then save, record and announce each (:meth:`finish`)."""
        seed, step = keys[0][0], keys[0][2]
        if any((k[0], k[2]) != (seed, step) for k in keys):
            raise ValueError(f"models trained in flight must share seed and step, got {keys}")
        members, extras = [], []
        for key in keys:
            alpha, extra = self.alpha_for(key)
            teacher = self.model(_teacher(key)) if alpha != 1.0 else None
            for suffix in (".state.pt", ".pt"):  # what a killed save left (only we write there)
                remove_stale_temporaries(_checkpoint(self.ckpt_root, key, suffix))
            members.append(Member(key[1], alpha, teacher, _checkpoint(self.ckpt_root, key, ".state.pt"),
                                  functools.partial(self.append_epoch, probe=key[1] == PROBE_CHAIN)))
            extras.append(extra)
        self.ensure_data(seed)
        results = distill_group(self.config, self.data, seed=seed, step=step, members=members, device=self.device,
                                callback=self.callback, progress=self.progress)
        for key, member, result, extra in zip(keys, members, results, extras):
            self.finish(key, result, member.alpha, extra, in_flight=len(keys))

    def finish(self, key, result, alpha: float, extra: dict, in_flight: int = 1):
        """A trained model: its final checkpoint (then its resumable state goes), summary, record, event."""
        seed, chain, step = key
        summary = {**result.summary(), "alpha": float(alpha), **extra, "val_probs": result.val_probs}
        atomic_torch_save({"model": result.model.state_dict(), "summary": summary, "config_hash": self.hash,
                           "seed": seed, "chain": chain, "step": step}, _checkpoint(self.ckpt_root, key))
        _checkpoint(self.ckpt_root, key, ".state.pt").unlink(missing_ok=True)
        self.summaries[key] = summary
        if chain != PROBE_CHAIN:  # a probe is never a teacher: only its summary is kept
            self.models[key] = result.model
            self.write_record(key)
        if self.callback is not None:
            metrics = {k: v for k, v in summary.items() if k != "val_probs"}
            self.callback({"event": "step_end", "seed": seed, "chain": chain, "step": step,
                           "epoch": self.config.epochs, **metrics, "in_flight": in_flight,
                           "record": self.records.get(key)})

    def in_flight(self, seed, step) -> list[tuple]:
        """What trains together at (seed, step >= 2): every fixed-alpha chain without a final model yet and, when
        the alpha-hat step is still to train, its probe (same init and batches). The alpha-hat step itself needs
        the probe's outputs, so it trains after the group."""
        keys = [(seed, chain, step) for chain in self.config.chains if chain != ALPHA_HAT_CHAIN]
        hat = (seed, ALPHA_HAT_CHAIN, step)
        if ALPHA_HAT_CHAIN in self.config.chains and hat not in self.records \
                and not _checkpoint(self.ckpt_root, hat).is_file():
            probe = _probe(self.config, seed, step)
            if probe not in keys and probe not in self.summaries:
                keys.append(probe)
        return [key for key in keys if key not in self.records and not _checkpoint(self.ckpt_root, key).is_file()]

    def write_record(self, key):
        seed, chain, step = key
        s = self.summaries[key]
        self.ensure_data(seed)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"seed": seed, "chain": chain, "step": step, **{name: s.get(name) for name in _RECORD_METRICS},
                  "profile": self.config.profile, "config_hash": self.hash, "config": self.config.to_dict(),
                  "provenance": {**self.provenance, "date": date}, "data": self.data.meta}
        self.store.append_record(record)  # appended: records of other configs stay, the last of a key counts
        self.records[key] = record

    def release_before(self, seed, step):
        """Free the models no later step needs (teachers are always the previous step)."""
        for key in [k for k in self.models if k[0] != seed or k[2] < step]:
            del self.models[key]


def grid_tasks(config: TrainConfig) -> list[tuple[int, str, int]]:
    """(seed, chain, step) in training order: per seed, step by step, every chain of a step in turn (the
    chains of one step are independent of each other, which a batched trainer can exploit)."""
    return [task for seed in config.seeds for task in [(seed, SHARED_CHAIN, 1)] + [
        (seed, chain, step) for step in range(2, config.steps + 1) for chain in config.chains]]


def job_configs(config: TrainConfig) -> list[tuple[int, str, TrainConfig]]:
    """The grid as jobs (sdlib.sweep): ``(seed, chain, config of the job)``, per seed the step-1 job (chain
    "shared") then one per chain (steps 2..steps; the alpha-hat job trains its own alpha = 0 probe at step 2).
    Every job's config has ``config``'s config_hash: only seeds, alphas and steps differ."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a sdlib.train.TrainConfig, got {type(config).__name__}")
    jobs = []
    for seed in config.seeds:
        cut = functools.partial(dataclasses.replace, config, seeds=(seed,))
        jobs.append((seed, SHARED_CHAIN, cut(steps=1, alphas=(), include_alpha_hat=False)))
        if config.steps >= 2:
            jobs += [(seed, chain_name(a), cut(alphas=(a,), include_alpha_hat=False)) for a in config.alphas]
            jobs += [(seed, ALPHA_HAT_CHAIN, cut(alphas=()))] if config.include_alpha_hat else []
    return jobs


def grid_cost(config: TrainConfig, images_per_s: float | None = None, n_train_images: int | None = None) -> dict:
    """What the grid of ``config`` trains as a sweep (evaluation not counted): a dict of jobs, models (per seed
    the step-1 model, one per (chain, step >= 2), an alpha = 0 probe per alpha-hat step), images_per_epoch,
    train_images, images_per_s and seconds (None without a measured ``images_per_s``), formula.
    ``n_train_images``: images per epoch before the last partial batch is dropped (default: from the config)."""
    check("images_per_s", images_per_s, optional(number(0, low_open=True)))
    if n_train_images is None:
        n_train_images = min(cifar.CIFAR10_TRAIN_IMAGES - config.n_val, config.subset or cifar.CIFAR10_TRAIN_IMAGES)
    check("n_train_images", n_train_images, integer(1))
    models = len(config.seeds) * (1 + (config.steps - 1) * (len(config.alphas) + 2 * config.include_alpha_hat))
    images_per_epoch = n_train_images // config.batch_size * config.batch_size
    train_images = models * config.epochs * images_per_epoch
    seconds = None if images_per_s is None else train_images / images_per_s
    formula = (f"{models} models x {config.epochs} epochs x {images_per_epoch:,} images = {train_images:,} images"
               + ("" if seconds is None else f"; / {images_per_s:g} images/s = {seconds:,.0f} s "
                  f"= {seconds / 3600:,.1f} h (one worker)"))
    return {"jobs": len(job_configs(config)), "models": models, "images_per_epoch": images_per_epoch,
            "train_images": train_images, "images_per_s": images_per_s, "seconds": seconds, "formula": formula}


class DataMismatchError(ValueError):
    """The data under ``data_root`` are not those the config's ``data_fingerprint`` names."""


def _check_fingerprint(config: TrainConfig, actual: str | None) -> None:
    if config.data_fingerprint is not None and actual is not None and actual != config.data_fingerprint:
        raise DataMismatchError(
            f"the CIFAR-10 copy under data_root {config.data_root!r} has fingerprint {actual}, but the config's "
            f"data_fingerprint is {config.data_fingerprint}: its records and teachers belong to other data. Point "
            f"data_root at the data the config was made for, or drop data_fingerprint (results then go under the "
            f"hash of these data)")


def job_config(config: TrainConfig, device: str | None = None) -> TrainConfig:
    """``config`` as its job will run it on ``device`` (default: ``config.device``, "auto" resolved here; a sweep
    names its jobs' device): :func:`sdlib.config.effective_config`, the config whose hash its records get."""
    if device is None:
        device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with warnings.catch_warnings():  # the run itself warns about bf16 / channels_last off the GPU
        warnings.simplefilter("ignore", RuntimeWarning)
        return effective_config(config, torch.device(device))


def job_config_hash(config: TrainConfig, device: str | None = None) -> str:
    """The config_hash the records of ``config`` get when it runs on ``device`` (see :func:`job_config`)."""
    return job_config(config, device).config_hash()


def pending_tasks(config: TrainConfig, skip_bad_lines: bool = False,
                  device: str | None = None) -> list[tuple[int, str, int]]:
    """The (seed, chain, step) of ``config`` that :func:`run_chains` would record, in training order: those
    without a record of its hash (as it runs on ``device``, :func:`job_config`) in ``results_dir``, and finished
    ones whose final checkpoint a pending step needs and is gone. No torch work; no data where
    ``config.data_fingerprint`` is set."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    config = job_config(config, device)
    config_hash = config.config_hash()
    done = ResultsStore(config.results_dir, skip_bad_lines).records(config_hash)
    tasks = grid_tasks(config)
    pending = {task for task in tasks if task not in done}
    # A finished step whose final checkpoint is gone is trained again when a pending step needs it (as a
    # teacher, or for the alpha-hat chain's step-1 and probe outputs): it is pending too.
    ckpt_root = Path(config.checkpoint_dir) / config_hash
    stack = list(pending)
    while stack:
        for key in _needs(config, stack.pop()):
            if key not in pending and not _checkpoint(ckpt_root, key).is_file():
                pending.add(key)
                stack.append(key)
    return [task for task in tasks if task in pending]


def run_chains(config: TrainConfig, progress: bool = True, callback: Callable[[dict], None] | None = None,
               skip_bad_lines: bool = False) -> list[dict]:
    """Train every (seed, chain, step) of ``config`` not finished yet; return all their records, one per (seed,
    chain, step) in training order (:func:`grid_tasks`).

    Per seed: the shared step-1 model (labels only), then for each step t >= 2 every fixed-alpha chain (teacher:
    the chain's step t-1, the shared model at t = 2) and the alpha-hat chain (an alpha = 0 probe from the previous
    alpha-hat model, then alpha-hat = :func:`sdlib.alpha.least_squares_alpha` of the one-hot validation labels and
    the step-1 and probe validation outputs, clipped to ``alpha_hat_bounds``). With ``chains_in_flight`` other
    than "off" the fixed-alpha chains of a (seed, step) and the probe train together.

    Resumable and extendable: a step with a record of this ``config_hash`` in ``results_dir`` is skipped, an
    unfinished one resumes from its last epoch checkpoint; more seeds, chains and steps reuse what exists, data
    other than ``data_fingerprint``'s raise :class:`DataMismatchError`, before any work.
    ``skip_bad_lines``: skip unreadable lines of records.jsonl with a warning instead of raising.

    ``callback(event)`` gets a dict at every epoch end (``event="epoch_end"``: seed, chain, step, epoch, the
    metrics) and step end (``"step_end"``: the step's metrics, ``in_flight``, and its ``record``, None for a
    probe); raising from it stops the run, which a later call resumes. A record holds seed, chain, step, the
    metrics of ``_RECORD_METRICS`` (the last epoch's; loss: MSE of softmax outputs to one-hot labels; train_loss
    with the L2 term), profile, config_hash, config (as run), provenance and data (the splits' meta).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    check("callback", callback, optional(kind("callable", callable)))
    device = resolve_device(config.device)
    config = effective_config(config, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    actual = cifar.data_fingerprint(config.data_root)
    if actual is None and config.data_fingerprint is None and not config.download:
        raise FileNotFoundError(cifar.how_to_get_data(config.data_root))
    store = ResultsStore(config.results_dir, skip_bad_lines)
    store.check_writable()
    check_writable_dir(config.checkpoint_dir, "checkpoint_dir")
    if actual is None and config.download:
        cifar.download_cifar10(config.data_root)
        actual = cifar.data_fingerprint(config.data_root)
    _check_fingerprint(config, actual)
    config_hash = config.config_hash(actual)
    runner = _ChainRunner(config, device, progress, callback, store, config_hash)
    check_writable_dir(runner.ckpt_root, "checkpoint_dir")
    tasks = grid_tasks(config)
    pending = [task for task in tasks if task not in runner.records]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="self-distillation", unit="step",
               disable=not progress or not pending)
    for seed, chain, step in tasks:
        if (seed, chain, step) in runner.records:
            continue
        bar.set_description(f"seed {seed} step {step} {chain}")
        runner.release_before(seed, step - 1)
        before = len(runner.records)
        if _checkpoint(runner.ckpt_root, (seed, chain, step)).is_file():  # trained, stopped before its record
            runner.load_final((seed, chain, step))
            runner.write_record((seed, chain, step))
        elif config.chains_in_flight != "off" and step >= 2 and chain != ALPHA_HAT_CHAIN:
            runner.train(runner.in_flight(seed, step))
        else:
            runner.train([(seed, chain, step)])
        bar.update(len(runner.records) - before)
    bar.close()
    return [runner.records[task] for task in tasks]
