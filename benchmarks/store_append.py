"""What writing one epoch line costs in a results folder that already holds many: the append of sdlib.store
against a full rewrite of the file under the lock, as the store before it did (read, replace the key, write a
temporary file, rename). Prints milliseconds per line; no assertion (timings depend on the disk).

    python benchmarks/store_append.py [--lines 14700] [--repeat 20] [--dir /path/on/the/disk/to/measure]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sdlib.records import write_atomically
from sdlib.store import EPOCH_KEY, ResultsStore, _locked, last_per_key, read_jsonl

ROW = {"config_hash": "5930b30dee8b", "seed": 0, "chain": "alpha=0.1", "step": 2, "epoch": 1, "train_loss": 0.33,
       "val_acc": 0.31, "val_loss": 0.08, "test_acc": 0.32, "test_loss": 0.08, "lr": 0.001, "wall_time_s": 22.9,
       "images_per_s": 2092.9}


def full_rewrite(directory: Path, row: dict) -> None:
    """The old store's write: under the lock, read every line, drop the row's key, rewrite the file."""
    path = directory / "epochs.jsonl"
    with _locked(directory):
        rows = [r for _, r in last_per_key(read_jsonl(path), EPOCH_KEY)
                if tuple(r.get(k) for k in EPOCH_KEY) != tuple(row.get(k) for k in EPOCH_KEY)]
        write_atomically(path, lambda handle: handle.writelines(json.dumps(r) + "\n" for r in rows + [row]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=14_700, help="lines already in epochs.jsonl (default: the paper "
                                                              "grid's 14,700)")
    p.add_argument("--repeat", type=int, default=20, help="lines written per method (default 20)")
    p.add_argument("--dir", help="a folder on the disk to measure (default: a temporary folder)")
    args = p.parse_args(argv)
    out = {}
    for method in ("append", "full rewrite"):
        directory = Path(tempfile.mkdtemp(dir=args.dir))
        (directory / "epochs.jsonl").write_text("".join(json.dumps({**ROW, "seed": i % 4, "epoch": i}) + "\n"
                                                        for i in range(args.lines)))
        store = ResultsStore(directory)
        start = time.perf_counter()
        for k in range(args.repeat):
            row = {**ROW, "epoch": args.lines + k}
            store.append_epoch(row) if method == "append" else full_rewrite(directory, row)
        out[method] = (time.perf_counter() - start) / args.repeat * 1000
        print(f"{method:>12}: {out[method]:8.2f} ms per epoch line ({args.lines:,} lines in the file)")
    return out


if __name__ == "__main__":
    main()
