"""JSON and YAML parameter files (sweep files, papermill parameter sets) read strictly: a key given twice, a
malformed file or non-UTF-8 text raises ValueError naming the file, the line and what is wrong."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import yaml


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader closer to YAML 1.2: a key given twice raises (PyYAML keeps the last silently), and
    ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``, else reads a string)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": merged keys may be given again
                continue
            key = self.construct_object(key_node, deep=True)
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {lines[key] + 1}); remove one",
                    key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _unique_keys(pairs: list) -> dict:
    twice = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if twice:
        raise ValueError(f"key(s) {twice} given twice in one object; remove one")
    return dict(pairs)


def read_mapping(source, what: str):
    """A JSON/YAML file as Python objects (anything but a path is returned as it is). A malformed file, or a key
    given twice, raises ValueError naming the file, the line and what is wrong (no parser traceback)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{what} must end in .json, .yaml or .yml, got {path.name!r}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}, line {line}: not UTF-8 text (byte {error.object[error.start]:#04x}); "
                         f"save it as UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path}, line {error.lineno}, column {error.colno}: not valid JSON: "
                         f"{error.msg}") from None
    except ValueError as error:  # a key given twice in JSON
        raise ValueError(f"{what} {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = "; ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                            if part) or str(error)
        problem += " (YAML indents with spaces, not tabs)" if "'\\t'" in problem else ""
        raise ValueError(f"{what} {path}{where}: not valid YAML: {problem}") from None
