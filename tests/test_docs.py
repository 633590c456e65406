"""The documentation keeps up with the code: every command-line flag is mentioned in the
README or docs/, and docs/training.md lists every run-file setting with its true default.

The flags come from walking ``latentkit.cli.build_parser``; the settings from the
dataclasses of the loop, of each phase's recipe and of the tables nested in them, so a
flag or setting added (or removed) later fails here until the docs say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest
from test_cli_help import COMMANDS

from latentkit.train.loop import TrainConfig
from latentkit.train.recipes import PHASES, to_toml

REPO = Path(__file__).resolve().parents[1]
TRAINING_DOC = REPO / "docs" / "training.md"
_NOT_DOCUMENTED = ("--help", "-h")
# A table row of docs/training.md: | `key` | `default` | meaning |  (default cell may be
# a nested table's name, [recipe.data]).
_ROW = re.compile(r"^\| `(?P<key>\w+)` \| `?(?P<default>[^|`]*?)`? \|", re.MULTILINE)


def documentation() -> str:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def cli_flags() -> list[tuple[str, str]]:
    """(command, flag) for every long flag of every command."""
    return [
        (command, flag)
        for command, parser in COMMANDS.items()
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag not in _NOT_DOCUMENTED
    ]


def test_every_cli_flag_is_documented():
    text = documentation()
    missing = [
        f"{command} {flag}"
        for command, flag in cli_flags()
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)
    ]
    assert not missing, f"flags that neither README.md nor docs/*.md mention: {missing}"


def settings_classes() -> list[type]:
    """The loop's config, each phase's recipe, and the training tables nested in them
    (DataConfig, ...); the networks' own configs (latentkit.config) are diffusers'."""
    found: list[type] = []
    pending = [TrainConfig, *(PHASES[name][0] for name in PHASES)]
    while pending:
        cls = pending.pop(0)
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for nested in (hint, *typing.get_args(hint)):  # a table, or an optional one
                if dataclasses.is_dataclass(nested) and nested.__module__.startswith(
                    ("latentkit.train", "latentkit.data")
                ):
                    pending.append(nested)
    return found


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def as_run_file_value(value) -> str:
    """A default as ``latentkit train --dry-run`` prints it (TOML, "none" for None)."""
    return to_toml({"key": value}).strip().removeprefix("key = ")


def documented_rows(cls: type) -> dict[str, str]:
    """key -> default cell of the table under the one heading of docs/training.md that
    names ``cls`` in backquotes."""
    text = TRAINING_DOC.read_text(encoding="utf-8")
    sections = [s for s in re.split(r"^(?=#)", text, flags=re.MULTILINE) if s.strip()]
    mine = [s for s in sections if f"`{cls.__name__}`" in s.splitlines()[0]]
    assert len(mine) == 1, f"docs/training.md needs one heading naming `{cls.__name__}`"
    return {m["key"]: m["default"] for m in _ROW.finditer(mine[0])}


def test_settings_classes_are_found():
    names = {cls.__name__ for cls in settings_classes()}
    assert {"TrainConfig", "DataConfig", "VAERecipe", "CLIPRecipe", "UNetRecipe"} <= names
    assert "CaptionMargin" in names  # an optional table (None by default) counts too


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda cls: cls.__name__)
def test_every_setting_is_documented_with_its_default(cls):
    rows = documented_rows(cls)
    fields = {f.name: field_default(f) for f in dataclasses.fields(cls)}
    assert sorted(rows) == sorted(fields), (
        f"{cls.__name__}: undocumented {sorted(set(fields) - set(rows))}, "
        f"documented but gone {sorted(set(rows) - set(fields))}"
    )
    for name, value in fields.items():
        if not dataclasses.is_dataclass(value):  # a nested table: its own section
            shown = rows[name]
            assert shown == as_run_file_value(value), f"{cls.__name__}.{name}: {shown!r}"


def test_a_flag_is_mentioned_only_as_a_whole_word(monkeypatch):
    """A prefix of a documented flag (--clip-ski of --clip-skip) is not a mention of it."""
    assert "--clip-skip" in documentation()
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip-ski")
    monkeypatch.setitem(COMMANDS, "latentkit fake", parser)
    with pytest.raises(AssertionError, match="latentkit fake --clip-ski"):
        test_every_cli_flag_is_documented()
