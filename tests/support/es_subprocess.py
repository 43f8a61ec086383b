"""Subprocesses (and the index worker) against osmem-server: the test-only media-type switch.

osmem-server refuses the official client's `compatible-with` media types; the test process
switches the client to plain JSON (`allow_plain_media_types`), but that is module state and
does not reach a child process. `osmem_child_environment` gives children a `PYTHONPATH` with
`tests/support/osmem_site` (a `sitecustomize` applying the switch at start-up) and the
project root (so `tests.support` imports), so the switch stays in test code only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "osmem_site"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def osmem_python_path(environ: Mapping[str, str] | None = None) -> str:
    """`PYTHONPATH` for a child that must talk to osmem-server (keeps any existing entries)."""
    current = (environ if environ is not None else os.environ).get("PYTHONPATH", "")
    parts = [str(SITE_DIR), str(PROJECT_ROOT), *(p for p in current.split(os.pathsep) if p)]
    return os.pathsep.join(parts)


def osmem_child_environment(base: Mapping[str, str]) -> dict[str, str]:
    """`base` plus the `PYTHONPATH` above."""
    return {**base, "PYTHONPATH": osmem_python_path(base)}
