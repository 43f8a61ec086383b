"""Which of our modules run compiled by mypyc, and whether a compiled one is out of date.

`scripts/build_native.py` (``make native``) compiles the hot-path modules in place: Python then
imports ``proxy/pipeline.cpython-311-….so`` instead of ``proxy/pipeline.py``. An edit to the
source after that is ignored until the next build, so start-up (and the test suite) check that
every compiled module was built from the source beside it. The build records the SHA-256 of
each source it compiled in ``native-sources.json`` in the module's directory (setup.py, the
same in place and in a wheel); file times would not do, since installing a wheel writes the
sources after the compiled modules. See docs/native.md.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")
MANIFEST = "native-sources.json"


@dataclass(frozen=True)
class NativeStatus:
    """``compiled``: modules loaded from a compiled extension; ``stale``: those of them whose
    ``.py`` source beside them is not the one they were built from (or the build left no
    record of it)."""

    compiled: tuple[str, ...]
    stale: tuple[str, ...]


def native_status(names: Iterable[str] | None = None) -> NativeStatus:
    """The status of modules ``names`` (default: all of ours imported so far).

    Read from the files, not from the module objects: a module mypyc initialises from the
    shared library of its group reports a ``__file__`` that does not exist. What Python
    imports is decided by the files too: an extension module beside a source wins.
    """
    if names is None:
        names = [
            name
            for name in sys.modules
            if name.partition(".")[0] in PACKAGES and not name.endswith("__mypyc")
        ]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    recorded: dict[Path, dict[str, str]] = {}
    compiled: list[str] = []
    stale: list[str] = []
    for name in sorted(names):
        package, _, leaf = name.rpartition(".")
        for directory in getattr(sys.modules.get(package), "__path__", ()):
            built = Path(directory) / f"{leaf}{suffix}"
            if not built.exists():
                continue
            compiled.append(name)
            source = built.with_name(f"{leaf}.py")
            if built.parent not in recorded:
                recorded[built.parent] = _recorded_sources(built.parent)
            if source.exists() and recorded[built.parent].get(leaf) != _sha256(source):
                stale.append(name)
            break
    return NativeStatus(tuple(compiled), tuple(stale))


def _recorded_sources(directory: Path) -> dict[str, str]:
    """The build's record of the sources compiled in ``directory``; empty if unreadable."""
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, str)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
