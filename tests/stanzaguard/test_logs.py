"""Logging set-up: records go to the stderr of the moment, even after it was swapped."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from stanzaguard.logs import configure_logging


@pytest.fixture
def restore_root_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_records_follow_a_swapped_and_closed_stderr(
    restore_root_logging: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", "json")
    logging.getLogger("stanzaguard.test").info("one", extra={"n": 1})
    assert json.loads(first.getvalue())["n"] == 1

    # A CLI run in-process ends: its captured stream is closed and stderr replaced.
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("elastic_transport.node_pool").warning("node failed")
    record = json.loads(second.getvalue())
    assert record["message"] == "node failed"
    assert record["level"] == "warning"
