"""``--config FILE``, ``--set KEY=VALUE`` and ``apdask config show``.

Settings given on the command line go into ``dask.config`` before a command runs,
so the command line, YAML files in ``~/.config/dask/``, ``DASK_APDASK__…``
environment variables and ``dask.config.set`` in a notebook all use the same keys.
:func:`show_config` says where each resolved value came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dask.config
import yaml

from apdask.config import DEFAULTS, ListenConfig, PipelineConfig
from apdask.exceptions import ConfigurationError, UsageError

__all__ = ["apply_settings", "config_command", "show_config"]

#: Where the values of this process came from: key -> source, filled by apply_settings.
_SOURCES: dict[str, str] = {}


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _qualified(key: str) -> str:
    key = key.strip()
    return key if key.startswith("apdask.") else f"apdask.{key}"


def _known(key: str) -> bool:
    node: Any = DEFAULTS
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def apply_settings(files: Sequence[str], settings: Sequence[str]) -> None:
    """Load ``--config`` files, then ``--set`` values, into ``dask.config``.

    Raises
    ------
    UsageError
        A ``--set`` without ``=``.
    ConfigurationError
        An unreadable file, a file that is not a mapping, or an unknown key (a typo).
    """
    for path in files:
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as err:
            msg = f"cannot read --config {path}: {err.strerror}; pass a readable YAML file"
            raise ConfigurationError(msg) from None
        except yaml.YAMLError as err:
            msg = f"--config {path} is not valid YAML: {err}; fix the file"
            raise ConfigurationError(msg) from None
        if not isinstance(data, Mapping):
            msg = f"--config {path} must hold a mapping of settings, e.g. 'apdask: {{repo: DIR}}'"
            raise ConfigurationError(msg)
        if "apdask" not in data:
            data = {"apdask": data}
        flat = dict(_leaves(data))
        for key in flat:
            _check_known(key, f"--config {path}")
        dask.config.update(dask.config.config, data, priority="new")
        _SOURCES.update({k: f"--config {path}" for k in flat})
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            msg = f"--set needs KEY=VALUE, got {item!r}; e.g. --set detection.threshold_sigma=6"
            raise UsageError(msg)
        key = _qualified(key)
        _check_known(key, "--set")
        value = yaml.safe_load(text) if text.strip() else None
        dask.config.set({key: value})
        _SOURCES[key] = "--set"


def _check_known(key: str, where: str) -> None:
    # Keys below a mapping-valued default (e.g. the operator's own jobqueue settings) are
    # free-form; every other key must exist in apdask.yaml.
    if not key.startswith("apdask."):
        return
    if _known(key):
        return
    parent = key.rsplit(".", 1)[0]
    node: Any = DEFAULTS
    for part in parent.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and not node:
        return
    msg = f"{where}: unknown setting {key}; see `apdask config show` for the known keys"
    raise ConfigurationError(msg)


def _env_name(key: str) -> str:
    return "DASK_" + key.upper().replace(".", "__")


def _source(key: str, value: Any, default: Any) -> str:
    if key in _SOURCES:
        return _SOURCES[key]
    if _env_name(key) in os.environ:
        return f"env {_env_name(key)}"
    if value != default:
        return "dask config (YAML in ~/.config/dask, $DASK_CONFIG or dask.config.set)"
    return "default (apdask.yaml)"


def show_config(*, as_json: bool = False) -> str:
    """The resolved configuration, one line per key: ``key = value  [source]``.

    The pipeline's sections are validated as the graph would resolve them, so a bad
    value is reported here too.
    """
    PipelineConfig.resolve()  # raises on an out-of-range or unknown value
    ListenConfig.resolve()
    defaults = dict(_leaves(DEFAULTS))
    current = dict(_leaves({"apdask": dask.config.get("apdask")}))
    rows = []
    for key in sorted(set(defaults) | set(current)):
        value = current.get(key, defaults.get(key))
        rows.append((key, value, _source(key, value, defaults.get(key))))
    if as_json:
        return json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=1)
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k:<{width}}  {json.dumps(v)!s:<28} {s}" for k, v, s in rows)


def config_command(args: Any) -> int:
    """``apdask config show``."""
    print(show_config(as_json=args.json))
    return 0
