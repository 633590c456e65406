"""``--help`` of every command: each option has a line of meaning and shows its default.

The parsers are walked from ``latentkit.cli.build_parser``, so a verb or option added
later is checked without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from latentkit.cli import build_parser
from latentkit.generation.flags import RENAMED
from latentkit.generation.options import GenerateOptions

_NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the ``latentkit`` command by its command line: "latentkit",
    "latentkit generate", "latentkit data shapes", ..."""
    found = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, sub in action.choices.items():
                    walk(f"{name} {verb}", sub)

    walk("latentkit", build_parser())
    return found


COMMANDS = command_parsers()


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, _NOT_OPTIONS)]


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line ``--help`` prints for ``action``, as the parser's formatter writes it."""
    return parser._get_formatter()._expand_help(action)


def shown_default(command: str, action: argparse.Action):
    """What ``--help`` must call the default: the parser's own, except for ``generate``'s
    settings, which stay None on the parser (so that a ``--from`` record can fill them)
    and take their defaults from GenerateOptions."""
    field = RENAMED.get(action.dest, action.dest)
    if command == "latentkit generate" and field in _FIELD_DEFAULTS:
        default = _FIELD_DEFAULTS[field]
        return action.default if default is dataclasses.MISSING else default
    return action.default


def is_plain_switch(action: argparse.Action, default) -> bool:
    """A flag that takes no value and is off unless given (store_true): nothing to show."""
    return action.nargs == 0 and default is False


def test_every_command_is_walked():
    verbs = {name.split(" ", 1)[1] for name in COMMANDS if " " in name}
    expected = {"generate", "interpolate", "info", "inspect", "convert", "data"}
    assert expected | {"data shapes", "train", "plot", "eval"} <= verbs


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_line_of_meaning(command):
    parser = COMMANDS[command]
    missing = [a.dest for a in options(parser) if not (a.help or "").strip()]
    assert not missing, f"{command}: options without help: {missing}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            unexplained = [c.dest for c in action._choices_actions if not (c.help or "").strip()]
            assert not unexplained, f"{command}: sub-commands without help: {unexplained}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_shows_its_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: nothing is wrapped apart
    parser = COMMANDS[command]
    rendered = parser.format_help()
    for action in options(parser):
        default = shown_default(command, action)
        if action.required or is_plain_switch(action, default):
            continue
        line = expanded_help(parser, action)
        assert line in rendered, f"{command} {action.dest}: help not rendered"
        if default is None or default is False or default in ("", []):
            # Absence means something (a random seed, the model's own size, off...): say it.
            assert "(default: " in line, f"{command} {action.dest}: absence unexplained: {line!r}"
        else:
            assert f"(default: {default})" in line or f"(default: {default}," in line, (
                f"{command} {action.dest}: default {default!r} not shown: {line!r}"
            )
