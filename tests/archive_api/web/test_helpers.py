"""The web UI's pure helpers: SVG charts, CSRF tokens, redirects after sign-in, formatting."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from archive_api.web.charts import DaySeries, bar_chart, day_chart, nice_ceiling
from archive_api.web.control_pages import located_problems
from archive_api.web.csrf import session_csrf_token, tokens_match
from archive_api.web.rendering import HOME_PATH, safe_next, url, when

HOSTILE = "<script>alert(1)</script>\"&'</text><text>"
SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    """The chart must be well-formed XML (so nothing in it broke out of its element)."""
    return ET.fromstring(svg)


def test_day_chart_draws_one_line_per_series_with_escaped_text() -> None:
    days = [date(2026, 1, 1) + timedelta(days=n) for n in range(5)]
    svg = day_chart(
        days,
        [DaySeries("messages", [1, 5, 3, 0, 7]), DaySeries("blocked", [0, 1, 0, 0, 2])],
        title=HOSTILE,
    )
    root = parse(str(svg))
    assert root.find(f"{SVG}title") is not None
    assert root.find(f"{SVG}title").text == HOSTILE  # type: ignore[union-attr]
    lines = root.findall(f"{SVG}polyline")
    assert [line.get("data-series") for line in lines] == ["messages", "blocked"]
    assert len(lines[0].get("points", "").split()) == 5
    labels = [t.text for t in root.findall(f"{SVG}text")]
    assert "2026-01-01" in labels and "2026-01-05" in labels and "10" in labels  # peak 7 -> 10


def test_day_chart_handles_one_day_no_days_and_zeros() -> None:
    one = parse(str(day_chart([date(2026, 1, 1)], [DaySeries("messages", [0])], title="t")))
    assert one.find(f"{SVG}circle") is not None
    empty = parse(str(day_chart([], [DaySeries("messages", [])], title="t")))
    assert empty.find(f"{SVG}polyline") is None
    with pytest.raises(ValueError, match="has 1 counts for 2 days"):
        day_chart([date(2026, 1, 1), date(2026, 1, 2)], [DaySeries("x", [1])], title="t")


def test_bar_chart_escapes_names_and_shortens_long_ones() -> None:
    svg = str(bar_chart([(HOSTILE, 3), ("x" * 500, 1)], title="Top", chart_id="top"))
    root = parse(svg)
    assert "<script>" not in svg
    texts = [t.text or "" for t in root.findall(f"{SVG}text")]
    assert HOSTILE in texts
    assert max(len(t) for t in texts) <= 48
    widths = [float(r.get("width", "0")) for r in root.findall(f"{SVG}rect")]
    assert widths[0] == pytest.approx(3 * widths[1])
    nothing = parse(str(bar_chart([], title="Top", chart_id="none")))
    assert "Nothing in this period." in [t.text for t in nothing.findall(f"{SVG}text")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 1), (1, 1), (2, 2), (3, 5), (7, 10), (11, 20), (50, 50), (51, 100), (999, 1000)],
)
def test_nice_ceiling(value: int, expected: int) -> None:
    assert nice_ceiling(value) == expected


def test_csrf_tokens() -> None:
    token = session_csrf_token("1.payload.mac")
    assert token == session_csrf_token("1.payload.mac")
    assert token != session_csrf_token("1.payload.mac2")
    assert "payload" not in token and len(token) == 43
    assert tokens_match(token, token)
    for wrong in (None, "", token[:-1], token + "x", "é" * 43, "x" * 5000):
        assert not tokens_match(token, wrong)
    assert not tokens_match("", "")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/search?q=a", "/ui/search?q=a"),
        ("/ui/messages/r-1", "/ui/messages/r-1"),
        (None, HOME_PATH),
        ("", HOME_PATH),
        ("/ui", HOME_PATH),
        ("https://evil.example/ui/", HOME_PATH),
        ("//evil.example", HOME_PATH),
        ("/ui/\\evil", HOME_PATH),
        ("/ui/sign-in?next=/ui/x", HOME_PATH),
        ("/ui/x\nSet-Cookie: a", HOME_PATH),
        ("/ui/" + "a" * 3000, HOME_PATH),
    ],
)
def test_safe_next(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_url_and_when() -> None:
    assert url("/ui/x") == "/ui/x"
    assert url("/ui/x", {"with": ["a@b", "c@d"]}, room=None, q="") == "/ui/x?with=a%40b&with=c%40d"
    assert url("/ui/x", q='"a" & b') == "/ui/x?q=%22a%22+%26+b"
    assert when("2026-01-15T12:00:00+01:00") == "2026-01-15 11:00:00 UTC"
    assert when(datetime(2026, 1, 15, 12, tzinfo=UTC)) == "2026-01-15 12:00:00 UTC"
    assert when(datetime(2026, 1, 15, 12)) == "2026-01-15 12:00:00 UTC"  # naive: UTC
    assert when(None) == "" and when("not a time") == "not a time"


def test_policy_problems_are_located_in_the_text() -> None:
    text = "version = 1\n[federation]\nmode = 'sideways'\n"
    problems: list[dict[str, Any]] = [
        {"message": "bad mode", "line": 3, "column": 1, "key": "federation.mode"},
        {"message": "beyond", "line": 99, "column": 1, "key": None},
        {"message": "far right", "line": 1, "column": 500, "key": None},
        {"message": "whole", "line": None, "column": None, "key": None},
    ]
    located = located_problems(problems, text)
    assert located[0]["excerpt"] == {"before": "", "at": "m", "after": "ode = 'sideways'"}
    assert "excerpt" not in located[1] and "excerpt" not in located[3]
    assert located[2]["excerpt"] == {"before": "version = 1", "at": " ", "after": ""}
