"""Training throughput of one self-distillation step on this machine's CPU, and what chose the cpu profile.

Prints and writes (``--out``, JSON with the CPU model, threads and library versions) images per second of one
training step, teacher forward included, on real CIFAR-10 images:

- ``ours``: the cpu profile's step (sdlib.lean_step.LeanStep: uint8 images in memory, vectorized augmentation,
  the lean step) for each network, dtype (float32 / bf16 autocast) and memory format, at the profile's batch,
  and as the grid runs it (scripts/cpu_grid.sh): two one-thread processes side by side, their rates added;
- ``reference``: (a) the same network at the same batch trained the way the authors' code trains: torchvision
  transforms on PIL images through a DataLoader, float32, eager, the L2 term through autograd, plain Adam;
- ``limit``: (b) the machine's own limit, the FLOPs of one step (torch.utils.flop_counter) divided by the
  measured FLOP rate of the same convolutions (forward, the profile's dtype and batch) and of a large matrix
  product in that dtype;
- ``summary``: ours as the grid runs it against (a), and as a fraction of (b);
- ``models``: the candidate small networks (cnn4, sdlib.models; a CIFAR ResNet-20, He et al. 2016, Sec. 4.2,
  defined here) trained from scratch on the profile's 10,000 images for the same wall time, test accuracy.

    PYTHONPATH=. python benchmarks/cpu_throughput.py --data-root data/cifar10 \\
        --out benchmarks/results/cpu_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlib import data as cifar  # noqa: E402
from sdlib.chains import provenance  # noqa: E402
from sdlib.config import TrainConfig  # noqa: E402
from sdlib.models import build_model  # noqa: E402
from sdlib import lean_step  # noqa: E402
from sdlib.lean_step import LeanStep, distillation_loss  # noqa: E402
from sdlib.step import distill_step, l2_penalty  # noqa: E402


# --------------------------------------------------------------------------------- the candidate ResNet-20


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al. (2016), Sec. 4.2: 3x3 stem of 16, three stages of three basic blocks (16, 32, 64 channels),
    global average pooling, linear (projection shortcuts where the shape changes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(3):
                blocks.append(_BasicBlock(c_in, c_out, stride if k == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_model(name: str, seed: int, step: int = 1) -> nn.Module:
    if name == "resnet20":
        torch.manual_seed(seed * 1000 + step)
        return ResNet20()
    return build_model(seed, step, name)


# ---------------------------------------------------------------------------------------------- measurements


def time_steps(run_one, steps: int, warmup: int) -> float:
    """Seconds per call of ``run_one`` (median of 3 blocks of ``steps`` calls after ``warmup``)."""
    for _ in range(warmup):
        run_one()
    blocks = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            run_one()
        blocks.append((time.perf_counter() - start) / steps)
    return float(np.median(blocks))


def ours(name: str, data, batch: int, bf16: bool, channels_last: bool, steps: int, warmup: int) -> dict:
    """The cpu profile's step (LeanStep with one member, alpha 0.5, its teacher forward included)."""
    config = TrainConfig.from_profile("cpu", model="cnn4" if name == "resnet20" else name, batch_size=batch,
                                      bf16=bf16, channels_last=channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = make_model(name, 1000).eval().to(memory_format=memory_format)
    with mock.patch.object(lean_step, "device_precision", lambda config, device: (bf16, channels_last)):
        group = LeanStep(config, [make_model(name, 0, 2)], [0.5], [teacher], data.y_train, "cpu")
    group.train()
    generator = torch.Generator().manual_seed(0)
    n = len(data.y_train)

    def run_one():
        index = torch.randint(0, n, (batch,), generator=generator)
        group.write_batch(data.x_train, index, generator)
        group.step()

    seconds = time_steps(run_one, steps, warmup)
    return {"images_per_s": batch / seconds, "step_ms": 1000 * seconds}


class _PILImages(torch.utils.data.Dataset):
    """CIFAR-10 as torchvision.datasets.CIFAR10 serves it: a PIL image per index, then the transform."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x_uint8.permute(0, 2, 3, 1).numpy(), y.numpy(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference(name: str, data, batch: int, steps: int, warmup: int, workers: int) -> dict:
    """(a) The authors' way: PIL + torchvision transforms through a DataLoader, float32, eager, the L2 term
    through autograd, torch.optim.Adam with its defaults (foreach)."""
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(cifar.CIFAR10_MEAN, cifar.CIFAR10_STD)])
    loader = torch.utils.data.DataLoader(_PILImages(data.x_train, data.y_train, transform), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    teacher = make_model(name, 1000).eval()
    model = make_model(name, 0, 2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches = iter(loader)

    def run_one():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        with torch.no_grad():
            target = torch.softmax(teacher(x), dim=1)
        loss = distillation_loss(model(x), y, 0.5, target) + l2_penalty(model, 1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = time_steps(run_one, steps, warmup)
    return {"images_per_s": batch / seconds, "step_ms": 1000 * seconds, "num_workers": workers}


def step_profile(data, batch: int, steps: int = 10) -> dict:
    """Where one step of the cpu profile spends its time (torch.profiler, one thread): the share of self CPU
    time of each op kind, the top ones."""
    config = TrainConfig.from_profile("cpu")
    teacher = build_model(1000, 1, "cnn4").eval().to(memory_format=torch.channels_last)
    with mock.patch.object(lean_step, "device_precision", lambda config, device: (True, True)):
        group = LeanStep(config, [build_model(0, 2, "cnn4")], [0.5], [teacher], data.y_train, "cpu")
    group.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        group.write_batch(data.x_train, torch.randint(0, len(data.y_train), (batch,), generator=generator),
                          generator)
        group.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            group.write_batch(data.x_train, torch.randint(0, len(data.y_train), (batch,), generator=generator),
                              generator)
            group.step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {e.key: round(e.self_cpu_time_total / total, 4) for e in top}


def step_flops(name: str, batch: int) -> dict:
    """FLOPs of one training step per image: teacher forward, student forward and backward (convolutions and
    matrix products, as torch.utils.flop_counter counts them)."""
    teacher, model = make_model(name, 1000).eval(), make_model(name, 0, 2).train()
    x = torch.randn(batch, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            target = torch.softmax(teacher(x), dim=1)
        distillation_loss(model(x), torch.zeros(batch, dtype=torch.int64), 0.5, target).backward()
    return {"flops_per_image": counter.get_total_flops() / batch}


def conv_rate(name: str, batch: int, bf16: bool, channels_last: bool) -> dict:
    """FLOP/s of the network's own convolutions, forward, at their shapes in the step (one after the other on
    ready inputs: no batch norm, ReLU or pooling between them)."""
    model = make_model(name, 0).eval()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    dtype = torch.bfloat16 if bf16 else torch.float32
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    work = [(torch.randn(shape).to(dtype).contiguous(memory_format=memory_format), m.weight.detach().to(dtype),
             m.stride, m.padding) for m, shape in shapes]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for x, w, stride, padding in work:
            F.conv2d(x, w, None, stride, padding)
    flops = counter.get_total_flops()

    def run_one():
        with torch.no_grad():
            for x, w, stride, padding in work:
                F.conv2d(x, w, None, stride, padding)

    seconds = time_steps(run_one, 5, 2)
    return {"conv_flops_per_s": flops / seconds}


def matmul_rate(bf16: bool, size: int = 4096) -> dict:
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    seconds = time_steps(lambda: torch.mm(a, b), 3, 1)
    return {"matmul_flops_per_s": 2 * size ** 3 / seconds, "matmul_size": size}


def accuracy_in_time(name: str, data, seconds: float, rate: float) -> dict:
    """The network trained from scratch (step 1, labels only) with the cpu profile's settings for the epochs that
    ``seconds`` allow at its measured ``rate``; test accuracy of the last epoch."""
    epochs = max(2, int(seconds * rate / len(data.y_train)))
    config = TrainConfig.from_profile("cpu", model="cnn4", epochs=epochs, warmup_epochs=1, eval_every=epochs)
    if name == "resnet20":  # distill_step builds config.model: swap in the candidate for this measurement
        import sdlib.step

        original = sdlib.step.build_model
        sdlib.step.build_model = lambda seed, step, model: make_model("resnet20", seed, step)
    try:
        start = time.perf_counter()
        result = distill_step(config, data, seed=0, step=1, alpha=1.0)
        wall = time.perf_counter() - start
    finally:
        if name == "resnet20":
            sdlib.step.build_model = original
    return {"epochs": epochs, "wall_s": wall, "test_acc": result.epochs[-1]["test_acc"],
            "val_acc": result.epochs[-1]["val_acc"]}


def _one_process(data_root: str, steps: int, queue) -> None:
    torch.set_num_threads(1)
    profile = TrainConfig.from_profile("cpu")
    data = cifar.load_splits(data_root, n_val=profile.n_val, subset=profile.subset, device="cpu", progress=False)
    queue.put(ours("cnn4", data, profile.batch_size, True, True, steps, 3)["images_per_s"])


def two_processes(data_root: str, steps: int) -> dict:
    """What scripts/cpu_grid.sh does: two one-thread training processes side by side, one per core; their
    images per second added up."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_one_process, args=(data_root, steps, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    rates = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return {"images_per_s": float(sum(rates)), "per_process": rates}


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data/cifar10", help="CIFAR-10 (default: data/cifar10)")
    p.add_argument("--out", help="write the JSON here (default: print only)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block, 3 blocks (default: 20)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: {torch.get_num_threads()})")
    p.add_argument("--sections", default="ours,reference,limit,models",
                   help="comma list of ours, reference, limit, models (default: all)")
    p.add_argument("--model-seconds", type=float, default=60.0,
                   help="wall time per candidate network in the models section (default: 60)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    profile = TrainConfig.from_profile("cpu")
    data = cifar.load_splits(args.data_root, n_val=profile.n_val, subset=profile.subset, device="cpu",
                             progress=False)
    batch, bf16_native = profile.batch_size, bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    out = {"benchmark": "cpu_throughput", "threads": torch.get_num_threads(), "batch_size": batch,
           "bf16_native": bf16_native, "provenance": provenance(torch.device("cpu")), "ours": {}}

    def show(label, row):
        print(f"{label:44s} " + "  ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)

    if "ours" in sections:
        for name in ("cnn4", "resnet20"):
            for bf16 in (False, True):
                for channels_last in (False, True):
                    key = f"{name} {'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'nchw'}"
                    out["ours"][key] = ours(name, data, batch, bf16, channels_last, args.steps, 3)
                    show(f"ours {key} batch {batch}", out["ours"][key])
        for b in (128, 512):
            key = f"cnn4 bf16 channels_last batch {b}"
            out["ours"][key] = ours("cnn4", data, b, True, True, args.steps, 3)
            show(f"ours {key}", out["ours"][key])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # scripts/cpu_grid.sh runs two one-thread processes, one per core
        key = "cnn4 bf16 channels_last 1 thread"
        out["ours"][key] = ours("cnn4", data, batch, True, True, args.steps, 3)
        show(f"ours {key}", out["ours"][key])
        torch.set_num_threads(threads)
        key = "cnn4 bf16 channels_last 2 processes x 1 thread"
        out["ours"][key] = two_processes(args.data_root, args.steps)
        show(f"ours {key}", out["ours"][key])
    if "reference" in sections:
        out["reference"] = {}
        for workers in (0, 2):
            row = reference("cnn4", data, batch, max(5, args.steps // 2), 2, workers)
            out["reference"][f"cnn4 workers {workers}"] = row
            show(f"reference (a) cnn4 fp32 workers {workers}", row)
    if "limit" in sections:
        row = {**step_flops("cnn4", batch),
               **conv_rate("cnn4", batch, profile.bf16 and bf16_native, profile.channels_last),
               **matmul_rate(profile.bf16 and bf16_native)}
        row["limit_images_per_s_conv"] = row["conv_flops_per_s"] / row["flops_per_image"]
        row["limit_images_per_s_matmul"] = row["matmul_flops_per_s"] / row["flops_per_image"]
        out["limit"] = row
        show("limit (b) cnn4", row)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        out["step_profile_1_thread"] = step_profile(data, batch)
        torch.set_num_threads(threads)
        show("where a step's time goes (self CPU share)", out["step_profile_1_thread"])
    if "models" in sections:
        out["models"] = {}
        for name in ("cnn4", "resnet20"):
            rate_key = f"{name} bf16 channels_last"
            rate = out["ours"].get(rate_key, {}).get("images_per_s") or \
                ours(name, data, batch, True, True, args.steps, 3)["images_per_s"]
            out["models"][name] = {"images_per_s": rate, **accuracy_in_time(name, data, args.model_seconds, rate)}
            show(f"models {name} in {args.model_seconds:g} s", out["models"][name])
    if {"ours", "reference", "limit"} <= sections:
        grid = out["ours"]["cnn4 bf16 channels_last 2 processes x 1 thread"]["images_per_s"]
        reference_best = max(row["images_per_s"] for row in out["reference"].values())
        out["summary"] = {
            "ours_images_per_s": grid, "reference_images_per_s": reference_best,
            "ratio_to_reference": grid / reference_best,
            "fraction_of_conv_limit": grid / out["limit"]["limit_images_per_s_conv"],
            "fraction_of_matmul_limit": grid / out["limit"]["limit_images_per_s_matmul"],
        }
        show("summary (ours = 2 processes x 1 thread)", out["summary"])
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "torchvision": torchvision.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
