"""Compile the hot-path modules with mypyc in place, when their sources changed.

    .venv/bin/python scripts/build_native.py          # `make native` runs this
    STANZAGUARD_PURE_PYTHON=1 ... build_native.py     # remove compiled modules, run pure Python

The modules are listed in pyproject.toml ([tool.stanzaguard.native]); the build is
`STANZAGUARD_COMPILE=1 python setup.py build_ext --inplace`. A stamp in the virtualenv records
a digest of what was compiled (sources, setup.py, the module list, the Python and mypy
versions); when it matches and every compiled module is present, nothing is rebuilt. Before
any rebuild every compiled module of ours is deleted first, so a module dropped from the list,
or a build that fails half-way, never leaves a stale one shadowing its source.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")
# The library all compiled modules share (setup.py's group_name plus mypyc's suffix); inside a
# package, so that an editable install finds it wherever the process runs.
GROUP = "stanzaguard/native__mypyc"
STAMP = Path(sys.prefix) / ".native-stamp"
MANIFEST = "native-sources.json"


def modules() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        found: list[str] = tomllib.load(file)["tool"]["stanzaguard"]["native"]["modules"]
    return found


def suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def digest(names: list[str], pure: bool) -> str:
    import mypy.version

    h = hashlib.sha256()
    h.update(f"{sys.version}|{mypy.version.__version__}|pure={pure}|{names}".encode())
    for path in [ROOT / "setup.py", *(ROOT / (n.replace(".", "/") + ".py") for n in names)]:
        h.update(path.read_bytes())
    return h.hexdigest()


def compiled_files() -> list[Path]:
    """Every compiled module of ours, the shared library of the group included, and the
    build's records of the sources they came from (setup.py's ``native-sources.json``)."""
    return [
        path
        for package in PACKAGES
        for pattern in (f"*{suffix()}", MANIFEST)
        for path in (ROOT / package).rglob(pattern)
    ]


def expected_files(names: list[str]) -> list[Path]:
    return [ROOT / (n.replace(".", "/") + suffix()) for n in names] + [ROOT / (GROUP + suffix())]


def manifest_files(names: list[str]) -> list[Path]:
    return sorted({(ROOT / n.replace(".", "/")).parent / MANIFEST for n in names})


def main() -> int:
    names = modules()
    pure = os.environ.get("STANZAGUARD_PURE_PYTHON") == "1"
    want = digest(names, pure)
    have = STAMP.read_text() if STAMP.exists() else ""
    built = [*expected_files(names), *manifest_files(names)]
    if have == want and (pure or all(p.exists() for p in built)):
        print(f"native modules up to date ({'pure Python' if pure else f'{len(names)} compiled'})")
        return 0
    STAMP.unlink(missing_ok=True)
    for path in compiled_files():
        path.unlink()
    if not pure:
        print(
            f"compiling {len(names)} modules with mypyc (1.5-5 minutes on 2 cores) ...",
            flush=True,
        )
        env = dict(os.environ, STANZAGUARD_COMPILE="1")
        command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        done = subprocess.run(command, cwd=ROOT, env=env, check=False)
        if done.returncode != 0:
            for path in compiled_files():
                path.unlink()
            print(
                "mypyc build failed (see above); STANZAGUARD_PURE_PYTHON=1 runs pure Python",
                file=sys.stderr,
            )
            return done.returncode
        missing = [str(p) for p in built if not p.exists()]
        if missing:
            print(f"mypyc build did not produce {missing}", file=sys.stderr)
            return 1
    STAMP.write_text(want)
    print(f"native modules built ({'pure Python' if pure else f'{len(names)} compiled'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
