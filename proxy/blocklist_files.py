"""Block-list files: read at start, re-read when they change, fed to the live `BlockList`.

Each file is named ``FORMAT:PATH`` in the settings (``jabberspam:/etc/stanzaguard/blacklist.txt``,
``jid_sha256:/etc/stanzaguard/hashes.txt``); its entries are the `BlockList` source ``PATH``
(as written in the settings), so a policy's ``source_actions`` can name it. Formats are those
of `classifier.blocklists.parse_blocklist_text`: ``domains``, ``jids``, ``jid_sha256``,
``url_hosts`` (one entry a line, ``#`` comments) and ``jabberspam`` (JabberSPAM's
``blacklist.txt``).

A file is parsed strictly: one bad line refuses the whole new version and the previous
entries stay in force (a half-written download or an HTML error page never empties a list).
A file that disappears keeps its last entries in force too, with an error logged; to drop a
list, remove it from the settings or empty it. At start every file must be readable and valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from classifier.blocklists import (
    JABBERSPAM,
    MAX_LIST_TEXT,
    MAX_SOURCE_NAME,
    BlockList,
    ListKind,
    parse_blocklist_text,
)
from classifier.errors import RuleError

log = logging.getLogger(__name__)

FORMATS = (*(k.value for k in ListKind), JABBERSPAM)


class BlocklistFileError(Exception):
    """A list file is misnamed, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class ListFile:
    """One configured list file: its format and path."""

    format: str
    path: Path

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def kind(self) -> ListKind:
        return ListKind.DOMAINS if self.format == JABBERSPAM else ListKind(self.format)


def parse_list_file_spec(spec: str) -> ListFile:
    """Parse ``FORMAT:PATH``.

    Raises:
        BlocklistFileError: naming the problem.
    """
    fmt, colon, path = spec.partition(":")
    fmt = fmt.strip()
    if not colon or not path.strip():
        raise BlocklistFileError(
            f"{spec!r}: expected FORMAT:PATH, e.g. jabberspam:/etc/stanzaguard/blacklist.txt"
        )
    if fmt not in FORMATS:
        raise BlocklistFileError(f"{spec!r}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    result = ListFile(fmt, Path(path.strip()))
    if len(result.source) > MAX_SOURCE_NAME:
        raise BlocklistFileError(f"{spec!r}: the path is longer than {MAX_SOURCE_NAME} characters")
    return result


def parse_list_file_specs(specs: Iterable[str]) -> tuple[ListFile, ...]:
    """Parse every spec; the same path twice with the same kind is refused."""
    files: dict[tuple[str, ListKind], ListFile] = {}
    for spec in specs:
        parsed = parse_list_file_spec(spec)
        key = (parsed.source, parsed.kind)
        if key in files:
            raise BlocklistFileError(f"{spec!r}: listed twice")
        files[key] = parsed
    return tuple(files.values())


Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_list_file(file: ListFile) -> tuple[str, ...]:
    """Read and strictly parse one file; return its entries.

    Raises:
        BlocklistFileError: if it cannot be read, is too large, not UTF-8, or has a bad line.
    """
    try:
        with file.path.open("rb") as handle:
            raw = handle.read(MAX_LIST_TEXT + 1)
    except OSError as exc:
        raise BlocklistFileError(f"{file.path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_LIST_TEXT:
        raise BlocklistFileError(f"{file.path}: larger than {MAX_LIST_TEXT} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BlocklistFileError(f"{file.path}: not UTF-8 ({exc.reason})") from None
    try:
        return parse_blocklist_text(text, file.format, strict=True).entries
    except RuleError as exc:
        raise BlocklistFileError(f"{file.path}: {exc}") from None


class BlocklistFileWatcher:
    """Keeps the entries of list files in a `BlockList`, polling their metadata for changes."""

    def __init__(
        self, files: Iterable[ListFile], blocklist: BlockList, *, interval: float = 1.0
    ) -> None:
        self.files = tuple(files)
        self.blocklist = blocklist
        self.interval = interval
        self._stamps: dict[ListFile, Stamp | None] = {}
        self._missing: set[ListFile] = set()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.errors = 0

    def load_all(self) -> None:
        """Load every file now; any unreadable or invalid one fails.

        Raises:
            BlocklistFileError: naming the first bad file.
        """
        for file in self.files:
            stamp = _stamp(file.path)
            entries = read_list_file(file)
            self.blocklist.replace(file.kind, entries, source=file.source)
            self._stamps[file] = stamp
            log.info("block-list file loaded", extra={"path": file.source, "entries": len(entries)})

    def check(self) -> int:
        """Reload the files that changed; return how many were reloaded."""
        reloaded = 0
        for file in self.files:
            stamp = _stamp(file.path)
            if stamp is None:
                if file not in self._missing:
                    self._missing.add(file)
                    self.errors += 1
                    log.error(
                        "block-list file missing; its last entries stay in force",
                        extra={"path": file.source},
                    )
                continue
            self._missing.discard(file)
            if stamp == self._stamps.get(file):
                continue
            self._stamps[file] = stamp
            try:
                entries = read_list_file(file)
            except BlocklistFileError as exc:
                self.errors += 1
                log.error(
                    "block-list file rejected; its previous entries stay in force",
                    extra={"path": file.source, "error": str(exc)},
                )
                continue
            self.blocklist.replace(file.kind, entries, source=file.source)
            self.reloads += 1
            reloaded += 1
            log.info(
                "block-list file reloaded", extra={"path": file.source, "entries": len(entries)}
            )
        return reloaded

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="blocklist-files")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                # Large lists take a while to parse: keep it off the event loop.
                await asyncio.to_thread(self.check)
            except Exception:
                log.exception("block-list file check failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
