"""Training throughput of ResNet-50 self-distillation, measured side by side on one device.

Every variant trains a student ResNet-50 (torchvision, 10 classes, ImageNet stem) on real CIFAR-10 images with
the distillation loss against a teacher ResNet-50 (alpha = 0.5, so the teacher's forward pass runs every batch),
Adam and the paper's unsquared L2 term:

  reference  a plain PyTorch loop as the authors' code would be written: torchvision transforms (RandomCrop 32
             with padding 4, RandomHorizontalFlip, ToTensor, Normalize) on PIL images through a DataLoader
             (``--workers`` processes), float32, batch 16, per-parameter norms in a Python sum, teacher under
             no_grad, ``loss.item()`` once per batch for the running loss;
  paper      our trainer, :func:`sdlib.train.distill_step` itself at the paper profile (batch 16, float32, data
             resident on the device, augmentation on the device, fused Adam, one host sync per epoch);
  fast       the same function at the fast profile (batch 256, bf16 autocast, channels_last);
  batched    ``--chains`` students and their teachers fused into one grouped-convolution network
             (:mod:`sdlib.batched`), batch 16 per chain on a shared batch, float32 (one step of all chains of a
             seed: 11 fixed alphas + alpha-hat). Not used by ``run_chains`` yet: it shows what batching buys.

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
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

from sdlib import data as cifar
from sdlib.batched import batched_distillation_loss, batched_l2_penalty, stack_models
from sdlib.records import write_atomically
from sdlib.sweep import grid_cost
from sdlib.train import TrainConfig, resolve_device, build_model, distill_step, evaluate, provenance

VARIANTS = ("reference", "paper", "fast", "batched")
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

def trainer_run(profile: str, splits, device, *, iters, eval_images) -> dict:
    """distill_step at ``profile``, 2 epochs of ``iters`` batches; the second epoch's clock is reported."""
    config = TrainConfig.from_profile(profile, epochs=2)
    n_train = iters * config.batch_size
    if n_train > len(splits.x_train):
        raise ValueError(f"--{profile}-iters {iters} x batch {config.batch_size} = {n_train} exceeds the "
                         f"{len(splits.x_train)} training images")
    part = types.SimpleNamespace(x_train=splits.x_train[:n_train], y_train=splits.y_train[:n_train],
                                 x_val=splits.x_val[:eval_images], y_val=splits.y_val[:eval_images],
                                 x_test=splits.x_test[:eval_images], y_test=splits.y_test[:eval_images])
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
            "channels_last": bool(config.channels_last and on_cuda), "mean_loss": last["train_loss"]}



# ------------------------------------------------------------------------------------- (d) batched chains

def batched_loop(splits, device, *, n_chains, batch_size, iters, warmup, seed=0) -> dict:
    """n_chains students (one step of every chain of a seed: same init, same data, own alpha and teacher)."""
    students = stack_models([build_model(seed, 2) for _ in range(n_chains)]).to(device)
    teachers = stack_models([build_model(seed + 1000 + i, 1) for i in range(n_chains)]).to(device).eval()
    alphas = [round(float(a), 10) for a in np.linspace(0.0, 1.0, n_chains)]
    optimizer = torch.optim.Adam(students.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)
    students.train()
    generator = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed)).to(device)
    loss_sum, start = torch.zeros((), device=device), None
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        start_index = (i * batch_size) % (len(order) - batch_size + 1)
        index = order[start_index:start_index + batch_size]
        x = cifar.augment(splits.x_train[index], generator=generator)
        labels = splits.y_train[index]
        with torch.inference_mode():
            teacher_logits = teachers(x)
        teacher_probs = torch.softmax(teacher_logits.float(), dim=2)
        losses = batched_distillation_loss(students(x), labels, alphas, teacher_probs)
        loss = losses.sum() + batched_l2_penalty(students, 1e-4).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    _sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss_sum):
        raise FloatingPointError("the batched loop's loss is not finite")
    images = iters * batch_size * n_chains
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "n_models": n_chains,
            "batch_per_model": batch_size, "precision": "float32",
            "mean_loss": loss_sum.item() / (warmup + iters) / n_chains}


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
    """Hours for the paper's grid (4 seeds, 11 alphas + alpha-hat, 5 steps, 75 epochs) at ``profile``."""
    config = TrainConfig.from_profile(profile)
    cost = grid_cost(config, aggregate_images_per_s)
    eval_images = cost["models"] * config.epochs * EVAL_IMAGES_PER_EPOCH
    eval_seconds = eval_images / eval_images_per_s
    return {"models": cost["models"], "epochs": config.epochs, "train_images": cost["train_images"],
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
    p.add_argument("--batched-iters", type=_positive_int, default=100, help="timed batches of the batched loop")
    p.add_argument("--warmup", type=_positive_int, default=20, help="untimed batches before each hand loop")
    p.add_argument("--chains", type=_positive_int, default=12, help="chains in the batched network")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="batch per model of the reference and the batched loop (the paper's 16)")
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
    results: dict = {}
    for variant in args.variants:
        _reset_peak(device)
        print(f"[{variant}] ...", flush=True)
        if variant == "reference":
            r = reference_loop(splits.x_train, splits.y_train, device, batch_size=args.batch_size,
                               iters=args.reference_iters, warmup=args.warmup, workers=args.workers)
        elif variant in ("paper", "fast"):
            iters = args.paper_iters if variant == "paper" else args.fast_iters
            r = trainer_run(variant, device_splits, device, iters=iters, eval_images=min(1000, args.eval_images))
        else:
            r = batched_loop(device_splits, device, n_chains=args.chains, batch_size=args.batch_size,
                             iters=args.batched_iters, warmup=args.warmup)
        r["per_model_images_per_s"] = r["images_per_s"] / r["n_models"]
        r["peak_memory_gib"] = _peak_memory_gib(device)
        results[variant] = r
        print(f"[{variant}] {r['images_per_s']:,.0f} images/s", flush=True)

    rates = {"float32": eval_rate(device_splits, device, bf16=False, images=args.eval_images),
             "bf16": eval_rate(device_splits, device, bf16=True, images=args.eval_images)}
    reference = results.get("reference", {}).get("images_per_s")
    for variant, r in results.items():
        r["ratio_to_reference"] = None if reference is None else r["images_per_s"] / reference
        profile = "fast" if variant == "fast" else "paper"
        r["grid"] = grid_hours(profile, r["images_per_s"],
                               rates["bf16" if r["precision"].startswith("bf16") else "float32"])
        r["grid"]["profile"] = profile

    out = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
    header = (f"{'variant':<10} {'models':>6} {'batch':>5} {'precision':<14} {'images/s':>10} {'per model':>10} "
              f"{'x ref':>6} {'grid h':>8}")
    print(header)
    print("-" * len(header))
    for name, r in out["variants"].items():
        ratio = "" if r["ratio_to_reference"] is None else f"{r['ratio_to_reference']:.1f}"
        print(f"{name:<10} {r['n_models']:>6} {r['batch_per_model']:>5} {r['precision']:<14} "
              f"{r['images_per_s']:>10,.0f} {r['per_model_images_per_s']:>10,.0f} {ratio:>6} "
              f"{r['grid']['total_hours']:>8,.1f}")
    rates = out["eval_images_per_s"]
    print(f"evaluation: {rates['float32']:,.0f} images/s float32, {rates['bf16']:,.0f} images/s bf16; "
          "grid h = training + evaluation hours of the paper's grid (212 models x 75 epochs) on this device")


if __name__ == "__main__":
    main()
