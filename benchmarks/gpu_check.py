"""The Python parts of benchmarks/gpu_check.sh: a profiler trace of one step per training mode, and the median of
repeated throughput runs, written as one JSON file with provenance.

    python benchmarks/gpu_check.py profile --out DIR/profile.json [--device cuda] [--chains 12] ...
    python benchmarks/gpu_check.py summarize DIR/throughput_*.json --profile DIR/profile.json --out DIR/gpu_check.json

``profile`` builds each mode's step as training builds it (:class:`sdlib.lean_step.LeanStep`:
on CUDA the whole step as one CUDA graph after warm-up), runs ``--warmup`` steps, then records ``--steps`` steps
with torch.profiler and reports per step: the wall time, the CUDA kernels launched, the time the GPU was busy
(union of kernel intervals) as a fraction of the wall time, and the CPU-side ATen ops. Modes: reference (the
plain loop's step), paper (lean, graph-captured), fast, streams and batched (``--chains`` models in flight).
On a machine without CUDA the same code runs on the CPU (kernel counts and busy fractions are then None): the
dry run of gpu_check.sh.

``summarize`` takes the JSON files of repeated ``benchmarks/train_throughput.py`` runs and reports per variant
the median images/s (aggregate and per model), the runs' spread, the ratio of medians to the reference, and the
issue's aims: paper >= 10x the reference per model, the chains in flight >= 60x in aggregate, fast >= 20,000
images/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdlib.augment import normalize  # noqa: E402
from sdlib.chains import provenance  # noqa: E402
from sdlib.config import CAPTURE_MODES, TrainConfig, resolve_device  # noqa: E402
from sdlib.records import write_atomically  # noqa: E402
from sdlib.lean_step import LeanStep  # noqa: E402
from sdlib.models import build_model  # noqa: E402
from train_throughput import _positive_int  # noqa: E402  (one argument check for the benchmarks)

MODES = ("reference", "paper", "fast", "streams", "batched")
ALPHA = 0.5
AIMS = {"paper_per_model_vs_reference": 10.0, "in_flight_aggregate_vs_reference": 60.0,
        "fast_images_per_s": 20_000.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _build(mode: str, device: torch.device, *, chains: int, batch_size: int | None, capture: str):
    """(step function, batch writer, models in flight, images per step) for ``mode``."""
    x_train = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0)).to(device)
    y_train = (torch.arange(4096) % 10).to(device)
    if mode == "reference":
        import train_throughput as bench
        student = torchvision.models.resnet50(num_classes=10).to(device).train()
        teacher = torchvision.models.resnet50(num_classes=10).to(device).eval()
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
        batch = batch_size or 16
        x = normalize(x_train[:batch]).cpu()
        y = y_train[:batch].cpu()
        return (lambda: bench.reference_step(student, teacher, optimizer, x, y, device)), (lambda: None), 1, batch
    profile_name = "fast" if mode == "fast" else "paper"
    in_flight = mode in ("streams", "batched")
    config = TrainConfig.from_profile(profile_name, capture=capture,
                                      chains_in_flight=mode if in_flight else "off",
                                      **({"batch_size": batch_size} if batch_size else {}))
    memory_format = torch.channels_last if (config.channels_last and device.type == "cuda") else torch.contiguous_format
    # In flight: 11 fixed alphas and the probe (alpha = 0), each with its own teacher (steps >= 3).
    alphas = [round(0.1 * (i % 12), 10) if i % 12 < 11 else 0.0 for i in range(chains)] if in_flight else [ALPHA]
    n = len(alphas)
    teachers = [build_model(1000 + i, 1).to(device, memory_format=memory_format).eval() for i in range(n)]
    # bf16 and channels_last as training sets them on this device (sdlib.config.device_precision)
    group = LeanStep(config, [build_model(0, 2) for _ in alphas], alphas, teachers, y_train, device,
                     batched=mode == "batched")
    group.schedule.start_at(0)
    run = group
    generator = torch.Generator(device=device).manual_seed(0)
    index = torch.arange(config.batch_size, device=device)

    def write():
        group.write_batch(x_train, index, generator)

    def step():
        write()
        run()

    return step, write, n, config.batch_size


def profile_mode(mode: str, device: torch.device, *, chains: int, batch_size: int | None, capture: str,
                 warmup: int, steps: int) -> dict:
    step, _, n_models, batch = _build(mode, device, chains=chains, batch_size=batch_size, capture=capture)
    for _ in range(warmup):  # cuDNN autotuning, Adam's state, the graph's warm-up and capture
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall_s = time.perf_counter() - start
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    on_cuda = device.type == "cuda"
    busy_us = _busy_time_us([(e.time_range.start, e.time_range.end) for e in kernels]) if on_cuda else None
    return {
        "models": n_models, "batch_per_model": batch, "steps": steps,
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "images_per_s": n_models * batch * steps / wall_s,
        "kernels_per_step": len(kernels) / steps if on_cuda else None,
        "gpu_busy_fraction": busy_us / (1e6 * wall_s) if on_cuda else None,
        "aten_ops_per_step": len(cpu_ops) / steps,
        "capture": "none" if mode == "reference" else
                   (("graph" if on_cuda else "none") if capture == "auto" else capture),
    }


def summarize(paths: list[Path], profile_path: Path | None) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for path, run in zip(paths, runs):
        if run.get("benchmark") != "train_throughput":
            raise ValueError(f"{path} is not a result of benchmarks/train_throughput.py")
    variants = {}
    for name in runs[0]["variants"]:
        rates = [run["variants"][name]["images_per_s"] for run in runs if name in run["variants"]]
        first = runs[0]["variants"][name]
        variants[name] = {
            "n_models": first["n_models"], "batch_per_model": first["batch_per_model"],
            "precision": first["precision"], "capture": first.get("capture"), "runs": len(rates),
            "images_per_s": rates, "median_images_per_s": statistics.median(rates),
            "median_per_model_images_per_s": statistics.median(rates) / first["n_models"],
            "peak_memory_gib": max((run["variants"][name].get("peak_memory_gib") or 0.0) for run in runs) or None,
        }
    reference = variants.get("reference")
    for v in variants.values():
        v["ratio_to_reference"] = (v["median_images_per_s"] / reference["median_images_per_s"]
                                   if reference else None)
        v["per_model_ratio_to_reference"] = (v["median_per_model_images_per_s"]
                                             / reference["median_per_model_images_per_s"] if reference else None)
    aims = {}
    if reference and "paper" in variants:
        aims["paper_per_model_vs_reference"] = variants["paper"]["per_model_ratio_to_reference"]
    flight = [variants[k]["ratio_to_reference"] for k in ("streams", "batched")
              if k in variants and reference]
    if flight:
        aims["in_flight_aggregate_vs_reference"] = max(flight)
    if "fast" in variants:
        aims["fast_images_per_s"] = variants["fast"]["median_images_per_s"]
    return {
        "benchmark": "gpu_check",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "throughput_files": [Path(p).name for p in paths],
        "provenance": runs[0]["provenance"],
        "settings": runs[0]["settings"],
        "variants": variants,
        "aims": {k: {"value": v, "aim": AIMS[k], "met": v >= AIMS[k]} for k, v in aims.items()},
        "profile": json.loads(profile_path.read_text()) if profile_path else None,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="a profiler trace of one step per mode")
    prof.add_argument("--out", required=True, help="JSON file to write")
    prof.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu'")
    prof.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    prof.add_argument("--chains", type=_positive_int, default=12, help="models in flight (streams, batched)")
    prof.add_argument("--batch-size", type=_positive_int, default=None,
                      help="batch per model (default: the profile's, 16 or 256; smaller for a dry run)")
    prof.add_argument("--capture", default="auto", choices=CAPTURE_MODES)
    prof.add_argument("--warmup", type=_positive_int, default=6, help="untraced steps first (graph capture: 4)")
    prof.add_argument("--steps", type=_positive_int, default=3, help="traced steps per mode")
    summ = sub.add_parser("summarize", help="medians of repeated train_throughput.py runs")
    summ.add_argument("runs", nargs="+", help="JSON files of benchmarks/train_throughput.py")
    summ.add_argument("--profile", default=None, help="the JSON of 'profile', included as is")
    summ.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.command == "profile":
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = sorted(set(modes) - set(MODES))
        if unknown or not modes:
            p.error(f"--modes must name some of {', '.join(MODES)}; unknown: {', '.join(unknown) or '(none)'}")
        args.modes = modes
    else:
        missing = [r for r in args.runs + ([args.profile] if args.profile else []) if not Path(r).is_file()]
        if missing:
            p.error(f"no such file(s): {', '.join(missing)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.command == "summarize":
        out = summarize([Path(r) for r in args.runs], Path(args.profile) if args.profile else None)
        for name, v in out["variants"].items():
            ratio = "" if v["ratio_to_reference"] is None else f"{v['ratio_to_reference']:.1f}x"
            print(f"{name:<11} {v['median_images_per_s']:>10,.0f} images/s (median of {v['runs']}) {ratio}")
        for name, aim in out["aims"].items():
            print(f"aim {name}: {aim['value']:,.1f} (aim {aim['aim']:,.0f}) {'met' if aim['met'] else 'NOT met'}")
    else:
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        modes = {}
        for mode in args.modes:
            modes[mode] = profile_mode(mode, device, chains=args.chains, batch_size=args.batch_size,
                                       capture=args.capture, warmup=args.warmup, steps=args.steps)
            m = modes[mode]
            kernels = "" if m["kernels_per_step"] is None else (
                f", {m['kernels_per_step']:.0f} kernels, GPU busy {m['gpu_busy_fraction']:.0%}")
            print(f"[profile] {mode:<9} {m['wall_ms_per_step']:8.2f} ms/step, {m['images_per_s']:,.0f} images/s, "
                  f"{m['aten_ops_per_step']:.0f} aten ops{kernels}", flush=True)
        out = {"benchmark": "gpu_check_profile",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "command")},
               "provenance": provenance(device), "modes": modes}
    write_atomically(args.out, lambda handle: json.dump(out, handle, indent=1))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
