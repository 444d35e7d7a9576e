"""How much the teacher's BatchNorm mode changes its distillation targets (``TrainConfig.teacher_bn``).

The authors' teacher ran with its BatchNorm layers in train mode: each batch of 16 was normalized with its own
statistics when the targets were computed (see book/reproduce_cifar10.md); ours runs in eval mode (running statistics)
unless ``teacher_bn="train"``. This script trains a ResNet-50 briefly on real CIFAR-10 images (our trainer,
:func:`sdlib.step.distill_step`, labels only, the paper's batch 16 and Adam 1e-4), then computes its softmax
outputs both ways with :func:`sdlib.step.teacher_probs`, batch by batch (``--batch-size``), on

  test      the first ``--test-images`` of a seeded random order of the test set (unaugmented; a random order,
            since the test set is stored class by class and a one-class batch would have one-class statistics);
  targets   the training images as a student of the next step would see them in its first epoch: the epoch's
            order and augmentation (the batches whose targets distillation uses).

For each it reports the mean absolute difference of the softmax outputs (over images x classes), the mean total
variation distance per image, the fraction of images whose argmax agrees, and the accuracy of either mode. The
numbers, the settings and their provenance (commit, device, library versions, date) are written as JSON to
``--out``. On the CPU (2 cores, ~5 minutes with the defaults):

    mkdir -p /tmp/cifar10 && tar -xJf ../shared/data/cifar10-jpeg.tar.xz -C /tmp/cifar10
    PYTHONPATH=. nice python benchmarks/teacher_bn.py --data-root /tmp/cifar10 \\
        --out benchmarks/results/teacher_bn_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sdlib import data as cifar
from sdlib.augment import augment, normalize
from sdlib.chains import provenance
from sdlib.config import AUGMENT, TrainConfig, derive_seed
from sdlib.records import write_atomically
from sdlib.step import distill_step, epoch_order, teacher_probs

MODES = ("eval", "train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 (ImageFolder train/ test/ or the pickles)")
    p.add_argument("--out", help="where to write the JSON results (default: print only)")
    p.add_argument("--train-images", type=int, default=4000, help="training images (stratified subset)")
    p.add_argument("--test-images", type=int, default=2000, help="test images the two modes are compared on")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the teacher's training")
    p.add_argument("--batch-size", type=int, default=16, help="batch of training and of the teacher's targets")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (constant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: two OpenMP threads on a busy 2-core machine run several times slower)")
    return p


@torch.no_grad()
def compare(teacher: torch.nn.Module, batches, labels: torch.Tensor) -> dict:
    """Both modes on the same batches: (B, C) softmax outputs, compared over all images."""
    probs = {mode: torch.cat([teacher_probs(teacher, x, mode) for x in batches]) for mode in MODES}
    diff = (probs["train"] - probs["eval"]).abs()
    argmax = {mode: p.argmax(dim=1) for mode, p in probs.items()}
    return {
        "images": len(labels),
        "mean_abs_diff": diff.mean().item(),
        "mean_total_variation": (0.5 * diff.sum(dim=1)).mean().item(),
        "max_abs_diff": diff.max().item(),
        "argmax_agreement": (argmax["train"] == argmax["eval"]).float().mean().item(),
        "accuracy": {mode: (argmax[mode] == labels).float().mean().item() for mode in MODES},
    }


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    produced_by = provenance(device)  # the commit and tree state at the start
    splits = cifar.load_splits(args.data_root, n_val=0, subset=args.train_images, split_seed=args.seed)
    test_order = torch.randperm(len(splits.x_test), generator=torch.Generator().manual_seed(args.seed))
    test_idx = test_order[:args.test_images]
    data = SimpleNamespace(x_train=splits.x_train, y_train=splits.y_train, x_val=splits.x_val, y_val=splits.y_val,
                           x_test=splits.x_test[test_idx], y_test=splits.y_test[test_idx])
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, n_val=0,
                         include_alpha_hat=False, eval_batch_size=500, device="cpu")

    start = time.perf_counter()
    trained = distill_step(config, data, seed=args.seed, step=1, alpha=1.0, chain="shared", device=device,
                           progress=True)
    train_seconds = time.perf_counter() - start
    teacher = trained.model.eval()

    b = args.batch_size
    test_batches = [normalize(data.x_test[i:i + b]) for i in range(0, len(data.x_test) - b + 1, b)]
    test_labels = data.y_test[:len(test_batches) * b]
    # The first epoch of the next step (step 2): its order and augmentation, as distill_step draws them.
    order = epoch_order(config, args.seed, 2, 1, len(data.x_train), device)
    augment_gen = torch.Generator(device=device).manual_seed(derive_seed(args.seed, 2, 1, AUGMENT))
    target_batches, target_labels = [], []
    for i in range(len(order) // b):
        index = order[i * b:(i + 1) * b]
        target_batches.append(augment(data.x_train[index], generator=augment_gen))
        target_labels.append(data.y_train[index])
    results = {
        "test": compare(teacher, test_batches, test_labels),
        "targets": compare(teacher, target_batches, torch.cat(target_labels)),
    }
    out = {
        "benchmark": "teacher_bn",
        "description": "softmax outputs of a briefly trained ResNet-50 teacher with BatchNorm in train mode "
                       "(batch statistics) vs eval mode (running statistics), batch by batch",
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("data_root", "out")},
                     "data_layout": splits.meta["layout"], "train_images_used": len(data.x_train), "model": "torchvision resnet50, "
                     "10 classes, ImageNet stem", "optimizer": "Adam, constant lr, l2_coef 1e-4 (unsquared)"},
        "teacher": {"epochs": [{k: e[k] for k in ("epoch", "train_loss", "test_acc")} for e in trained.epochs],
                    "train_seconds": train_seconds},
        "results": results,
        "provenance": {**produced_by, "date": datetime.datetime.now(datetime.timezone.utc)
                       .isoformat(timespec="seconds")},
    }
    for name, r in results.items():
        print(f"{name:8s} {r['images']:5d} images: mean |p_train - p_eval| = {r['mean_abs_diff']:.4f}, "
              f"total variation {r['mean_total_variation']:.4f}, argmax agreement {r['argmax_agreement']:.3f}, "
              f"accuracy eval {r['accuracy']['eval']:.3f} / train {r['accuracy']['train']:.3f}")
    if args.out:
        write_atomically(Path(args.out), lambda handle: handle.write(json.dumps(out, indent=1) + "\n"))
        print(f"written to {args.out}")
    return out


if __name__ == "__main__":
    main()
