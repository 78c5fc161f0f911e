"""Sphinx extension of the apdask docs: references generated from the code.

* ``.. apdask-cli::`` documents every command and option of ``apdask.cli.build_parser()``
  (usage, help, choices, defaults), one section per command;
* ``.. apdask-config::`` documents every key of the shipped ``apdask/apdask.yaml``:
  its ``dask.config`` name, environment variable, default and the YAML comment;
* on ``config-inited`` the notebooks of ``notebooks/`` are copied to ``docs/notebooks/``
  (ignored by git) so that myst-nb renders them, and the autosummary stubs of the last
  build (``docs/generated/``) are removed, so that a moved module leaves no stale page.

Nothing here imports a module path other than ``apdask.cli.build_parser`` and
``apdask.config`` (for the YAML's location), so the references follow the code.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil

import yaml
from apdask_config_yaml import config_entries
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_RST_SPECIAL = re.compile(r"([\\`*|_])")


def _esc(text):
    """Plain text as reStructuredText: no accidental emphasis, literals or references."""
    return _RST_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _literal(value):
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("...").strip()
    return f"``{text}``"


class _Directive(SphinxDirective):
    has_content = False

    def _parse(self, lines):
        from docutils import nodes

        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=self.name), node)
        return node.children


# --------------------------------------------------------------------------------------
# CLI reference


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name)


def _option_lines(action):
    if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
        return []
    if action.option_strings:
        metavar = action.metavar or action.dest.upper()
        if action.nargs == 0:
            sig = ", ".join(action.option_strings)
        else:
            n = action.nargs if isinstance(action.nargs, int) else 1
            arg = " ".join([metavar if isinstance(metavar, str) else metavar[0]] * n)
            if isinstance(metavar, tuple):
                arg = " ".join(metavar)
            sig = ", ".join(f"{o} {arg}" for o in action.option_strings)
    else:
        sig = action.metavar or action.dest
    body = [_esc(action.help) if action.help and action.help != argparse.SUPPRESS else ""]
    facts = []
    if action.required and action.option_strings:
        facts.append("required")
    if action.choices is not None and not isinstance(action.choices, dict):
        facts.append("one of " + ", ".join(f"``{c}``" for c in action.choices))
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default is not None
        and default is not argparse.SUPPRESS
    ):
        facts.append(f"default ``{default}``")
    if facts:
        body.append("(" + "; ".join(facts) + ")")
    text = " ".join(b for b in body if b) or "\\"
    return [f".. option:: {sig}", "", f"   {text}", ""]


def _command_lines(prog, parser, help_text, depth):
    marks = "=-~^\"'"
    title = f"``{prog}``"
    lines = [title, marks[min(depth, len(marks) - 1)] * len(title), ""]
    if help_text:
        lines += [_esc(help_text), ""]
    if parser.description and parser.description != help_text:
        lines += [_esc(parser.description), ""]
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines += ["::", ""] + ["   " + u for u in usage.splitlines()] + [""]
    lines += [f".. program:: {prog}", ""]
    for action in parser._actions:
        lines += _option_lines(action)
    for name, sub, sub_help in _subparsers(parser):
        lines += _command_lines(f"{prog} {name}", sub, sub_help, depth + 1)
    return lines


class CliReference(_Directive):
    """``.. apdask-cli::``: every command of ``apdask.cli.build_parser()``."""

    def run(self):
        from apdask.cli.main import build_parser

        parser = build_parser()
        lines = []
        if parser.description:
            lines += [_esc(parser.description), ""]
        lines += ["Global usage::", ""]
        lines += ["   " + u for u in parser.format_usage().removeprefix("usage: ").splitlines()]
        lines += ["", ".. program:: apdask", ""]
        for action in parser._actions:
            lines += _option_lines(action)
        for name, sub, sub_help in _subparsers(parser):
            lines += _command_lines(f"apdask {name}", sub, sub_help, 0)
        return self._parse(lines)


# --------------------------------------------------------------------------------------
# configuration reference


class ConfigReference(_Directive):
    """``.. apdask-config::``: every key of the shipped defaults YAML."""

    def run(self):
        from apdask import config

        path = pathlib.Path(config.__file__).with_name("apdask.yaml")
        self.env.note_dependency(str(path))
        entries = config_entries(path)
        lines = []
        table = []

        def flush():
            if not table:
                return
            lines.extend([".. list-table::", "   :header-rows: 1", "   :widths: 30 15 55", ""])
            lines.extend(["   * - key", "     - default", "     - meaning"])
            lines.extend(table)
            lines.append("")
            table.clear()

        for key, value, comment, is_group in entries:
            depth = key.count(".")
            if depth == 0:  # the "apdask" root
                continue
            if is_group and depth == 1:
                flush()
                title = f"``{key}``"
                lines += [title, "-" * len(title), ""]
                if comment:
                    lines += [_esc(comment), ""]
                continue
            if is_group:  # a nested group: its keys follow with their full names
                if comment:
                    table.extend([f"   * - ``{key}``", "     - ", f"     - {_esc(comment)}"])
                continue
            env = "DASK_" + "__".join(p.upper().replace("-", "_") for p in key.split("."))
            table.extend(
                [
                    f"   * - ``{key}``",
                    "",
                    f"       ``{env}``",
                    f"     - {_literal(value)}",
                    "     - " + (_esc(comment) or "\\"),
                ]
            )
        flush()
        return self._parse(lines)


# --------------------------------------------------------------------------------------


def _clean_generated(app, config):
    """Drop last build's autosummary stubs: a moved module's old page would warn (-W)."""
    shutil.rmtree(pathlib.Path(app.srcdir) / "generated", ignore_errors=True)


def _copy_notebooks(app, config):
    src = pathlib.Path(app.srcdir).parent / "notebooks"
    dst = pathlib.Path(app.srcdir) / "notebooks"
    dst.mkdir(exist_ok=True)
    wanted = {p.name for p in src.glob("*.ipynb")}
    for old in dst.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for nb in src.glob("*.ipynb"):
        target = dst / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


def setup(app):
    app.add_directive("apdask-cli", CliReference)
    app.add_directive("apdask-config", ConfigReference)
    app.connect("config-inited", _clean_generated)
    app.connect("config-inited", _copy_notebooks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
