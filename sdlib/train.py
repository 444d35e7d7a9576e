"""The command line ``python -m sdlib.train --profile fast --epochs 10 --seeds 0 1`` (``--help``), and the
pipeline's public names. Every option is a TrainConfig field: its type, choices, help (the field's docstring) and
default (each profile's) are read from the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from sdlib import data as cifar  # noqa: F401  (tests patch cifar.load_splits through here)
from sdlib.chains import grid_cost, grid_tasks, job_config, pending_tasks, provenance, run_chains
from sdlib.config import FIELD_CHOICES, PROFILES, TrainConfig, effective_config, field_docs, resolve_device
from sdlib.lean_step import distillation_loss
from sdlib.models import build_model
from sdlib.step import distill_step, evaluate, l2_penalty

__all__ = ["PROFILES", "TrainConfig", "build_model", "distillation_loss", "l2_penalty", "evaluate", "distill_step",
           "run_chains", "pending_tasks", "effective_config", "resolve_device", "provenance", "config_overrides",
           "print_dry_run", "main"]

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_LISTS = {"seeds": int, "alphas": float, "alpha_hat_bounds": float}  # "0,1,2" or "0 1 2"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _default(name: str) -> str:
    """A field's default for --help: each profile's value where a profile sets it."""
    if name == "profile":
        return "default: paper"
    if any(name in values for values in PROFILES.values()):
        return "default: the profile's, " + ", ".join(
            f"{p} {_shown(values.get(name, _FIELDS[name].default))}" for p, values in PROFILES.items())
    return f"default: {_shown(_FIELDS[name].default)}"


def _list_item(name: str):
    """argparse's type of a list option's tokens: "0,1" -> [0, 1]; "none" -> None for alpha_hat_bounds."""
    def parse(token: str):
        if name == "alpha_hat_bounds" and token.strip().lower() in ("none", "null"):
            return None
        return [_LISTS[name](part) for part in token.replace(",", " ").split()]

    parse.__name__ = _LISTS[name].__name__  # argparse: "argument --alphas: invalid float value: '0,x'"
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlib.train",
                                description="Self-distillation chains on CIFAR-10 (resumable). Results go to "
                                            "runs/cifar10 (git-ignored) unless --results-dir names another folder; "
                                            "the committed results/ is written only when named there.")
    for name, field in _FIELDS.items():
        option = "--" + ("alpha-hat" if name == "include_alpha_hat" else name.replace("_", "-"))
        kind, help_text = field.type.split(" | ")[0], f"{field_docs()[name]} ({_default(name)})"
        if kind == "bool":
            p.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif name in _LISTS:
            p.add_argument(option, dest=name, nargs="+", type=_list_item(name), help=help_text,
                           metavar="BOUND" if name == "alpha_hat_bounds" else None)
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


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that the options parsed by :func:`_parser` set (but ``profile``)."""
    overrides = {name: value for name, value in vars(args).items()
                 if name in _FIELDS and name != "profile" and value is not None}
    for name in _LISTS.keys() & overrides.keys():
        if None in overrides[name] and len(overrides[name]) > 1:
            raise ValueError("--alpha-hat-bounds takes two numbers, or 'none' alone")
        overrides[name] = None if None in overrides[name] else tuple(x for item in overrides[name] for x in item)
    return overrides


def print_dry_run(config: TrainConfig, device: str | None = None, skip_bad_lines: bool = False) -> str | None:
    """--dry-run: ``config`` as it would run on ``device`` (default: this machine's) with the data's fingerprint,
    its config_hash, the pending (seed, chain, step) and the grid's cost; trains, decodes and writes nothing.
    Returns the fingerprint (taken once here: it lists every image, 0.2 s for CIFAR-10)."""
    device = device or str(resolve_device(config.device))
    found = cifar.data_fingerprint(config.data_root)
    fingerprint = config.data_fingerprint or found
    pinned = dataclasses.replace(config, data_fingerprint=fingerprint)
    resolved = job_config(pinned, device)  # bf16 / channels_last off the GPU: shown in the config
    pending = pending_tasks(pinned, skip_bad_lines, device)
    print(f"resolved config (as it would run on {device}):")
    print("".join(f"  {k}: {v}\n" for k, v in resolved.to_dict().items()), end="")
    note = "" if found else f" (no data under {config.data_root}: " + (
        "the pinned data_fingerprint" if config.data_fingerprint else "a run would stop") + ")"
    print(f"config_hash: {resolved.config_hash(fingerprint)}{note}")
    print(f"pending: {len(pending)} of {len(grid_tasks(config))} (seed, chain, step) without a record in "
          f"{config.results_dir}" + (":" if pending else ""))
    print("".join(f"  seed {seed}, {chain}, step {step}\n" for seed, chain, step in pending), end="")
    cost = grid_cost(resolved)
    print(f"grid cost: {cost['jobs']} sweep jobs; {cost['formula']} (the whole grid, finished steps included)")
    return fingerprint


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: parse, build the TrainConfig (invalid values: a clear error and exit code 2), run
    (or, with --dry-run, print what would run)."""
    parser = _parser()
    args = parser.parse_args(argv)
    trained = []  # step_end events of the models trained by this call
    try:
        config = TrainConfig.from_profile(args.profile or "paper", **config_overrides(args))
        if args.dry_run:
            print_dry_run(config, skip_bad_lines=args.skip_bad_lines)
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
