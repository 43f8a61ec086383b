"""docs/configuration.md lists every setting, with its environment variable, default and meaning.

The settings table is checked against `Settings` itself, both ways: a new setting without a
row fails, and so does a row for a setting that is gone, a row written twice, or a row whose
environment variable is not the one pydantic-settings reads (``STANZAGUARD_`` + the name in
capitals). Rows of a table whose header starts with ``setting`` are settings rows; a cell of
the first column may name several settings (`` `cert`, `key` ``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stanzaguard.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"
HEADER = ("setting", "environment variable", "default", "meaning")
ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_NAME = re.compile(r"`([a-z][a-z0-9_]*)`")
_RULE = re.compile(r"^:?-+:?$")


@dataclass(frozen=True, slots=True)
class SettingRow:
    line: int
    names: tuple[str, ...]
    environment: str
    default: str
    meaning: str


def environment_variable(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _cells(line: str) -> list[str] | None:
    stripped = line.strip()
    if not (stripped.startswith("|") and stripped.endswith("|")) or len(stripped) < 2:
        return None
    return [cell.strip() for cell in _CELL_SPLIT.split(stripped[1:-1])]


def read_setting_rows(markdown: str) -> tuple[list[SettingRow], list[str]]:
    """The rows of the settings tables in `markdown`, and what is wrong with their shape."""
    rows: list[SettingRow] = []
    problems: list[str] = []
    in_settings_table = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        cells = _cells(line)
        if cells is None:
            in_settings_table = False
            continue
        if cells and cells[0].lower() == "setting":
            in_settings_table = True
            if tuple(c.lower() for c in cells) != HEADER:
                problems.append(f"line {number}: settings table columns {cells}, want {HEADER}")
            continue
        if not in_settings_table or all(_RULE.match(c) for c in cells if c):
            continue
        if len(cells) != len(HEADER):
            problems.append(f"line {number}: {len(cells)} cells, want {len(HEADER)}: {line[:80]}")
            continue
        names = tuple(_NAME.findall(cells[0]))
        if not names:
            problems.append(f"line {number}: no `setting` in the first cell: {line[:80]}")
            continue
        rows.append(SettingRow(number, names, cells[1], cells[2], cells[3]))
    return rows, problems


def documentation_problems(settings: Iterable[str], markdown: str) -> list[str]:
    """Everything that keeps `markdown` from documenting exactly `settings`."""
    wanted = list(settings)
    rows, problems = read_setting_rows(markdown)
    counts = Counter(name for row in rows for name in row.names)
    for row in rows:
        for name in row.names:
            if name not in wanted:
                problems.append(f"line {row.line}: `{name}` is not a setting (any more?)")
            if environment_variable(name) not in row.environment:
                problems.append(
                    f"line {row.line}: `{name}` needs {environment_variable(name)} in the "
                    f"environment variable column, not {row.environment[:80]!r}"
                )
        if not row.default:
            problems.append(f"line {row.line}: {', '.join(row.names)}: no default given")
        if not row.meaning:
            problems.append(f"line {row.line}: {', '.join(row.names)}: no meaning given")
    problems += [f"`{name}` is documented {n} times" for name, n in counts.items() if n > 1]
    problems += [f"`{name}` is not documented" for name in wanted if name not in counts]
    return problems


def test_every_setting_is_documented_once_with_its_environment_variable() -> None:
    problems = documentation_problems(Settings.model_fields, CONFIGURATION_DOC.read_text())
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


GOOD = """\
| setting | environment variable | default | meaning |
|---|---|---|---|
| `listen` | `STANZAGUARD_LISTEN` | `0.0.0.0:5222` | The STARTTLS listener. |
| `cert`, `key` | `STANZAGUARD_CERT`, `STANZAGUARD_KEY` | (required) | PEM pair; `a \\| b`. |
"""


def test_the_check_passes_a_complete_table() -> None:
    assert documentation_problems(["listen", "cert", "key"], GOOD) == []


def test_the_check_finds_missing_stale_twice_and_malformed_rows() -> None:
    assert documentation_problems(["listen", "cert", "key", "model"], GOOD) == [
        "`model` is not documented"
    ]
    assert documentation_problems(["listen", "cert"], GOOD) == [
        "line 4: `key` is not a setting (any more?)"
    ]
    twice = GOOD + "| `listen` | `STANZAGUARD_LISTEN` | off | Again. |\n"
    assert documentation_problems(["listen", "cert", "key"], twice) == [
        "`listen` is documented 2 times"
    ]
    wrong_env = GOOD.replace("`STANZAGUARD_LISTEN`", "`LISTEN`")
    (problem,) = documentation_problems(["listen", "cert", "key"], wrong_env)
    assert problem.startswith("line 3: `listen` needs STANZAGUARD_LISTEN")
    no_default = GOOD.replace("| `0.0.0.0:5222` |", "|  |")
    assert documentation_problems(["listen", "cert", "key"], no_default) == [
        "line 3: listen: no default given"
    ]
    # A row added in the table's old three-column shape, and a table without the column.
    short = GOOD + "| `model` | `default` | The text model. |\n"
    (problem,) = documentation_problems(["listen", "cert", "key", "model"], short)[:1]
    assert problem.startswith("line 5: 3 cells, want 4")
    old = "| setting | default | meaning |\n|---|---|---|\n| `listen` | `x` | y |\n"
    problems = documentation_problems(["listen"], old)
    assert problems[0].startswith("line 1: settings table columns")


def test_the_check_ignores_other_tables_and_hostile_lines() -> None:
    other = (
        GOOD
        + "\n| condition | when |\n|---|---|\n| `host-unknown` | the stream's `to` |\n"
        + "|\n| | |\n" * 3
        + "| `"
        + "x" * 10_000
        + "\n"
    )
    assert documentation_problems(["listen", "cert", "key"], other) == []
