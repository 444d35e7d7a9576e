"""The command line of the pipeline, ``python -m sdlib.train --profile fast --epochs 10 --seeds 0 1`` (``--help``
lists the options), and the pipeline's public names: :mod:`sdlib.config` (:class:`TrainConfig`, the profiles),
:mod:`sdlib.step` (one step) and :mod:`sdlib.chains` (the chains of steps, records, resume).

Every option is a TrainConfig field: its name, type, choices, help text (the field's docstring) and default (the
profiles' values) are read from the dataclass, so they are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from sdlib import data as cifar  # noqa: F401  (tests patch cifar.load_splits through here)
from sdlib.chains import grid_cost, grid_tasks, job_config, pending_tasks, provenance, run_chains
from sdlib.config import FIELD_CHOICES, PROFILES, TrainConfig, effective_config, field_docs, resolve_device
from sdlib.records import chain_name
from sdlib.models import build_model
from sdlib.lean_step import distillation_loss
from sdlib.step import StepResult, distill_step, epoch_order, evaluate, l2_penalty, teacher_probs

__all__ = ["PROFILES", "TrainConfig", "StepResult", "build_model", "distillation_loss", "l2_penalty", "evaluate",
           "distill_step", "teacher_probs", "epoch_order", "run_chains", "pending_tasks", "effective_config",
           "resolve_device", "provenance", "chain_name", "config_overrides", "dry_run", "main"]

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_OPTION_NAMES = {"include_alpha_hat": "alpha-hat"}  # --alpha-hat / --no-alpha-hat
_LISTS = {"seeds": int, "alphas": float, "alpha_hat_bounds": float}  # "0,1,2" or "0 1 2"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _default(name: str) -> str:
    """The default of a field for --help: each profile's value where a profile sets it."""
    if any(name in values for values in PROFILES.values()):
        return "default: the profile's, " + ", ".join(
            f"{p} {_shown(values.get(name, _FIELDS[name].default))}" for p, values in PROFILES.items())
    return f"default: {_shown(_FIELDS[name].default)}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlib.train",
                                description="Self-distillation chains on CIFAR-10 (resumable). Results go to "
                                            "runs/cifar10 (git-ignored) unless --results-dir names another folder; "
                                            "the committed results/ is written only when named there.")
    for name, field in _FIELDS.items():
        option = "--" + _OPTION_NAMES.get(name, name.replace("_", "-"))
        kind = field.type.split(" | ")[0]
        help_text = f"{field_docs()[name]} ({_default(name) if name != 'profile' else 'default: paper'})"
        if kind == "bool":
            p.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif name in _LISTS:
            metavar = "BOUND" if name == "alpha_hat_bounds" else None
            p.add_argument(option, dest=name, nargs="+", metavar=metavar, help=help_text)
        else:
            p.add_argument(option, dest=name, type={"int": int, "float": float}.get(kind, str),
                           choices=FIELD_CHOICES.get(name), help=help_text)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: neither training nor image decoding (default: shown)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip unreadable lines of records.jsonl with a warning (default: stop, naming the file "
                        "and line)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, its config_hash, the pending (seed, chain, step) and the grid's "
                        "cost, then exit without training or writing anything (default: train)")
    return p


def _numbers(name: str, tokens: list[str]):
    """A list option's tokens ("0,1" or "0" "1") as a tuple; alpha_hat_bounds also takes "none" (unbounded)."""
    option = "--" + name.replace("_", "-")
    if name == "alpha_hat_bounds" and any(t.strip().lower() in ("none", "null") for t in tokens):
        if len(tokens) != 1:
            raise ValueError(f"{option} takes two numbers or 'none', got {tokens!r}")
        return None
    kind = _LISTS[name]
    try:
        return tuple(kind(part) for token in tokens for part in token.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{option} must be a list of {kind.__name__}s such as "
                         f"{'0,1,2' if kind is int else '0,0.5,1'}, got {' '.join(tokens)!r}") from None


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that the parsed options of :func:`_parser` set (options not given are left out;
    so is ``profile``, and so are the options that are not fields)."""
    overrides = {name: value for name, value in vars(args).items()
                 if name in _FIELDS and name != "profile" and value is not None}
    overrides.update({name: _numbers(name, overrides[name]) for name in _LISTS if name in overrides})
    return overrides


def dry_run(config: TrainConfig, skip_bad_lines: bool = False) -> dict:
    """What a run of ``config`` would do, without training or writing: the resolved config (as it would run
    on this machine, the data's fingerprint filled in), its config_hash, the pending (seed, chain, step) and
    the cost of the grid (:func:`sdlib.chains.grid_cost`). Printed by ``--dry-run``."""
    device = resolve_device(config.device)
    resolved = job_config(config, str(device))  # bf16 / channels_last off the GPU: shown in the config
    fingerprint = resolved.resolved_data_fingerprint()
    pending = pending_tasks(config, skip_bad_lines=skip_bad_lines, device=str(device))
    return {"config": {**resolved.to_dict(), "data_fingerprint": fingerprint}, "device": str(device),
            "config_hash": resolved.config_hash(fingerprint), "pending": pending, "cost": grid_cost(resolved),
            "data_found": cifar.data_fingerprint(resolved.data_root) is not None}


def _print_dry_run(config: TrainConfig, skip_bad_lines: bool) -> None:
    plan = dry_run(config, skip_bad_lines=skip_bad_lines)
    print("resolved config (as it would run on " + plan["device"] + "):")
    print("".join(f"  {name}: {value}\n" for name, value in plan["config"].items()), end="")
    print(f"config_hash: {plan['config_hash']}" + ("" if plan["data_found"] else f" (no data under "
          f"{config.data_root}: " + ("the pinned data_fingerprint" if config.data_fingerprint else "a run would stop")
          + ")"))
    pending = plan["pending"]
    print(f"pending: {len(pending)} of {len(grid_tasks(config))} (seed, chain, step) without a record in "
          f"{config.results_dir}" + (":" if pending else ""))
    print("".join(f"  seed {seed}, {chain}, step {step}\n" for seed, chain, step in pending), end="")
    print(f"grid cost: {plan['cost']['jobs']} sweep jobs; {plan['cost']['formula']} (the whole grid, finished "
          "steps included)")


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: parse, build the TrainConfig (invalid values: a clear error and exit code 2), run
    (or, with --dry-run, print what would run)."""
    parser = _parser()
    args = parser.parse_args(argv)
    trained = []  # step_end events of the models trained by this call
    try:
        config = TrainConfig.from_profile(args.profile or "paper", **config_overrides(args))
        if args.dry_run:
            _print_dry_run(config, args.skip_bad_lines)
            return []
        start = time.perf_counter()
        records = run_chains(config, progress=not args.no_progress, skip_bad_lines=args.skip_bad_lines,
                             callback=lambda event: trained.append(event) if event["event"] == "step_end" else None)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    images = sum(event["train_images"] for event in trained)
    seconds = sum(event["train_time_s"] / event.get("in_flight", 1) for event in trained)  # a group's time once
    print(f"{len(records)} records in {config.results_dir} (config_hash {records[0]['config_hash']}); "
          f"{len(trained)} model(s) trained in {time.perf_counter() - start:.1f} s")
    print(f"training throughput: {images / seconds:.1f} images/s ({images} images in {seconds:.1f} s)" if trained
          else "nothing to train: every step of this config was already finished")
    return records


if __name__ == "__main__":
    main()
