"""Give the records of a results folder the config_hash of the current code: the one that holds the data's
fingerprint (sdlib.config.TrainConfig.config_hash).

Records written before config_hash covered the data carry a hash of their configuration alone; the current
code would never find them again (every step pending, teachers not reused). This script, run once per folder,
recomputes each record's hash from its stored ``config`` and the fingerprint of the data it was trained on,
records that fingerprint in the record (``config.data_fingerprint``, ``data.fingerprint``), keeps the old hash
as ``legacy_config_hash``, and gives the epoch lines (``epochs.jsonl``, ``probe_epochs.jsonl``) the new hash of
their config. Everything else is kept byte for byte in meaning; each file is rewritten atomically, under the
results store's lock (a run appending meanwhile waits; its record is kept). A record that already carries the
fingerprint of other data is refused, and then nothing is rewritten. Running it
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
import sys
from pathlib import Path

from sdlib.records import EPOCHS_FILE, PROBE_EPOCHS_FILE, RECORDS_FILE
from sdlib.store import ResultsStore


def _config(stored: dict, fingerprint: str):
    from sdlib.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - fields)
    if unknown:
        raise ValueError(f"a record's config has field(s) {unknown} that TrainConfig does not know")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return TrainConfig(**{**values, "data_fingerprint": fingerprint})


def migrate(results_dir: str | Path, fingerprint: str) -> dict[str, str]:
    """Migrate ``results_dir`` in place (see the module docstring); returns ``{old hash: new hash}``.

    The folder is read and rewritten under the results store's lock (:meth:`sdlib.store.ResultsStore.rewrite`):
    a run appending a record meanwhile waits, and its record is kept. Records that already carry the
    fingerprint of other data (``data.fingerprint`` or ``config.data_fingerprint``) are refused, naming the file
    and line, and then nothing is rewritten: their hash must stay that of the data they were trained on."""
    results_dir = Path(results_dir)
    path = results_dir / RECORDS_FILE
    if not path.is_file():
        raise ValueError(f"no records in {path}")

    def transform(files: dict) -> dict:
        records = files[RECORDS_FILE]
        if not records:
            raise ValueError(f"no records in {path}")
        mapping: dict[str, str] = {}
        migrated = []
        for line_number, record in records:
            where = f"{path}, line {line_number}"
            if not isinstance(record.get("config"), dict):
                raise ValueError(f"{where}: no config to hash")
            trained_on = {value for value in (record.get("config", {}).get("data_fingerprint"),
                                              (record.get("data") or {}).get("fingerprint")
                                              if isinstance(record.get("data"), dict) else None)
                          if value is not None}
            other = sorted(trained_on - {fingerprint})
            if other:
                raise ValueError(f"{where}: trained on data of fingerprint {other[0]}, not {fingerprint}: its "
                                 f"config_hash stays that of its own data (migrate with --data-root of the data "
                                 f"it was trained on, or leave it); nothing was changed")
            try:
                config = _config(record["config"], fingerprint)
            except ValueError as error:
                raise ValueError(f"{where}: {error}; nothing was changed") from None
            new = config.config_hash()
            old = record.get("config_hash")
            if mapping.setdefault(old, new) != new:
                raise ValueError(f"{where}: records of config_hash {old} would get two new hashes "
                                 f"({mapping[old]}, {new}); migrate them one by one")
            mapping[new] = new  # a second run maps the new hash to itself
            out = {**record, "config_hash": new, "legacy_config_hash": record.get("legacy_config_hash", old),
                   "config": {**record["config"], "data_fingerprint": fingerprint}}
            if isinstance(record.get("data"), dict):
                out["data"] = {**record["data"], "fingerprint": fingerprint}
            migrated.append(out)
        changes["mapping"] = {old: new for old, new in mapping.items() if old != new}
        rewritten = {RECORDS_FILE: migrated}
        for name in (EPOCHS_FILE, PROBE_EPOCHS_FILE):
            if files[name]:
                rewritten[name] = [{**row, "config_hash": mapping.get(row.get("config_hash"), row.get("config_hash"))}
                                   for _, row in files[name]]
        return rewritten

    changes: dict = {}
    ResultsStore(results_dir).rewrite(transform)
    return changes["mapping"]


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
