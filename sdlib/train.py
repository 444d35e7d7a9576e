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
from sdlib.chains import pending_tasks, provenance, run_chains
from sdlib.config import CAPTURE_MODES, CHAINS_IN_FLIGHT, PROFILES, TrainConfig, effective_config, resolve_device
from sdlib.records import chain_name
from sdlib.step import StepResult, build_model, distill_step, distillation_loss, evaluate, l2_penalty

__all__ = [
    "PROFILES",
    "TrainConfig",
    "StepResult",
    "build_model",
    "distillation_loss",
    "l2_penalty",
    "evaluate",
    "distill_step",
    "run_chains",
    "pending_tasks",
    "effective_config",
    "resolve_device",
    "provenance",
    "chain_name",
    "config_overrides",
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlib.train",
                                description="Self-distillation chains of ResNet-50 on CIFAR-10 (resumable).")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="paper (default): the authors' protocol; paper-bf16: the same in bf16 autocast (CUDA); "
                        "fast: batch 256, lr 1e-3, warmup+cosine, bf16 (CUDA)")
    p.add_argument("--epochs", type=int, help="epochs per step")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--l2-coef", type=float)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"))
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--seeds", type=_parse_list(int, "--seeds"), nargs="+", help="e.g. 0,1,2,3 or 0 1 2 3")
    p.add_argument("--steps", type=int, help="steps per chain (step 1 is the shared labels-only model)")
    p.add_argument("--alphas", type=_parse_list(float, "--alphas"), nargs="+",
                   help="fixed alphas, e.g. 0,0.5,1 or 0 0.5 1 ('' for none)")
    p.add_argument("--no-alpha-hat", action="store_true", help="leave out the alpha-hat chain")
    p.add_argument("--n-val", type=int)
    p.add_argument("--split-seed", type=int)
    p.add_argument("--subset", type=int, help="cut every part to this many images (smoke runs)")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if absent")
    p.add_argument("--results-dir")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--checkpoint-every", type=int, help="epochs between resumable checkpoints")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations (and the last; default 5)")
    p.add_argument("--chains-in-flight", choices=CHAINS_IN_FLIGHT,
                   help="the chains of a step: streams (default; each its own network, together), batched (one "
                        "batched network) or off (one at a time)")
    p.add_argument("--capture", choices=CAPTURE_MODES,
                   help="the training step: auto (default: one CUDA graph on CUDA), none, graph, or a "
                        "torch.compile mode")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-progress", action="store_true")
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
    overrides.update(setting for flag, setting in _FLAGS.items() if getattr(args, flag))
    return overrides


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: parse, build the TrainConfig (invalid values: a clear error and exit code 2), run."""
    parser = _parser()
    args = parser.parse_args(argv)
    trained = []  # step_end events of the models trained by this call

    def collect(event):
        if event["event"] == "step_end":
            trained.append(event)

    try:
        config = TrainConfig.from_profile(args.profile or "paper", **config_overrides(args))
        start = time.perf_counter()
        records = run_chains(config, progress=not args.no_progress, callback=collect)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    images = sum(event["train_images"] for event in trained)
    seconds = sum(event["train_time_s"] for event in trained)
    print(f"{len(records)} records in {config.results_dir} (config_hash {records[0]['config_hash']}); "
          f"{len(trained)} model(s) trained in {time.perf_counter() - start:.1f} s")
    if trained:
        print(f"training throughput: {images / seconds:.1f} images/s ({images} images in {seconds:.1f} s)")
    else:
        print("nothing to train: every step of this config was already finished")
    return records


if __name__ == "__main__":
    main()
