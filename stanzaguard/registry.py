"""Versions of the text model in ``DATA/models/``: the retrained models, which one is active,
and who switched when.

Layout::

    DATA/models/v0001/model.npz, model.json   one directory per version (`stanzaguard retrain`)
    DATA/models/registry.json                  the active version and the activation history
    DATA/models/serving.json                   written by the running service: what it uses
    DATA/models/.lock                          serialises the commands that change the registry

A version directory appears complete or not at all: it is written under a hidden staging name
and renamed into place (``rename`` is atomic, and fails rather than overwrite a version another
command made meanwhile). A version's files are never changed afterwards; each keeps the
cross-validated metrics of its training in its ``model.json``.

``registry.json`` is small, rewritten atomically (temporary file, fsync, rename) under an
exclusive lock, and read by the running service every second (`stanzaguard.model_runtime`):
``{"format": "stanzaguard-model-registry", "version": 1, "active": "v0003" | null,
"history": [{"at", "actor", "action", "version", "previous"}, ...]}``. ``active: null`` means
"the model the settings name" (``model = "default"``, a path). Rolling back returns to the
version that was active before the current one was activated, and again from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from classifier.clock import Clock
from classifier.model import TextModel
from stanzaguard.errors import StanzaGuardError
from stanzaguard.models import ModelFileError, load_model, read_metadata, save_model

REGISTRY_FORMAT = "stanzaguard-model-registry"
REGISTRY_VERSION = 1
#: The registry file is a pointer and a short history; anything larger is not ours.
MAX_REGISTRY_BYTES = 1 << 20
#: Oldest activations are dropped beyond this many (rollback never reaches that far back).
MAX_HISTORY = 1000
MAX_ACTOR_CHARS = 200
#: What `activate` accepts to go back to the model the settings name.
CONFIGURED = "configured"

_VERSION = re.compile(r"v[0-9]{4,9}")


class RegistryError(StanzaGuardError):
    """The registry or a version is missing, malformed, or the change is not possible."""


class ActivationKind(StrEnum):
    ACTIVATE = "activate"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class Activation:
    """One change of the active version (``None``: the configured model)."""

    at: datetime
    actor: str
    action: ActivationKind
    version: str | None
    previous: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action.value,
            "version": self.version,
            "previous": self.previous,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> Activation:
        if not isinstance(data, dict):
            raise RegistryError(f"{where}: must be an object")
        unknown = set(data) - {"at", "actor", "action", "version", "previous"}
        if unknown:
            raise RegistryError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        try:
            at = datetime.fromisoformat(data["at"])
            action = ActivationKind(data["action"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{where}: 'at' or 'action' missing or invalid ({exc})") from None
        if at.tzinfo is None:
            raise RegistryError(f"{where}: 'at' needs a time zone")
        actor = data.get("actor")
        if not isinstance(actor, str):
            raise RegistryError(f"{where}: 'actor' must be a string")
        return cls(
            at=at,
            actor=actor,
            action=action,
            version=_optional_version(data.get("version"), f"{where}.version"),
            previous=_optional_version(data.get("previous"), f"{where}.previous"),
        )


@dataclass(frozen=True, slots=True)
class RegistryState:
    """What ``registry.json`` says."""

    active: str | None = None
    history: tuple[Activation, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "version": REGISTRY_VERSION,
            "active": self.active,
            "history": [a.to_json() for a in self.history],
        }

    @classmethod
    def from_json(cls, data: object) -> RegistryState:
        if not isinstance(data, dict):
            raise RegistryError("must hold a JSON object")
        if data.get("format") != REGISTRY_FORMAT:
            raise RegistryError(f"'format' must be {REGISTRY_FORMAT!r}")
        if data.get("version") != REGISTRY_VERSION:
            raise RegistryError(
                f"unsupported registry version {data.get('version')!r}; this build reads "
                f"{REGISTRY_VERSION}"
            )
        unknown = set(data) - {"format", "version", "active", "history"}
        if unknown:
            raise RegistryError(f"unknown keys {', '.join(sorted(unknown))}")
        history = data.get("history", [])
        if not isinstance(history, list):
            raise RegistryError("'history' must be a list")
        if len(history) > MAX_HISTORY:
            raise RegistryError(f"'history' holds {len(history)} entries; at most {MAX_HISTORY}")
        return cls(
            active=_optional_version(data.get("active"), "active"),
            history=tuple(
                Activation.from_json(item, f"history[{i}]") for i, item in enumerate(history)
            ),
        )

    def rollback_target(self) -> str | None:
        """The version active before the current one was activated (None: configured).

        Raises:
            RegistryError: if the configured model is in use or nothing says what came before.
        """
        for entry in reversed(self.history):
            if (
                entry.action is ActivationKind.ACTIVATE
                and entry.version == self.active
                and entry.previous != entry.version  # re-activating changed nothing
            ):
                return entry.previous
        if self.active is None:
            raise RegistryError(
                "nothing to roll back: no version is active (the configured model is in use)"
            )
        raise RegistryError(
            f"the history does not say what was active before {self.active}; "
            "activate a version by name instead"
        )


def _optional_version(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise RegistryError(f"{where}: not a version name (v0001, v0002, ...): {_preview(value)}")
    return value


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_version(name: str) -> str:
    """``name`` if it is a version name (``v`` and 4-9 digits), else `RegistryError`."""
    if not _VERSION.fullmatch(name):
        raise RegistryError(f"not a version name (v0001, v0002, ...): {_preview(name)}")
    return name


def check_actor(actor: str) -> str:
    actor = actor.strip()
    if not actor:
        raise RegistryError("--actor: say who you are (it goes into the activation history)")
    if len(actor) > MAX_ACTOR_CHARS or any(ord(ch) < 32 or ord(ch) == 127 for ch in actor):
        raise RegistryError(f"--actor: at most {MAX_ACTOR_CHARS} printable characters")
    return actor


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version directory as listed: its metadata, or why it cannot be read."""

    version: str
    path: Path
    metadata: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """One line of ``stanzaguard model list``."""

    version: str
    created: str | None
    active: bool
    serving: bool
    base_rows: int | None
    examples: int | None
    #: The cross-validated confusion matrix and rates at the block threshold (None: none).
    block: dict[str, float] | None
    error: str | None

    @classmethod
    def of(cls, info: VersionInfo, active: str | None, serving: str | None) -> VersionSummary:
        meta = info.metadata or {}
        metrics = meta.get("metrics")
        block = metrics.get("block") if isinstance(metrics, dict) else None
        training = meta.get("training")
        training = training if isinstance(training, dict) else {}
        created = meta.get("created")
        return cls(
            version=info.version,
            created=created if isinstance(created, str) else None,
            active=info.version == active,
            serving=info.version == serving,
            base_rows=_count(training.get("data"), "rows"),
            examples=_count(training.get("examples"), "used"),
            block=(
                {k: float(v) for k, v in block.items() if isinstance(v, int | float)}
                if isinstance(block, dict)
                else None
            ),
            error=info.error,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created,
            "active": self.active,
            "serving": self.serving,
            "base_rows": self.base_rows,
            "examples": self.examples,
            "block": self.block,
            "error": self.error,
        }


def _count(table: object, key: str) -> int | None:
    value = table.get(key) if isinstance(table, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Serving:
    """What the running service last reported in ``serving.json``.

    Attributes:
        version: The registry version in use (None: the configured model, or none).
        label: The name verdicts carry (``default``, a path, a version).
        since: When it was swapped in.
        error: The last version that failed to load, and why (None: no failure since).
    """

    version: str | None
    label: str | None
    since: datetime
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "label": self.label,
            "since": self.since.isoformat(),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: object) -> Serving:
        if not isinstance(data, dict):
            raise RegistryError("serving.json must hold a JSON object")
        try:
            since = datetime.fromisoformat(data["since"])
        except (KeyError, TypeError, ValueError):
            raise RegistryError("serving.json: 'since' missing or invalid") from None
        label = data.get("label")
        error = data.get("error")
        if error is not None and not (
            isinstance(error, dict) and all(isinstance(v, str) for v in error.values())
        ):
            raise RegistryError("serving.json: 'error' must be an object of strings")
        return cls(
            version=_optional_version(data.get("version"), "serving.version"),
            label=label if isinstance(label, str) else None,
            since=since,
            error=error,
        )


class ModelRegistry:
    """The model versions of one data directory."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.clock = clock

    @classmethod
    def of(cls, data_dir: Path, clock: Clock) -> ModelRegistry:
        return cls(data_dir / "models", clock)

    @property
    def registry_file(self) -> Path:
        return self.root / "registry.json"

    @property
    def serving_file(self) -> Path:
        return self.root / "serving.json"

    def version_dir(self, version: str) -> Path:
        return self.root / check_version(version)

    # -- reading --

    def read_state(self) -> RegistryState:
        """The registry; an empty one if the file does not exist yet.

        Raises:
            RegistryError: naming the file and the problem.
        """
        try:
            with self.registry_file.open("rb") as handle:
                data = handle.read(MAX_REGISTRY_BYTES + 1)
        except FileNotFoundError:
            return RegistryState()
        except OSError as exc:
            raise RegistryError(f"{self.registry_file}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_REGISTRY_BYTES:
            raise RegistryError(
                f"{self.registry_file}: larger than {MAX_REGISTRY_BYTES:,} bytes; not a registry"
            )
        try:
            return RegistryState.from_json(_parse_json(data))
        except RegistryError as exc:
            raise RegistryError(f"{self.registry_file}: {exc}") from None

    def versions(self) -> list[VersionInfo]:
        """Every version directory, oldest first, with its metadata (or its problem)."""
        try:
            names = sorted(
                (n for n in os.listdir(self.root) if _VERSION.fullmatch(n)),
                key=lambda n: int(n[1:]),
            )
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            path = self.root / name
            try:
                out.append(VersionInfo(name, path, read_metadata(path)))
            except ModelFileError as exc:
                out.append(VersionInfo(name, path, None, str(exc)))
        return out

    def load(self, version: str) -> TextModel:
        """The model of ``version``.

        Raises:
            RegistryError: if there is no such version.
            ModelFileError: if its files are missing, damaged or not a model.
        """
        path = self.version_dir(version)
        if not path.is_dir():
            raise RegistryError(f"no model version {version} in {self.root}")
        return load_model(path)

    def read_serving(self) -> Serving | None:
        try:
            data = self.serving_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"{self.serving_file}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_REGISTRY_BYTES:
            raise RegistryError(f"{self.serving_file}: too large")
        return Serving.from_json(_parse_json(data))

    def wait_serving(
        self, version: str | None, after: datetime, timeout: float, interval: float = 0.2
    ) -> Serving | None:
        """The running service's report once it uses ``version`` (None: the configured model),
        or once it failed to load it after ``after``; None if neither within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                serving = self.read_serving()
            except RegistryError:
                serving = None  # being rewritten, or damaged: the service rewrites it
            if serving is not None:
                if serving.version == version:
                    return serving
                failed = serving.error or {}
                if failed.get("version") == (version or "") and _at_or_after(
                    failed.get("at"), after
                ):
                    return serving
            if time.monotonic() >= deadline:
                return None
            time.sleep(interval)

    # -- changing --

    def add_version(self, model: TextModel) -> str:
        """Store ``model`` as the next version (not activated); return its name."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{secrets.token_hex(6)}"
        try:
            save_model(model, staging)
            _fsync_dir(staging)
            while True:
                version = self._next_name()
                try:
                    # rename() of a directory onto an existing non-empty one fails: two
                    # concurrent retrains cannot take the same name.
                    staging.rename(self.root / version)
                except OSError:
                    if (self.root / version).exists():
                        continue
                    raise
                _fsync_dir(self.root)
                return version
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _next_name(self) -> str:
        numbers = [int(n[1:]) for n in os.listdir(self.root) if _VERSION.fullmatch(n)]
        return f"v{max(numbers, default=0) + 1:04d}"

    def activate(self, version: str, actor: str) -> Activation:
        """Make ``version`` (or `CONFIGURED`) the active model; the history records it.

        The version must load, so a damaged one is refused here rather than by the service.

        Raises:
            RegistryError, ModelFileError: what is wrong, and nothing changed.
        """
        actor = check_actor(actor)
        target = None if version == CONFIGURED else check_version(version)
        if target is not None:
            self.load(target)
        with self._locked():
            state = self.read_state()
            entry = Activation(
                self.clock.now(), actor, ActivationKind.ACTIVATE, target, state.active
            )
            self._write_state(RegistryState(target, (*state.history, entry)))
        return entry

    def rollback(self, actor: str) -> Activation:
        """Go back to the version active before the current one (see `rollback_target`)."""
        actor = check_actor(actor)
        with self._locked():
            state = self.read_state()
            target = state.rollback_target()
            if target is not None:
                self.load(target)
            entry = Activation(
                self.clock.now(), actor, ActivationKind.ROLLBACK, target, state.active
            )
            self._write_state(RegistryState(target, (*state.history, entry)))
        return entry

    def write_serving(self, serving: Serving) -> None:
        _write_atomic(self.serving_file, _dump(serving.to_json()))

    def _write_state(self, state: RegistryState) -> None:
        history = state.history[-MAX_HISTORY:]
        _write_atomic(self.registry_file, _dump(RegistryState(state.active, history).to_json()))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _at_or_after(stamp: str | None, after: datetime) -> bool:
    try:
        return stamp is not None and datetime.fromisoformat(stamp) >= after
    except (TypeError, ValueError):
        return False


def _parse_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RegistryError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise RegistryError("JSON nested too deeply") from None


def _dump(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
