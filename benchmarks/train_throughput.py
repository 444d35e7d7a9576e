"""Training throughput of ResNet-50 self-distillation, measured side by side on one device.

Every variant trains a student ResNet-50 (torchvision, 10 classes, ImageNet stem) on real CIFAR-10 images with
the distillation loss against a teacher ResNet-50 (alpha = 0.5, so the teacher's forward pass runs every batch),
Adam and the paper's unsquared L2 term:

  reference  a plain PyTorch loop as the authors' code would be written: torchvision transforms (RandomCrop 32
             with padding 4, RandomHorizontalFlip, ToTensor, Normalize) on PIL images through a DataLoader
             (``--workers`` processes), float32, batch 16, per-parameter norms in a Python sum, teacher under
             no_grad, ``loss.item()`` once per batch for the running loss;
  paper      our trainer, :func:`sdlib.train.distill_step` itself at the paper profile (batch 16, float32, data
             resident on the device, augmentation on the device, the lean step: L2 gradient without autograd,
             fused Adam, static buffers; on CUDA the whole step captured as one CUDA graph, ``--capture``);
  paper-bf16 the same in bf16 autocast and channels_last (the ``paper-bf16`` profile);
  fast       the same function at the fast profile (batch 256, bf16 autocast, channels_last);
  streams    ``--chains`` models of one (seed, step) in flight as ``run_chains`` trains them
             (:func:`sdlib.step.distill_group`, ``chains_in_flight="streams"``): 11 fixed alphas and the
             alpha-hat probe, each with its own teacher (steps >= 3), each its own network on its own CUDA
             stream, one graph for all, batch 16 each on the shared batches, float32;
  batched    the same as one batched network (:mod:`sdlib.batched`, ``chains_in_flight="batched"``).

``--ab`` instead trains the paper profile in float32 and in bf16 autocast (``paper-bf16``) for ``--ab-steps``
optimizer steps from the same initialization on the same real batches and prints both loss curves (means over
windows of ``--ab-window`` steps) and their gap.

For each it prints training images per second per model and in aggregate, the ratio to the reference, and the
hours of training the paper's full grid (212 models x 75 epochs, see :func:`sdlib.sweep.grid_cost`) would take on
this device, plus the evaluation passes (45,000 validation + test images per epoch at the measured evaluation
rate). The trainer variants are timed by ``distill_step``'s own per-epoch clock (training loop only, its epoch-end
sync included) on its second epoch, so cuDNN's autotuning in the first is left out; the loops written here are
timed after ``--warmup`` batches with the device synchronized at both ends. The numbers, the settings and their
provenance (commit, device, library versions) are written as JSON to ``--out``.

Run on a GPU (CIFAR-10 in either form under --data-root):

    PYTHONPATH=. python benchmarks/train_throughput.py --data-root data/cifar10 \\
        --out benchmarks/results/train_throughput_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import types
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

from sdlib import data as cifar
from sdlib.records import write_atomically
from sdlib import lean_step
from sdlib.config import derive_seed
from sdlib.lean_step import LeanStep
from sdlib.step import Member, distill_group, epoch_order
from sdlib.sweep import grid_cost
from sdlib.train import TrainConfig, resolve_device, build_model, distill_step, evaluate, provenance
from sdlib.config import AUGMENT, CAPTURE_MODES, PROFILES

VARIANTS = ("reference", "paper", "paper-bf16", "fast", "streams", "batched")
PROFILE_VARIANTS = ("paper", "paper-bf16", "fast")
IN_FLIGHT_VARIANTS = ("streams", "batched")
ALPHA = 0.5  # any alpha < 1: the teacher's forward pass is part of every batch
EVAL_IMAGES_PER_EPOCH = 5000 + 10000  # validation + test, evaluated after every epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------- (a) the reference

class _PILDataset(torch.utils.data.Dataset):
    """Images held as uint8 HWC arrays and served as PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_step(student, teacher, optimizer, x, y, device) -> float:
    """One step of the plain loop: the batch to the device, teacher under no_grad, the loss with the L2 term as
    a Python sum of per-parameter norms, backward, Adam, and ``loss.item()`` (a host sync) for the running loss."""
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        teacher_probs = F.softmax(teacher(x), dim=1)
    probs = F.softmax(student(x), dim=1)
    loss = (ALPHA * F.mse_loss(probs, F.one_hot(y, 10).float())
            + (1 - ALPHA) * F.mse_loss(probs, teacher_probs)
            + 1e-4 * sum(p.norm(2) for p in student.parameters()))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_loop(x_train, y_train, device, *, batch_size, iters, warmup, workers, seed=0) -> dict:
    """The plain loop. x_train: uint8 (N, 3, 32, 32) CPU tensor; y_train: int64 (N,)."""
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(cifar.CIFAR10_MEAN, cifar.CIFAR10_STD)])
    dataset = _PILDataset(x_train.permute(0, 2, 3, 1).numpy(), y_train.numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    student = torchvision.models.resnet50(num_classes=10).to(device)
    teacher = torchvision.models.resnet50(num_classes=10).to(device).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    student.train()

    def batches():
        while True:
            yield from loader

    stream = batches()
    running_loss, start = 0.0, None
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = next(stream)
        running_loss += reference_step(student, teacher, optimizer, x, y, device)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": iters * batch_size, "seconds": seconds, "images_per_s": iters * batch_size / seconds,
            "n_models": 1, "batch_per_model": batch_size, "precision": "float32",
            "mean_loss": running_loss / (warmup + iters)}


# ------------------------------------------------------------------------------- (b), (c) our distill_step

def _part(splits, n_train: int, eval_images: int):
    return types.SimpleNamespace(x_train=splits.x_train[:n_train], y_train=splits.y_train[:n_train],
                                 x_val=splits.x_val[:eval_images], y_val=splits.y_val[:eval_images],
                                 x_test=splits.x_test[:eval_images], y_test=splits.y_test[:eval_images])


def trainer_run(profile: str, splits, device, *, iters, eval_images, capture: str = "auto") -> dict:
    """distill_step at ``profile``, 2 epochs of ``iters`` batches; the second epoch's clock is reported (the
    first holds cuDNN's autotuning and the graph's warm-up and capture)."""
    config = TrainConfig.from_profile(profile, epochs=2, capture=capture)
    n_train = iters * config.batch_size
    if n_train > len(splits.x_train):
        raise ValueError(f"--{profile}-iters {iters} x batch {config.batch_size} = {n_train} exceeds the "
                         f"{len(splits.x_train)} training images")
    part = _part(splits, n_train, eval_images)
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (config.channels_last and on_cuda) else torch.contiguous_format
    teacher = build_model(seed=1000, step=1).to(device, memory_format=memory_format).eval()
    result = distill_step(config, part, seed=0, step=2, alpha=ALPHA, teacher=teacher, chain="benchmark",
                          device=device)
    last = result.epochs[-1]
    return {"images": n_train, "seconds": n_train / last["images_per_s"], "images_per_s": last["images_per_s"],
            "first_epoch_images_per_s": result.epochs[0]["images_per_s"], "n_models": 1,
            "batch_per_model": config.batch_size,
            "precision": "bf16 autocast" if config.bf16 and on_cuda else "float32",
            "channels_last": bool(config.channels_last and on_cuda), "mean_loss": last["train_loss"],
            "capture": _capture_used(capture, device)}


def _capture_used(capture: str, device) -> str:
    return ("graph" if device.type == "cuda" else "none") if capture == "auto" else capture


IN_FLIGHT_ALPHAS = tuple(round(0.1 * k, 10) for k in range(11)) + (0.0,)  # 11 fixed chains + the probe


def in_flight_run(mode: str, splits, device, *, n_chains, iters, eval_images, capture: str = "auto",
                  batch_size: int = 16) -> dict:
    """``n_chains`` models of one (seed, step) in flight (distill_group, chains_in_flight=mode), each with its
    own teacher, 2 epochs of ``iters`` batches at the paper profile; the second epoch's clock is reported."""
    config = TrainConfig.from_profile("paper", epochs=2, batch_size=batch_size, chains_in_flight=mode,
                                      capture=capture)
    n_train = iters * config.batch_size
    if n_train > len(splits.x_train):
        raise ValueError(f"--inflight-iters {iters} x batch {config.batch_size} = {n_train} exceeds the "
                         f"{len(splits.x_train)} training images")
    alphas = [IN_FLIGHT_ALPHAS[i % len(IN_FLIGHT_ALPHAS)] for i in range(n_chains)]
    members = [Member(chain=f"chain{i}", alpha=a, teacher=build_model(seed=1000 + i, step=1).to(device).eval())
               for i, a in enumerate(alphas)]
    results = distill_group(config, _part(splits, n_train, eval_images), seed=0, step=3, members=members,
                            device=device)
    per_model = results[0].epochs[-1]["images_per_s"]
    images = n_train * n_chains
    return {"images": images, "seconds": n_train / per_model, "images_per_s": per_model * n_chains,
            "first_epoch_images_per_s": results[0].epochs[0]["images_per_s"] * n_chains, "n_models": n_chains,
            "batch_per_model": config.batch_size, "precision": "float32", "channels_last": False,
            "mean_loss": float(np.mean([r.epochs[-1]["train_loss"] for r in results])),
            "capture": _capture_used(capture, device)}


# ------------------------------------------------------------------------------------- float32 vs bf16

def ab_run(splits, device, *, steps: int, window: int, seed: int = 0) -> dict:
    """The paper profile in float32 and in bf16 autocast + channels_last (on the CPU too, by CPU autocast),
    ``steps`` optimizer steps each from the same initialization, teacher (alpha = ALPHA) and batches; the
    per-step objective (distillation loss + L2 term) of both."""
    curves = {}
    for profile in ("paper", "paper-bf16"):
        config = TrainConfig.from_profile(profile)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        teacher = build_model(seed=1000, step=1).to(device, memory_format=memory_format).eval()
        # bf16 autocast and channels_last as the profile says, on the CPU too (device_precision turns them off)
        with mock.patch.object(lean_step, "device_precision", lambda c, d: (c.bf16, c.channels_last)):
            group = LeanStep(config, [build_model(seed, 2)], [ALPHA], [teacher], splits.y_train, device)
        run = group
        group.schedule.start_at(0)
        n, batch = len(splits.x_train), config.batch_size
        per_epoch = n // batch
        losses, epoch = [], 0
        loss_sum = group.loss_sums[0]
        while len(losses) < steps:
            epoch += 1
            order = epoch_order(config, seed, 2, epoch, n, device)
            generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 2, epoch, AUGMENT))
            for i in range(min(per_epoch, steps - len(losses))):
                group.write_batch(splits.x_train, order[i * batch:(i + 1) * batch], generator)
                loss_sum.zero_()
                run()
                losses.append(loss_sum.item())
        curves[profile] = losses
    f32, bf16 = np.array(curves["paper"]), np.array(curves["paper-bf16"])
    windows = [(start, min(start + window, steps)) for start in range(0, steps, window)]
    table = [{"steps": f"{a + 1}-{b}", "float32": float(f32[a:b].mean()), "bf16": float(bf16[a:b].mean()),
              "gap": float(bf16[a:b].mean() - f32[a:b].mean()),
              "relative_gap": float((bf16[a:b].mean() - f32[a:b].mean()) / f32[a:b].mean())} for a, b in windows]
    return {"steps": steps, "window": window, "alpha": ALPHA, "batch_size": 16,
            "bf16_on_device": device.type == "cuda", "float32": curves["paper"], "bf16": curves["paper-bf16"],
            "windows": table, "max_abs_relative_gap": float(np.max(np.abs([w["relative_gap"] for w in table])))}


def print_ab(ab: dict) -> None:
    print(f"\nfloat32 vs bf16 autocast, paper profile, {ab['steps']} steps from the same start "
          f"(objective, means over {ab['window']} steps)")
    print(f"{'steps':>10} {'float32':>10} {'bf16':>10} {'gap':>10} {'rel. gap':>9}")
    for w in ab["windows"]:
        print(f"{w['steps']:>10} {w['float32']:>10.5f} {w['bf16']:>10.5f} {w['gap']:>+10.5f} "
              f"{w['relative_gap']:>+9.2%}")



# ------------------------------------------------------------------------------------------------ evaluation

def eval_rate(splits, device, *, bf16: bool, images: int, repeats: int = 3) -> float:
    """Images per second of :func:`sdlib.train.evaluate` (batch 1000) on ``images`` test images."""
    memory_format = torch.channels_last if bf16 and device.type == "cuda" else torch.contiguous_format
    model = build_model(seed=0, step=1).to(device, memory_format=memory_format)
    x, y = splits.x_test[:images], splits.y_test[:images]
    kwargs = dict(batch_size=1000, bf16=bf16 and device.type == "cuda", channels_last=memory_format is
                  torch.channels_last)
    evaluate(model, x, y, **kwargs)  # warm-up (cuDNN autotuning)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(model, x, y, **kwargs)  # returns floats: the device is synchronized
        times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


# ------------------------------------------------------------------------------------------------------ main

def grid_hours(profile: str, aggregate_images_per_s: float, eval_images_per_s: float) -> dict:
    """Hours for the paper's grid (4 seeds, 11 alphas + alpha-hat, 5 steps, 75 epochs) at ``profile``, with an
    evaluation (validation + test) every ``eval_every`` epochs and at the last."""
    config = TrainConfig.from_profile(profile)
    cost = grid_cost(config, aggregate_images_per_s)
    evaluated = sum(1 for e in range(1, config.epochs + 1) if e % config.eval_every == 0 or e == config.epochs)
    eval_images = cost["models"] * evaluated * EVAL_IMAGES_PER_EPOCH
    eval_seconds = eval_images / eval_images_per_s
    return {"models": cost["models"], "epochs": config.epochs, "evaluated_epochs": evaluated,
            "train_images": cost["train_images"],
            "train_hours": cost["seconds"] / 3600, "eval_images": eval_images, "eval_hours": eval_seconds / 3600,
            "total_hours": (cost["seconds"] + eval_seconds) / 3600}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/cifar10", help="CIFAR-10 (torchvision pickles or ImageFolder)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu', ...")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--reference-iters", type=_positive_int, default=300, help="timed batches of the reference")
    p.add_argument("--paper-iters", type=_positive_int, default=400, help="batches per epoch at the paper profile")
    p.add_argument("--fast-iters", type=_positive_int, default=100, help="batches per epoch at the fast profile")
    p.add_argument("--inflight-iters", type=_positive_int, default=100,
                   help="batches per epoch of the models in flight (streams, batched)")
    p.add_argument("--warmup", type=_positive_int, default=20, help="untimed batches before the reference's clock")
    p.add_argument("--chains", type=_positive_int, default=12, help="models in flight (streams, batched)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="batch per model of the reference and the models in flight (the paper's 16)")
    p.add_argument("--capture", default="auto", choices=CAPTURE_MODES,
                   help="how our trainer runs its step (TrainConfig.capture; auto: a CUDA graph on CUDA)")
    p.add_argument("--ab", action="store_true",
                   help="instead of the variants: paper profile float32 vs bf16 autocast loss curves")
    p.add_argument("--ab-steps", type=_positive_int, default=300, help="optimizer steps of each --ab run")
    p.add_argument("--ab-window", type=_positive_int, default=25, help="steps per mean in the --ab table")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes of the reference")
    p.add_argument("--eval-images", type=_positive_int, default=10000, help="images per evaluation timing")
    p.add_argument("--n-val", type=int, default=5000, help="validation images held out of the training set")
    p.add_argument("--subset", type=int, default=None, help="cut the data for a smoke run (see load_splits)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        p.error(f"--variants must name some of {', '.join(VARIANTS)}; unknown: {', '.join(unknown) or '(none)'}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    args.variants = variants
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = cifar.load_splits(args.data_root, n_val=args.n_val, subset=args.subset, device="cpu")
    device_splits = splits.to(device)
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.ab:
        ab = ab_run(device_splits, device, steps=args.ab_steps, window=args.ab_window)
        out = {"benchmark": "train_throughput_ab",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command, "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "provenance": provenance(device), "data": splits.meta, "ab": ab}
        print_ab(ab)
        if args.out:
            write_atomically(args.out, lambda handle: json.dump(out, handle, indent=1))
            print(f"wrote {args.out}")
        return out
    results: dict = {}
    for variant in args.variants:
        _reset_peak(device)
        print(f"[{variant}] ...", flush=True)
        if variant == "reference":
            r = reference_loop(splits.x_train, splits.y_train, device, batch_size=args.batch_size,
                               iters=args.reference_iters, warmup=args.warmup, workers=args.workers)
        elif variant in PROFILE_VARIANTS:
            iters = args.fast_iters if variant == "fast" else args.paper_iters
            r = trainer_run(variant, device_splits, device, iters=iters, eval_images=min(1000, args.eval_images),
                            capture=args.capture)
        else:
            r = in_flight_run(variant, device_splits, device, n_chains=args.chains, iters=args.inflight_iters,
                              eval_images=min(1000, args.eval_images), capture=args.capture,
                              batch_size=args.batch_size)
        r["per_model_images_per_s"] = r["images_per_s"] / r["n_models"]
        r["peak_memory_gib"] = _peak_memory_gib(device)
        results[variant] = r
        print(f"[{variant}] {r['images_per_s']:,.0f} images/s", flush=True)

    rates = {"float32": eval_rate(device_splits, device, bf16=False, images=args.eval_images),
             "bf16": eval_rate(device_splits, device, bf16=True, images=args.eval_images)}
    reference = results.get("reference", {}).get("images_per_s")
    for variant, r in results.items():
        r["ratio_to_reference"] = None if reference is None else r["images_per_s"] / reference
        profile = variant if variant in PROFILES else "paper"
        r["grid"] = grid_hours(profile, r["images_per_s"],
                               rates["bf16" if r["precision"].startswith("bf16") else "float32"])
        r["grid"]["profile"] = profile

    out = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"alpha": ALPHA},
        "provenance": provenance(device),
        "data": splits.meta,
        "eval_images_per_s": rates,
        "variants": results,
    }
    print_table(out)
    if args.out:
        write_atomically(args.out, lambda handle: json.dump(out, handle, indent=1))
        print(f"wrote {args.out}")
    return out


def print_table(out: dict) -> None:
    print(f"\ndevice: {out['provenance']['device_name']}, torch {out['provenance']['torch']}")
    header = (f"{'variant':<11} {'models':>6} {'batch':>5} {'precision':<14} {'images/s':>10} {'per model':>10} "
              f"{'x ref':>6} {'grid h':>8}")
    print(header)
    print("-" * len(header))
    for name, r in out["variants"].items():
        ratio = "" if r["ratio_to_reference"] is None else f"{r['ratio_to_reference']:.1f}"
        print(f"{name:<11} {r['n_models']:>6} {r['batch_per_model']:>5} {r['precision']:<14} "
              f"{r['images_per_s']:>10,.0f} {r['per_model_images_per_s']:>10,.0f} {ratio:>6} "
              f"{r['grid']['total_hours']:>8,.1f}")
    rates = out["eval_images_per_s"]
    print(f"evaluation: {rates['float32']:,.0f} images/s float32, {rates['bf16']:,.0f} images/s bf16; "
          "grid h = training + evaluation hours of the paper's grid (212 models x 75 epochs, evaluated every "
          "eval_every epochs) on this device")


if __name__ == "__main__":
    main()
