"""Give the records of a results folder the config_hash of the current code: the one that holds the data's
fingerprint (sdlib.config.TrainConfig.config_hash).

Records written before config_hash covered the data carry a hash of their configuration alone; the current
code would never find them again (every step pending, teachers not reused). This script, run once per folder,
recomputes each record's hash from its stored ``config`` and the fingerprint of the data it was trained on,
records that fingerprint in the record (``config.data_fingerprint``, ``data.fingerprint``), keeps the old hash
as ``legacy_config_hash``, and gives the epoch lines (``epochs.jsonl``, ``probe_epochs.jsonl``) the new hash of
their config. Everything else is kept byte for byte in meaning; each file is rewritten atomically. Running it
again changes nothing (the hash is recomputed from the same config and fingerprint), so it is also how records
follow a later change of the hashed fields.

    python scripts/migrate_results.py results/cifar10 --data-root data/cifar10
    python scripts/migrate_results.py results/cifar10 --data-fingerprint 98f071b93968d842

The committed ``results/cifar10`` was migrated with the fingerprint of the JPEG copy it was trained on
(``cifar10-jpeg.tar.xz`` unpacked: 98f071b93968d842), which ``sweeps/h100-fast-4epochs.yaml`` pins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sdlib.records import EPOCHS_FILE, PROBE_EPOCHS_FILE, RECORDS_FILE, write_atomically
from sdlib.store import read_jsonl


def _config(stored: dict, fingerprint: str):
    from sdlib.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - fields)
    if unknown:
        raise ValueError(f"a record's config has field(s) {unknown} that TrainConfig does not know")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return TrainConfig(**{**values, "data_fingerprint": fingerprint})


def migrate(results_dir: str | Path, fingerprint: str) -> dict[str, str]:
    """Migrate ``results_dir`` in place (see the module docstring); returns ``{old hash: new hash}``."""
    results_dir = Path(results_dir)
    records = read_jsonl(results_dir / RECORDS_FILE)
    if not records:
        raise ValueError(f"no records in {results_dir / RECORDS_FILE}")
    mapping: dict[str, str] = {}
    migrated = []
    for line_number, record in records:
        if not isinstance(record.get("config"), dict):
            raise ValueError(f"{results_dir / RECORDS_FILE}, line {line_number}: no config to hash")
        config = _config(record["config"], fingerprint)
        new = config.config_hash()
        old = record.get("config_hash")
        if mapping.setdefault(old, new) != new:
            raise ValueError(f"{results_dir / RECORDS_FILE}, line {line_number}: records of config_hash {old} "
                             f"would get two new hashes ({mapping[old]}, {new}); migrate them one by one")
        mapping[new] = new  # a second run maps the new hash to itself
        out = {**record, "config_hash": new, "legacy_config_hash": record.get("legacy_config_hash", old),
               "config": {**record["config"], "data_fingerprint": fingerprint}}
        if isinstance(record.get("data"), dict):
            out["data"] = {**record["data"], "fingerprint": fingerprint}
        migrated.append(out)
    _rewrite(results_dir / RECORDS_FILE, migrated)
    for name in (EPOCHS_FILE, PROBE_EPOCHS_FILE):
        rows = read_jsonl(results_dir / name)
        if rows:
            _rewrite(results_dir / name, [{**row, "config_hash": mapping.get(row.get("config_hash"),
                                                                              row.get("config_hash"))}
                                          for _, row in rows])
    return {old: new for old, new in mapping.items() if old != new}


def _rewrite(path: Path, rows: list[dict]) -> None:
    write_atomically(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", help="the folder holding records.jsonl (and epochs.jsonl)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--data-root", help="the data the records were trained on (its fingerprint is computed)")
    which.add_argument("--data-fingerprint", help="that data's fingerprint (sdlib.data.data_fingerprint)")
    args = parser.parse_args(argv)
    fingerprint = args.data_fingerprint
    if args.data_root is not None:
        from sdlib.data import data_fingerprint

        fingerprint = data_fingerprint(args.data_root)
        if fingerprint is None:
            parser.error(f"no CIFAR-10 under --data-root {args.data_root!r}")
    try:
        mapping = migrate(args.results_dir, fingerprint)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    for old, new in mapping.items():
        print(f"config_hash {old} -> {new}")
    print(f"{args.results_dir}: records carry the data fingerprint {fingerprint}"
          + ("" if mapping else " (nothing changed)"))
    return mapping


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
