"""ATen ops per optimizer step, counted on the CPU: the host-side dispatch cost of each training mode.

At the paper's batch of 16 a ResNet-50 step is too small to keep a GPU busy: the step time is the time the host
needs to dispatch its ops (see benchmarks/train_throughput.py's H100 runs). This script counts those ops with a
``TorchDispatchMode`` over one optimizer step (after one untimed step, so that Adam's state exists), for

  reference   the plain loop of benchmarks/train_throughput.py (``reference_step``: the batch to the device,
              teacher, student, the L2 term as a Python sum of norms, backward, Adam with foreach, the default
              on CUDA; the DataLoader's work in its worker processes is not counted);
  paper-before  the body of distill_step's loop at the paper profile as it was before the lean step (commit
              a6b4224): autograd through ``l2_penalty``, LambdaLR, fresh ``F.one_hot`` targets, batch-norm
              counters, an unfolded teacher under inference_mode (its fused Adam as on CUDA);
  paper       :class:`sdlib.lean_step.LeanStep` with one model at the paper profile (the lean step: writing the batch
              into the static buffers, the teacher, the student's forward, backward, L2 gradient, fused Adam);
  fast        the same at the fast profile, under bf16 autocast and channels_last (on the CPU, as the CUDA run
              would: the autocast casts are part of the count);
  streams-*   the 12 models of one (seed, step) in flight (11 fixed alphas and the alpha-hat probe), each its own
              network (``chains_in_flight="streams"``): ``-step2`` with the one shared teacher of step 2,
              ``-step3`` with 12 distinct teachers (every later step);
  batched-*   the same 12 as one batched network (``chains_in_flight="batched"``).

For each: ops per step, per model-step (divided by the models in flight), the same without the ops that only
make views or aliases (``compute_ops``: no kernel, no allocation; autograd's detaches are most of them), split
into the batch (gather, augmentation, copies into the static buffers), the teachers, the students' forward and
loss, their backward (ops run by autograd), and their update (L2 gradient, Adam, loss bookkeeping,
learning-rate schedule), and the most frequent ops. ``host_ops_per_step_when_captured`` is the batch's count: on
CUDA everything else of our modes is one CUDA-graph replay (the reference is never captured). The counts do not depend on the batch size (``--batch-size`` only makes the run faster); they
are the same ops the GPU's host dispatches, apart from the device's own kernels (one op may launch several).

    PYTHONPATH=. python benchmarks/step_ops.py --out benchmarks/results/step_ops_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput, run as a script or imported

from sdlib.chains import provenance  # noqa: E402
from sdlib.config import TrainConfig  # noqa: E402
from sdlib.records import write_atomically  # noqa: E402
from sdlib import lean_step  # noqa: E402
from sdlib.lean_step import LeanStep, _Separate  # noqa: E402
from sdlib.models import build_model  # noqa: E402
from train_throughput import _positive_int  # noqa: E402  (one argument check for the benchmarks)

MODES = ("reference", "paper-before", "paper", "fast", "streams-step2", "streams-step3", "batched-step2",
         "batched-step3")
IN_FLIGHT_ALPHAS = tuple(round(0.1 * k, 10) for k in range(11)) + (0.0,)  # 11 fixed chains + the probe
ALPHA = 0.5
PHASES = ("batch", "teacher", "forward", "backward", "update")
# Ops that only make a new view or alias of a tensor (autograd's detach of a saved output or a stolen gradient
# among them): dispatched by the host like any op, but they launch no kernel and allocate nothing.
METADATA_OPS = frozenset({"detach", "view", "_unsafe_view", "t", "unsqueeze", "squeeze", "expand", "select",
                          "slice", "unbind", "alias", "as_strided", "permute", "transpose", "unflatten", "split",
                          "_reshape_alias", "promote_types", "_record_function_enter_new",
                          "_record_function_exit"})


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active, by phase; ops that autograd runs count as "backward"."""

    def __init__(self):
        super().__init__()
        self.counts = {phase: collections.Counter() for phase in PHASES}
        self.phase = "batch"
        self.seen_backward = False

    def start(self, phase: str) -> None:
        self.phase, self.seen_backward = phase, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if torch._C._current_autograd_node() is not None:
            self.counts["backward"][name] += 1
            self.seen_backward = True
        elif self.phase == "forward" and self.seen_backward:
            self.counts["update"][name] += 1
        else:
            self.counts[self.phase][name] += 1
        return func(*args, **(kwargs or {}))

    def summary(self, n_models: int, captured: bool = True) -> dict:
        by_phase = {phase: sum(c.values()) for phase, c in self.counts.items()}
        total = sum(by_phase.values())
        every = sum(self.counts.values(), collections.Counter())
        compute = sum(k for name, k in every.items() if name not in METADATA_OPS)
        return {"models": n_models, "ops_per_step": total, "ops_per_model_step": total / n_models,
                "compute_ops_per_step": compute, "compute_ops_per_model_step": compute / n_models,
                "host_ops_per_step_when_captured": by_phase["batch"] if captured else None,
                "by_phase": by_phase, "top_ops": dict(every.most_common(15))}


def _batch(batch_size: int, n: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y_train = torch.randint(0, 10, (n,), generator=generator)
    return x_train, y_train, torch.arange(batch_size)


def count_reference(batch_size: int) -> dict:
    import train_throughput as bench

    torch.manual_seed(0)
    student = torchvision.models.resnet50(num_classes=10).train()
    teacher = torchvision.models.resnet50(num_classes=10).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4, foreach=True)
    x_train, y_train, index = _batch(batch_size)
    from sdlib.augment import normalize
    x, y = normalize(x_train[index]), y_train[index]
    bench.reference_step(student, teacher, optimizer, x, y, torch.device("cpu"))  # Adam's state exists
    counter = OpCounter()
    with counter:
        # teacher, student forward + loss, backward, then zero_grad/Adam/item after it
        counter.start("forward")
        bench.reference_step(student, teacher, optimizer, x, y, torch.device("cpu"))
    return counter.summary(1, captured=False)


def count_paper_before(batch_size: int) -> dict:
    from sdlib.augment import augment, normalize
    from sdlib.lean_step import distillation_loss
    from sdlib.step import l2_penalty

    model, teacher = build_model(0, 2), build_model(1000, 1).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: 1.0)
    x_train, y_train, index = _batch(batch_size)
    generator = torch.Generator().manual_seed(0)

    def body(counter=None):  # the loop body of sdlib/step.py at a6b4224, phase marks added
        mark = counter.start if counter is not None else (lambda phase: None)
        mark("batch")
        x = augment(x_train[index], generator=generator).contiguous()
        labels = y_train[index]
        mark("teacher")
        with torch.inference_mode():
            teacher_logits = teacher(x)
        teacher_probs = torch.softmax(teacher_logits.float(), dim=1)
        mark("forward")
        logits = model(x)
        loss = distillation_loss(logits, labels, ALPHA, teacher_probs) + l2_penalty(model, 1e-4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum.add_(loss.detach())

    loss_sum = torch.zeros(())
    body()
    counter = OpCounter()
    with counter:
        body(counter)
    return counter.summary(1, captured=False)


def count_group(profile: str, alphas, distinct_teachers: bool, in_flight: str, batch_size: int) -> dict:
    """One step of :class:`LeanStep` for ``len(alphas)`` members at ``profile`` (its bf16 / channels_last as
    on CUDA), on the CPU."""
    config = TrainConfig.from_profile(profile, batch_size=batch_size, device="cpu", chains_in_flight=in_flight)
    shared_teacher = build_model(1000, 1).eval()
    teachers = [build_model(1000 + i, 1).eval() if distinct_teachers else shared_teacher for i in range(len(alphas))]
    members = list(alphas)
    models = [build_model(0, 2) for _ in members]
    # the profile's bf16 / channels_last as on CUDA (sdlib.config.device_precision turns them off on the CPU)
    with mock.patch.object(lean_step, "device_precision", lambda config, device: (config.bf16, config.channels_last)):
        group = LeanStep(config, models, alphas, teachers, torch.arange(64) % 10, "cpu",
                         batched=in_flight == "batched" and len(members) > 1)
    x_train, _, index = _batch(batch_size)
    generator = torch.Generator().manual_seed(0)
    group.write_batch(x_train, index, generator)
    group.step()  # Adam's state exists
    counter = OpCounter()
    students = group.students
    if isinstance(students, _Separate):  # mark where each model's forward starts
        step_one = students._step_one

        def marked(*args, **kwargs):
            counter.start("forward")
            return step_one(*args, **kwargs)

        students._step_one = marked
    with counter:
        counter.start("batch")
        group.write_batch(x_train, index, generator)
        counter.start("teacher")
        targets = group.teachers(group.x)
        counter.start("forward")
        students.step(group.x, group.onehot, targets)
        counter.start("update")
        group.schedule.advance()
    return counter.summary(len(members))


def count(mode: str, batch_size: int) -> dict:
    if mode == "reference":
        return count_reference(batch_size)
    if mode == "paper-before":
        return count_paper_before(batch_size)
    if mode in ("paper", "fast"):
        return count_group(mode, [ALPHA], distinct_teachers=False, in_flight="off", batch_size=batch_size)
    kind, step = mode.rsplit("-", 1)
    return count_group("paper", IN_FLIGHT_ALPHAS, distinct_teachers=step == "step3", in_flight=kind,
                       batch_size=batch_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per model in the counted step (the counts do not depend on it)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file for the counts (default: print only)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        p.error(f"--modes must name some of {', '.join(MODES)}; unknown: {', '.join(unknown) or '(none)'}")
    args.modes = modes
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for mode in args.modes:
        results[mode] = count(mode, args.batch_size)
        r = results[mode]
        print(f"{mode:<15} {r['models']:>3} model(s) {r['ops_per_step']:>6} ops/step "
              f"{r['ops_per_model_step']:>7.1f} per model ({r['compute_ops_per_model_step']:>6.1f} computing)  "
              f"{r['by_phase']}", flush=True)
    out = {
        "benchmark": "step_ops",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/step_ops.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "provenance": provenance(torch.device("cpu")),
        "modes": results,
    }
    if args.out:
        write_atomically(args.out, lambda handle: json.dump(out, handle, indent=1))
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
