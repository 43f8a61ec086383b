"""The text model in the running service: which one, and swapping a new version in live.

Which model scores stanzas:

1. ``model = "off"`` (settings): none; the policy's ``text-model`` rule does not exist.
2. Otherwise the version the registry names active (`stanzaguard model activate`), if any;
3. else the configured model: the one shipped in the package (``model = "default"``) or the
   model directory the setting names.

The service reads ``DATA/models/registry.json`` every second (`ModelWatcher`). When the
active version changes it loads the new model in a worker thread (the event loop keeps
serving) and hands it to the policy holder: the next stanza is scored by the new model, one
already being judged finishes with the old one. A registry or model that cannot be read is
logged as an error, recorded in ``DATA/models/serving.json``, and the model in force stays:
a broken file never leaves the service without a model or with half of one. Each verdict's
``text-model`` reason names the model it came from (``(model v0003)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from classifier.clock import Clock
from classifier.model import TextModel
from classifier.policy import PolicyHolder
from stanzaguard.errors import SettingsError, StanzaGuardError
from stanzaguard.models import ModelFileError, load_default_model, load_model
from stanzaguard.registry import ModelRegistry, RegistryError, Serving

log = logging.getLogger(__name__)

MODEL_OFF = "off"
MODEL_DEFAULT = "default"


class ScoredModel:
    """A `TextModel` that names its version in verdicts (``classifier.scoring`` reads
    ``model_version``); called like the model itself."""

    __slots__ = ("_score", "model", "model_version")

    def __init__(self, model: TextModel, version: str) -> None:
        self.model = model
        self.model_version = version
        self._score = model.score

    def __call__(self, text: str) -> float:
        return self._score(text)


def configured_model(choice: str) -> ScoredModel | None:
    """The model the ``model`` setting names: None for ``off``.

    Raises:
        SettingsError: if the named model cannot be loaded (start-up stops).
    """
    if choice == MODEL_OFF:
        return None
    try:
        if choice == MODEL_DEFAULT:
            return ScoredModel(load_default_model(), MODEL_DEFAULT)
        return ScoredModel(load_model(Path(choice)), choice)
    except ModelFileError as exc:
        raise SettingsError(f"model: {exc}") from None


@dataclass(frozen=True, slots=True)
class Choice:
    """The model in force: where it came from and the registry version (if any)."""

    model: ScoredModel | None
    version: str | None
    source: Literal["registry", "configured"]


class ModelWatcher:
    """Polls the registry's active pointer and swaps the policy holder's model."""

    def __init__(
        self,
        registry: ModelRegistry,
        configured: ScoredModel | None,
        clock: Clock,
        *,
        interval: float = 1.0,
    ) -> None:
        self.registry = registry
        self.configured = configured
        self.clock = clock
        self.interval = interval
        self.holder: PolicyHolder | None = None
        self.current = Choice(configured, None, "configured")
        self.swaps = 0
        self.errors = 0
        self._stamp: tuple[int, int, int] | None = None
        self._error: dict[str, str] | None = None
        self._since = clock.now()
        self._task: asyncio.Task[None] | None = None

    # -- start-up --

    def initial(self) -> ScoredModel | None:
        """The model to start with: the registry's active version, else the configured one.

        A registry or active version that cannot be loaded is logged and the configured
        model is used (a broken retrained model must not keep the service from starting).
        """
        self._stamp = self._current_stamp()
        self._since = self.clock.now()
        active = None
        try:
            active = self.registry.read_state().active
            if active is not None:
                self.current = Choice(self._load(active), active, "registry")
        except (RegistryError, ModelFileError) as exc:
            self._failed(active, exc, " at start-up; the configured model is used")
        self._report()
        return self.current.model

    def attach(self, holder: PolicyHolder) -> None:
        self.holder = holder

    # -- live --

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.registry.registry_file.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    async def check(self) -> bool:
        """Swap if the registry names another model now; return whether one was swapped in."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            active = self.registry.read_state().active
        except RegistryError as exc:
            self._failed(None, exc, "; the model in force stays")
            self._report()
            return False
        if active == self.current.version:
            if self._error is not None:  # repaired: nothing is wrong any more
                self._error = None
                self._report()
            return False
        if active is None:
            choice = Choice(self.configured, None, "configured")
        else:
            try:
                model = await asyncio.to_thread(self._load, active)
            except (RegistryError, ModelFileError) as exc:
                self._failed(active, exc, "; the model in force stays")
                self._report()
                return False
            choice = Choice(model, active, "registry")
        self._swap(choice)
        return True

    def _load(self, version: str) -> ScoredModel:
        return ScoredModel(self.registry.load(version), version)

    def _swap(self, choice: Choice) -> None:
        previous = self.current
        if self.holder is not None:
            self.holder.replace_model(choice.model)
        self.current = choice
        self.swaps += 1
        self._since = self.clock.now()
        self._error = None
        log.info(
            "text model swapped",
            extra={
                "model": _label(choice.model),
                "version": choice.version,
                "source": choice.source,
                "previous": _label(previous.model),
            },
        )
        self._report()

    def _failed(self, version: str | None, exc: StanzaGuardError, consequence: str) -> None:
        self.errors += 1
        what = f"model version {version}" if version is not None else "the model registry"
        log.error(
            "%s could not be loaded%s: %s",
            what,
            consequence,
            exc,
            extra={"error": str(exc), "model": _label(self.current.model)},
        )
        self._error = {
            "version": version or "",
            "message": str(exc),
            "at": self.clock.now().isoformat(),
        }

    def _report(self) -> None:
        """Tell the commands what is in force (``serving.json``); best effort."""
        serving = Serving(
            version=self.current.version,
            label=_label(self.current.model),
            since=self._since,
            error=self._error,
        )
        try:
            self.registry.write_serving(serving)
        except OSError as exc:
            log.warning("could not write %s: %s", self.registry.serving_file, exc.strerror)

    # -- lifecycle --

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model registry check failed; the model in force stays")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _label(model: ScoredModel | None) -> str | None:
    return None if model is None else model.model_version
