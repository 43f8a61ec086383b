"""Pure-Python StanzaGuard for side-by-side benchmarks (benchmarks/bench_native.py).

Python imports this at start-up when this directory is on PYTHONPATH. It puts a finder in
front of the others that loads StanzaGuard's modules from their ``.py`` sources, even where
``make native`` put mypyc-compiled modules beside them (which Python would otherwise prefer).
Child processes (the index worker) inherit PYTHONPATH, and with it the same choice.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")


class SourceFirst(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is None or name.partition(".")[0] not in PACKAGES:
            return None
        leaf = name.rpartition(".")[2]
        for directory in path:
            source = Path(directory) / f"{leaf}.py"
            if source.is_file():
                return importlib.util.spec_from_file_location(name, source)
        return None  # a subpackage: its __init__ is never compiled


sys.meta_path.insert(0, SourceFirst())
