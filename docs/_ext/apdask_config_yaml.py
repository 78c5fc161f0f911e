"""Keys, defaults and comments of a dask-config YAML (``apdask/apdask.yaml``).

Used by the docs extension ``apdask_docs`` for the configuration reference, and by
``tests/test_docs_examples.py``; needs only PyYAML, not Sphinx.
"""

from __future__ import annotations

import pathlib
import re

import yaml

__all__ = ["config_entries"]

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def _split_comment(rest):
    """``value  # comment`` → ``("value", "comment")`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "\"'":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def config_entries(path):
    """``(dotted key, default, comment, is_group)`` of every key of a dask-config YAML."""
    text = pathlib.Path(path).read_text()
    data = yaml.safe_load(text)
    stack = []  # (indent, key)
    out = []
    for line in text.splitlines():
        m = _KEY.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        keys = [k for _, k in stack]
        value = data
        for k in keys:
            value = value[k]
        _, comment = _split_comment(m["rest"])
        out.append((".".join(keys), value, comment, isinstance(value, dict)))
    return out
