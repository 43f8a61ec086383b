"""Build hook: the per-stanza hot path compiled to C by mypyc (docs/native.md).

The project's metadata is in pyproject.toml; this file only adds the compiled modules, and only
when STANZAGUARD_COMPILE=1 (``make native`` sets it). Without it the package installs as pure
Python, which behaves the same and runs slower. The modules compiled are listed in
pyproject.toml under ``[tool.stanzaguard.native]``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent


def native_modules() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        config = tomllib.load(file)
    modules: list[str] = config["tool"]["stanzaguard"]["native"]["modules"]
    return modules


def extensions() -> list[Extension]:
    if os.environ.get("STANZAGUARD_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    paths = [module.replace(".", "/") + ".py" for module in native_modules()]
    # One shared library for all of them (calls between compiled modules stay native), named
    # so that it is recognisable beside the packages.
    built: list[Extension] = mypycify(paths, opt_level="3", group_name="stanzaguard.native")
    return built


setup(ext_modules=extensions())
