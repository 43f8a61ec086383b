"""A compiled wheel, built and installed as docs/native.md says, runs its compiled modules and
knows them current; an edit to an installed source afterwards is reported.

One small module is compiled (STANZAGUARD_NATIVE_MODULES), so the build takes seconds rather
than the minutes of the whole list; the packaging path is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")
MODULE = "classifier.verdict"
# What setup.py and pyproject.toml read; mypyc comes with mypy, a dev dependency.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md")

PROBE = """
import importlib, json, sys
from stanzaguard.native import native_status
module = importlib.import_module(sys.argv[1])
status = native_status([sys.argv[1]])
print(json.dumps({
    "compiled": list(status.compiled),
    "stale": list(status.stale),
    "package_dir": list(sys.modules[sys.argv[1].rpartition(".")[0]].__path__),
    "native_module": type(module.__loader__).__name__,
}))
"""


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{command[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done


def probe(site: Path, cwd: Path) -> dict[str, list[str] | str]:
    done = run([sys.executable, "-c", PROBE, MODULE], cwd, PYTHONPATH=str(site))
    result: dict[str, list[str] | str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a compiled wheel from a copy of the tree, installed into a
    directory of its own (as ``pip install`` writes site-packages)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "native-sources.json")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(source)],
        work,
        STANZAGUARD_COMPILE="1",
        STANZAGUARD_NATIVE_MODULES=MODULE,
    )
    (wheel,) = dist.glob("*.whl")
    site = work / "site"
    run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], work)
    return site


def test_the_installed_wheel_runs_the_module_compiled_and_current(installed: Path) -> None:
    found = probe(installed, installed.parent)
    assert found["package_dir"] == [str(installed / "classifier")]
    assert found["native_module"] == "ExtensionFileLoader"
    assert (found["compiled"], found["stale"]) == ([MODULE], [])
    recorded = json.loads((installed / "classifier" / "native-sources.json").read_text())
    assert set(recorded) == {"verdict"}


def test_an_installed_source_edited_afterwards_is_stale(installed: Path) -> None:
    source = installed / "classifier" / "verdict.py"
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# edited after the install\n")
        found = probe(installed, installed.parent)
        assert (found["compiled"], found["stale"]) == ([MODULE], [MODULE])
    finally:
        source.write_bytes(original)
