"""Which of our modules run compiled by mypyc, and whether a compiled one is out of date.

`scripts/build_native.py` (``make native``) compiles the hot-path modules in place: Python then
imports ``proxy/pipeline.cpython-311-….so`` instead of ``proxy/pipeline.py``. An edit to the
source after that is ignored until the next build, so start-up (and the test suite) check that
no compiled module is older than its source. See docs/native.md.
"""

from __future__ import annotations

import importlib.machinery
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")


@dataclass(frozen=True)
class NativeStatus:
    """``compiled``: modules loaded from a compiled extension; ``stale``: those of them whose
    ``.py`` source beside them changed after they were built."""

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
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                stale.append(name)
            break
    return NativeStatus(tuple(compiled), tuple(stale))
