"""Self-distillation chains of ResNet-50 on CIFAR-10: the command line, and the pipeline's public names.

The pipeline lives in three modules: :mod:`sdlib.config` (:class:`TrainConfig` and its profiles),
:mod:`sdlib.step` (one step: the model, the loss, the L2 term, the epoch loop) and :mod:`sdlib.chains` (the
chains of steps, alpha-hat, records and resume). Their public names are importable from here too.

Command line: ``python -m sdlib.train --profile fast --epochs 10 --seeds 0 1`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from sdlib import data as cifar  # noqa: F401  (tests patch cifar.load_splits through here)
from sdlib.chains import _tasks as _all_tasks
from sdlib.chains import job_config, pending_tasks, provenance, run_chains
from sdlib.config import (CAPTURE_MODES, CHAINS_IN_FLIGHT, DATA_ORDERS, MODELS, PROFILES, TEACHER_BN_MODES,
                          TrainConfig, effective_config, resolve_device)
from sdlib.records import chain_name
from sdlib.models import build_model
from sdlib.lean_step import distillation_loss
from sdlib.step import StepResult, distill_step, epoch_order, evaluate, l2_penalty, teacher_probs

__all__ = [
    "PROFILES",
    "TrainConfig",
    "StepResult",
    "build_model",
    "distillation_loss",
    "l2_penalty",
    "evaluate",
    "distill_step",
    "teacher_probs",
    "epoch_order",
    "run_chains",
    "pending_tasks",
    "effective_config",
    "resolve_device",
    "provenance",
    "chain_name",
    "config_overrides",
    "dry_run",
    "main",
]


# ----------------------------------------------------------------------------------------------- command line


def _parse_list(kind, name):
    """argparse type for one token of a list option: "0,1,2" or "0" (several tokens are joined later)."""
    def parse(text: str):
        try:
            return tuple(kind(part) for part in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a list of {kind.__name__}s such as "
                                             f"{'0,1,2' if kind is int else '0,0.5,1'}, got {text!r}") from None
    return parse


def _parse_bounds_token(text: str):
    """argparse type for one token of --alpha-hat-bounds: numbers ("0,1" or "0" then "1") or "none"."""
    if text.strip().lower() in ("none", "null"):
        return "none"
    return _parse_list(float, "--alpha-hat-bounds")(text)


def _alpha_hat_bounds(tokens: list) -> tuple[float, ...] | None:
    if "none" in tokens:
        if tokens != ["none"]:
            raise ValueError(f"--alpha-hat-bounds takes two numbers or 'none', got {tokens!r}")
        return None
    return tuple(value for token in tokens for value in token)  # TrainConfig checks there are two


def _default(name: str) -> str:
    """The default of a TrainConfig field for --help: the profiles' values where they set it."""
    def shown(value):
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
        return "none" if value is None else value

    if any(name in values for values in PROFILES.values()):
        return "default: the profile's, " + ", ".join(
            f"{p} {shown(values.get(name, _FIELD_DEFAULTS[name]))}" for p, values in PROFILES.items())
    return f"default: {shown(_FIELD_DEFAULTS[name])}"


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlib.train",
                                description="Self-distillation chains of ResNet-50 on CIFAR-10 (resumable). Results "
                                            "go to runs/cifar10 (git-ignored) unless --results-dir names another "
                                            "folder; the committed results/ is written only when named there.")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="paper: the protocol as the paper describes it (batch 16, Adam 1e-4, 75 epochs, "
                        "eval-mode teacher, 5,000 held out, alpha-hat unbounded); official: the authors' code as "
                        "it ran (teacher BatchNorm in train mode, all 50,000 images, one fixed data order, fixed "
                        "alphas only); fast: batch 256, lr 1e-3, warmup+cosine, bf16 (CUDA); paper-bf16: the paper "
                        "profile in bf16 autocast and channels_last (CUDA); cpu: the small cnn4 network trained "
                        "to convergence on a 2-core CPU (10,000 training images, 2,000 held out, batch 256, Adam "
                        "2e-3, warmup+cosine, 15 epochs, bf16 autocast on CPUs with native bf16, every value "
                        "measured: benchmarks/cpu_throughput.py) (default: paper)")
    p.add_argument("--model", choices=MODELS,
                   help="the network: resnet50 (the paper's) or cnn4 (four 3x3 convolutions for 32x32 images, "
                        f"sdlib.models) ({_default('model')})")
    p.add_argument("--epochs", type=int, help=f"epochs per step ({_default('epochs')})")
    p.add_argument("--batch-size", type=int, help=f"training batch size ({_default('batch_size')})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({_default('lr')})")
    p.add_argument("--l2-coef", type=float,
                   help=f"coefficient of the L2 term, the sum of the parameter tensors' norms ({_default('l2_coef')})")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help=f"learning rate after the warmup ({_default('lr_schedule')})")
    p.add_argument("--warmup-epochs", type=int,
                   help=f"epochs of linear warmup, per batch ({_default('warmup_epochs')})")
    p.add_argument("--seeds", type=_parse_list(int, "--seeds"), nargs="+",
                   help=f"e.g. 0,1,2,3 or 0 1 2 3 ({_default('seeds')})")
    p.add_argument("--steps", type=int,
                   help=f"steps per chain; step 1 is the shared labels-only model ({_default('steps')})")
    p.add_argument("--alphas", type=_parse_list(float, "--alphas"), nargs="+",
                   help=f"fixed alphas, e.g. 0,0.5,1 or 0 0.5 1; '' for none ({_default('alphas')})")
    p.add_argument("--no-alpha-hat", action="store_true",
                   help="leave out the alpha-hat chain (default: it is trained)")
    p.add_argument("--alpha-hat-bounds", nargs="+", metavar="BOUND", type=_parse_bounds_token,
                   help="two numbers LOW HIGH to clip Algorithm 1's least-squares alpha to (0 1, 0,1, or =-1,2 "
                        "for a negative LOW), or 'none' for the unbounded estimate "
                        f"({_default('alpha_hat_bounds')})")
    p.add_argument("--teacher-bn", choices=TEACHER_BN_MODES,
                   help="the teacher's BatchNorm: eval (running statistics) or train (each batch's statistics, as "
                        "the authors' teacher ran; its running statistics are not changed) "
                        f"({_default('teacher_bn')})")
    p.add_argument("--data-order", choices=DATA_ORDERS,
                   help="reshuffle (a new order every epoch) or fixed (one permutation of the seed for every epoch "
                        f"and step, as the authors' DataLoader) ({_default('data_order')})")
    p.add_argument("--n-val", type=int,
                   help="validation images held out of the training set, stratified; 0 trains on all of it (no "
                        f"alpha-hat chain then) ({_default('n_val')})")
    p.add_argument("--split-seed", type=int, help=f"seed of the validation split and subsets ({_default('split_seed')})")
    p.add_argument("--subset", type=int,
                   help="cut every part to this many images, for smoke runs (default: all images)")
    p.add_argument("--label-noise", type=float,
                   help="fraction in [0, 1) of training and validation labels replaced by another class drawn "
                        "uniformly, the same for every step and chain of a seed; test labels stay clean "
                        f"({_default('label_noise')})")
    p.add_argument("--data-root",
                   help=f"CIFAR-10: torchvision's cifar-10-batches-py/ or an ImageFolder with train/ and test/ "
                        f"({_default('data_root')})")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 with torchvision if absent (timeout: $SDLIB_DOWNLOAD_TIMEOUT seconds of "
                        "silence, default 60; default: no download)")
    p.add_argument("--results-dir",
                   help=f"where records.jsonl and epochs.jsonl are appended ({_default('results_dir')}, "
                        "git-ignored; the committed results/cifar10 only when named here)")
    p.add_argument("--checkpoint-dir",
                   help=f"final weights (the next step's teachers) and resumable states ({_default('checkpoint_dir')})")
    p.add_argument("--device", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--eval-batch-size", type=int, help=f"batch size of evaluation ({_default('eval_batch_size')})")
    p.add_argument("--checkpoint-every", type=int,
                   help=f"epochs between resumable checkpoints ({_default('checkpoint_every')})")
    p.add_argument("--eval-every", type=int,
                   help="epochs between evaluations of val/test; the last epoch is always evaluated and is what the "
                        f"records hold ({_default('eval_every')})")
    p.add_argument("--test-every", type=int,
                   help="epochs between evaluations of the test set (the last epoch always) "
                        f"({_default('test_every')}; none: as --eval-every)")
    p.add_argument("--chains-in-flight", choices=CHAINS_IN_FLIGHT,
                   help="how the chains of a step train: streams (each its own network, together on the same "
                        "batches, on its own CUDA stream on a GPU), batched (one batched network) or off (one at "
                        "a time) "
                        f"({_default('chains_in_flight')})")
    p.add_argument("--capture", choices=CAPTURE_MODES,
                   help="how the training step runs: auto (one CUDA graph on CUDA, eager elsewhere), none, or graph "
                        f"(CUDA only) ({_default('capture')})")
    p.add_argument("--data-fingerprint",
                   help="the data's fingerprint (sdlib.data.data_fingerprint): the run refuses other data under "
                        "--data-root (default: none, the fingerprint of the data found there)")
    p.add_argument("--no-bf16", action="store_true",
                   help="float32 instead of bf16 autocast (default: the profile's, used on CUDA, and for the small "
                        "networks on a CPU with native bf16)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="the default memory format instead of channels_last (default: the profile's, CUDA only)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: neither training nor image decoding (default: shown)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip unreadable lines of records.jsonl with a warning (default: stop, naming the file "
                        "and line)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, its config_hash, the pending (seed, chain, step) and the grid's "
                        "cost, then exit without training or writing anything (default: train)")
    return p


# Flags of _parser() that are not TrainConfig fields under their own name.
_FLAGS = {"no_alpha_hat": ("include_alpha_hat", False), "no_bf16": ("bf16", False),
          "no_channels_last": ("channels_last", False), "download": ("download", True)}


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that the parsed options of :func:`_parser` set (options not given are left out;
    so are ``profile`` and ``no_progress``, and the options a caller added to the parser)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"profile"} - set(_FLAGS)  # --download: a flag
    overrides = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    for name in ("seeds", "alphas"):  # nargs="+" of comma lists -> one flat tuple
        if name in overrides:
            overrides[name] = tuple(value for token in overrides[name] for value in token)
    if "alpha_hat_bounds" in overrides:  # "none" -> None (unbounded), else the two numbers
        overrides["alpha_hat_bounds"] = _alpha_hat_bounds(overrides["alpha_hat_bounds"])
    overrides.update(setting for flag, setting in _FLAGS.items() if getattr(args, flag))
    return overrides


def dry_run(config: TrainConfig, skip_bad_lines: bool = False) -> dict:
    """What a run of ``config`` would do, without training or writing: the resolved config (as it would run
    on this machine, the data's fingerprint filled in), its config_hash, the pending (seed, chain, step) and
    the cost of the grid (:func:`sdlib.sweep.grid_cost`). Printed by ``--dry-run``."""
    from sdlib import data as data_module
    from sdlib.sweep import grid_cost

    device = resolve_device(config.device)
    resolved = job_config(config, str(device))  # bf16 / channels_last off the GPU: shown in the config
    fingerprint = resolved.resolved_data_fingerprint()
    pending = pending_tasks(config, skip_bad_lines=skip_bad_lines, device=str(device))
    return {"config": {**resolved.to_dict(), "data_fingerprint": fingerprint}, "device": str(device),
            "config_hash": resolved.config_hash(fingerprint), "data_found": data_module.data_fingerprint(
                resolved.data_root) is not None, "pending": pending, "cost": grid_cost(resolved)}


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: parse, build the TrainConfig (invalid values: a clear error and exit code 2), run
    (or, with --dry-run, print what would run)."""
    parser = _parser()
    args = parser.parse_args(argv)
    trained = []  # step_end events of the models trained by this call

    def collect(event):
        if event["event"] == "step_end":
            trained.append(event)

    try:
        config = TrainConfig.from_profile(args.profile or "paper", **config_overrides(args))
        if args.dry_run:
            plan = dry_run(config, skip_bad_lines=args.skip_bad_lines)
            print("resolved config (as it would run on " + plan["device"] + "):")
            for name, value in plan["config"].items():
                print(f"  {name}: {value}")
            print(f"config_hash: {plan['config_hash']}"
                  + ("" if plan["data_found"] else f" (no data under {config.data_root}: "
                     + ("the pinned data_fingerprint" if config.data_fingerprint else "a run would stop") + ")"))
            total = len(_all_tasks(config))
            print(f"pending: {len(plan['pending'])} of {total} (seed, chain, step) without a record in "
                  f"{config.results_dir}" + (":" if plan["pending"] else ""))
            for seed, chain, step in plan["pending"]:
                print(f"  seed {seed}, {chain}, step {step}")
            cost = plan["cost"]
            print(f"grid cost: {cost['jobs']} sweep jobs; {cost['formula']} (the whole grid, finished steps "
                  "included)")
            return []
        start = time.perf_counter()
        records = run_chains(config, progress=not args.no_progress, callback=collect,
                             skip_bad_lines=args.skip_bad_lines)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    images = sum(event["train_images"] for event in trained)
    seconds = sum(event["train_time_s"] / event.get("in_flight", 1) for event in trained)  # a group's time once
    print(f"{len(records)} records in {config.results_dir} (config_hash {records[0]['config_hash']}); "
          f"{len(trained)} model(s) trained in {time.perf_counter() - start:.1f} s")
    if trained:
        print(f"training throughput: {images / seconds:.1f} images/s ({images} images in {seconds:.1f} s)")
    else:
        print("nothing to train: every step of this config was already finished")
    return records


if __name__ == "__main__":
    main()
