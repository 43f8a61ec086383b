"""Indexing in a worker process, so the proxy's event loop never shares the GIL with it.

The proxy's process keeps the spool (writing, the cursor, sealing); a child process
(`python -m stanzaguard.index_worker`) follows the spool files read-only (`SpoolTail`) and
applies them to the store. They talk over the child's stdin and stdout, one line a message:

    parent -> child   H <seq>            the spool is durable through seq
                      D <token> <seq>    answer once everything through seq is indexed
                      Q                  finish the batch under way, then exit
    child -> parent   A <seq>            the store has every entry through seq
                      D <token> <seq>    the drain `token` is done (store through seq)
                      F <text>           indexing failed (it retries with backoff)

The store is named by a spec (`--store sqlite:PATH`, or `--store es:URL --es-prefix P`
with credentials in `STANZAGUARD_ES_*` variables the parent sets; a bare path is SQLite).
`--chain` names the spool's hash chain in the store (the parent passes its spool's; it must
match the name the spool directory records).
The child exits when its stdin closes (the proxy stopped, or was killed), after indexing what
it was told of; on `Q` it exits after the batch under way. The store applies
entries idempotently, so a child that dies mid-batch and its successor do no harm; the
spool cursor moves only on the child's `A` and only the proxy's process moves it.

CPU priority (`--priority`): `idle` runs the child under Linux's SCHED_IDLE policy, so it
takes only CPU time nothing else wants. Indexing is deferrable (the spool holds every record
durably) but the proxy's stanzas are not: a batch indexed while a stanza waits for a core is
that stanza's latency. `low` is nice 5, sharing the CPU at a lower weight. The supervisor
starts an `idle` child and, if the unindexed backlog passes `boost_backlog` entries (CPU so
busy that idle time never comes), replaces it with a `low` one until the backlog is down to
a tenth of that, so starved indexing cannot run the spool into its size limit.

Batching (`notify_interval`, the `index_worker_batch_interval` setting): the child hears of
new entries at most once per interval and indexes all of them in one transaction. A SQLite
commit writes every page it changed (the newest leaf of each index, the full-text segments)
to the WAL, so a hundred small commits write several times the pages of one large commit,
and the checkpoints of those pages share the disk with the spool's `fsync`. A backlog is
indexed at once, `batch_size` entries a commit; `drain()` does not wait for the interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from archive_api.store.base import ArchiveStore
from proxy.errors import SpoolCorrupt
from proxy.spool import LEGACY_CHAIN_NAME, Spool, SpoolTail, read_chain_name, read_checkpoints
from stanzaguard.errors import StanzaGuardError
from stanzaguard.stores import (
    EsCredentials,
    SqliteSpec,
    StoreSpec,
    open_store_spec,
    parse_store_spec,
    worker_arguments,
    worker_environment,
)

log = logging.getLogger(__name__)

MAX_LINE = 200


# --- the child ----------------------------------------------------------------------------


class _Worker:
    def __init__(
        self,
        store: ArchiveStore,
        tail: SpoolTail,
        spool_dir: Path,
        batch_size: int,
        send: Callable[[str], None],
        chain: str = LEGACY_CHAIN_NAME,
    ) -> None:
        self.chain = chain
        self.store = store
        self.tail = tail
        self.spool_dir = spool_dir
        self.batch_size = batch_size
        self.send = send
        self.through = 0
        self.applied = 0
        self.drains: list[tuple[str, int]] = []
        self.wake = asyncio.Event()
        self.closing = False  # stdin closed: index what was announced, then stop
        self.quitting = False  # `Q`: stop after the batch under way

    def command(self, line: str) -> None:
        parts = line.split()
        if parts == ["Q"]:
            self.quitting = True
        elif len(parts) == 2 and parts[0] == "H" and parts[1].isdigit():
            self.through = max(self.through, int(parts[1]))
        elif len(parts) == 3 and parts[0] == "D" and parts[2].isdigit():
            self.through = max(self.through, int(parts[2]))
            self.drains.append((parts[1], int(parts[2])))
        else:
            log.error("index worker: unknown command %r", line[:MAX_LINE])
            return
        self.wake.set()

    async def run(self) -> None:
        self.applied = await self.store.last_seq(chain=self.chain)
        backoff = 0.2
        while not self.quitting:
            try:
                moved = await self._step()
                backoff = 0.2
            except Exception as exc:  # the store or spool failed: keep everything, retry
                log.exception("index worker: indexing failed; retrying")
                self.send(f"F {str(exc)[:MAX_LINE].replace(chr(10), ' ')}")
                moved = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if moved:
                continue
            if self.closing:
                return
            self.wake.clear()
            if self.applied < self.through:
                continue
            await self.wake.wait()

    async def _step(self) -> bool:
        if self.applied >= self.through:
            await self._answer_drains()
            return False
        links = self.tail.read(self.applied + 1, self.batch_size, self.through)
        await self.store.apply(links, chain=self.chain)
        self.applied = links[-1].seq
        self.send(f"A {self.applied}")
        if self.applied >= self.through:
            await self._answer_drains()
        return True

    async def _answer_drains(self) -> None:
        if not self.drains:
            return
        await self._copy_checkpoints()
        ready = [(t, s) for t, s in self.drains if s <= self.applied]
        self.drains = [(t, s) for t, s in self.drains if s > self.applied]
        for token, _ in ready:
            self.send(f"D {token} {self.applied}")

    async def _copy_checkpoints(self) -> None:
        known = {(c.chain_name, c.seq) for c in await self.store.checkpoints()}
        for checkpoint in read_checkpoints(self.spool_dir):
            if (checkpoint.chain_name, checkpoint.seq) not in known:
                await self.store.add_checkpoint(checkpoint)


Priority = Literal["idle", "low"]
PRIORITIES: tuple[Priority, ...] = ("idle", "low")
IDLE_FALLBACK_NICE = 19  # where SCHED_IDLE does not exist (not Linux)


def set_priority(priority: str, nice: int) -> None:
    """Put this process in the background: SCHED_IDLE (`idle`) or `nice` (`low`).

    Called before any thread starts, so every thread of the worker inherits it.
    """
    # Background work: under load the proxy's own process goes first.
    with contextlib.suppress(OSError):
        if priority == "idle":
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.nice(IDLE_FALLBACK_NICE)
        elif nice:
            os.nice(nice)


def child_store_spec(store: str, es_prefix: str | None) -> StoreSpec:
    """The worker's `--store` (and `--es-prefix`); a value without a scheme is a SQLite path."""
    scheme = store.partition(":")[0]
    if scheme not in ("sqlite", "es"):
        return SqliteSpec(Path(store))
    return parse_store_spec(
        store,
        es_index_prefix=es_prefix or "stanzaguard",
        credentials=EsCredentials.from_environment(os.environ),
    )


async def _child_main(spec: StoreSpec, spool_dir: Path, batch_size: int, chain: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4096)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def send(line: str) -> None:
        out.write(line.encode() + b"\n")
        out.flush()

    store = await open_store_spec(spec)
    worker = _Worker(store, SpoolTail(spool_dir), spool_dir, batch_size, send, chain)
    task = asyncio.create_task(worker.run())

    async def follow_commands() -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("index worker: over-long command line; stopping")
                break
            if not line:
                break
            worker.command(line.decode("ascii", "replace").strip())
        worker.closing = True
        worker.wake.set()

    commands = asyncio.create_task(follow_commands())
    try:
        # The worker ends on `Q` with stdin still open, or after stdin closed.
        await asyncio.wait((task, commands), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await task
        task.result()
    finally:
        for running in (task, commands):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stanzaguard.index_worker")
    parser.add_argument("--store", required=True, help="sqlite:PATH, es:URL, or a SQLite path")
    parser.add_argument("--es-prefix", default=None, help="index prefix with --store es:URL")
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument(
        "--chain", default=LEGACY_CHAIN_NAME, help="the spool's hash chain name in the store"
    )
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--nice", type=int, default=5, help="niceness with --priority low")
    parser.add_argument("--priority", choices=PRIORITIES, default="low")
    args = parser.parse_args(argv)
    set_priority(args.priority, args.nice)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="index-worker %(levelname)s %(message)s"
    )
    try:
        spec = child_store_spec(args.store, args.es_prefix)
    except StanzaGuardError as exc:
        parser.error(str(exc))
    recorded = read_chain_name(args.spool)
    if recorded is not None and recorded != args.chain:
        # Applying one chain's entries under another name would corrupt the store's chains.
        parser.error(f"the spool {args.spool} holds chain {recorded!r}, not {args.chain[:80]!r}")
    asyncio.run(_child_main(spec, args.spool, args.batch_size, args.chain))
    return 0


# --- the proxy's side ---------------------------------------------------------------------


class IndexWorker:
    """Runs and supervises the index worker; the proxy's `notify`/`drain` go through it.

    Same face as `proxy.indexer.Indexer`: `notify()` after spooling (never waits),
    `drain()` until the store has everything spooled so far, `start()`, `stop()`.
    """

    def __init__(
        self,
        spool: Spool,
        store_path: Path | StoreSpec,
        *,
        batch_size: int = 5000,
        cursor_interval: float = 0.5,
        seal: bool = True,
        stop_timeout: float = 30.0,
        notify_interval: float = 1.0,
        follow_interval: float = 1.0,
        priority: Priority = "low",
        boost_backlog: int = 200_000,
        python: str = sys.executable,
    ) -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"index worker priority must be one of {PRIORITIES}")
        if boost_backlog < 1:
            raise ValueError("boost_backlog must be at least 1")
        self.priority = priority
        self.boost_backlog = boost_backlog
        self.boosted = False  # an idle worker replaced by a low one to catch up
        self.priority_changes = 0
        self._replacing = False  # the running child was asked to quit for a replacement
        self.notify_interval = notify_interval
        self.follow_interval = follow_interval
        self.stop_timeout = stop_timeout
        self.spool = spool
        # A bare path is the SQLite store (how the worker was first configured).
        self.store: StoreSpec = (
            SqliteSpec(store_path) if isinstance(store_path, Path) else store_path
        )
        self.batch_size = batch_size
        self.cursor_interval = cursor_interval
        self.seal = seal
        self.python = python
        self.indexed = 0
        self.batches = 0  # the child's commits that moved the store forward
        self.failures = 0
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._sent = 0
        self._applied = 0
        self._drains: dict[str, asyncio.Future[int]] = {}
        self._next_token = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._cursor_task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._cursor_dirty = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False
        self._notify_timer: asyncio.TimerHandle | None = None  # a tell is scheduled

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise())
        self._cursor_task = asyncio.create_task(self._cursor_loop())
        self._follow_task = asyncio.create_task(self._follow_loop())

    async def stop(self) -> None:
        """Index what is spooled, then let the worker exit (kill it after `stop_timeout`)."""
        timeout = self.stop_timeout
        if self._stopping:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), timeout)
        self._stopping = True
        if self._notify_timer is not None:
            self._notify_timer.cancel()  # the drain above told the worker everything
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in (self._supervisor, self._cursor_task, self._follow_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._supervisor = self._cursor_task = self._follow_task = None
        await self._move_cursor()
        for future in self._drains.values():
            if not future.done():
                future.set_exception(RuntimeError("the index worker stopped"))
        self._drains.clear()

    # -- the proxy's calls -----------------------------------------------------------------

    def notify(self) -> None:
        # At most once per `notify_interval`, however many batches were spooled: a pipe
        # write per stanza would cost the proxy more than the indexing lag is worth, and a
        # commit per interval writes far fewer archive pages than one per few stanzas.
        if self._notify_timer is None:
            self._notify_timer = asyncio.get_running_loop().call_later(
                self.notify_interval, self._tell_head
            )

    def _tell_head(self) -> None:
        self._notify_timer = None
        head = self.spool.head()[0]
        if head > self._sent and self._send(f"H {head}"):
            self._sent = head

    async def drain(self) -> None:
        if self._stopping:
            return
        await self.spool.flush()
        self._next_token += 1
        token = str(self._next_token)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._drains[token] = future
        head = self.spool.head()[0]
        if self._ready.is_set():
            self._send(f"D {token} {head}")
        try:
            await future
        finally:
            self._drains.pop(token, None)
        await self._move_cursor()

    # -- internals ------------------------------------------------------------------------

    def _send(self, line: str) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        proc.stdin.write(line.encode() + b"\n")
        return True

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            store_args, store_env = worker_arguments(self.store)
            self._proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "stanzaguard.index_worker",
                *store_args,
                "--spool",
                str(self.spool.directory),
                # One word, so a name starting with '-' is not taken for an option.
                f"--chain={self.spool.chain_name}",
                "--batch-size",
                str(self.batch_size),
                "--log-level",
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                "--priority",
                self.running_priority(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=worker_environment(store_env),
            )
            self._sent = 0
            self._ready.set()
            self._tell_head()
            head = self.spool.head()[0]
            for token in self._drains:  # drains asked while no worker ran
                self._send(f"D {token} {head}")
            assert self._proc.stdout is not None
            await self._read(self._proc.stdout)
            code = await self._proc.wait()
            self._ready.clear()
            if self._stopping:
                return
            replacing, self._replacing = self._replacing, False
            if replacing and code == 0:
                continue  # asked to quit for a successor at another priority
            self.failures += 1
            self.restarts += 1
            log.error("index worker exited (status %s); restarting in %.1f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("index worker sent an over-long line")
                return
            if not line:
                return
            self._answer(line.decode("utf-8", "replace").strip())

    def _answer(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "A" and rest.isdigit():
            seq = int(rest)
            if seq > self._applied:
                self.batches += 1
                self.indexed += seq - max(self._applied, self.spool.cursor())
                self._applied = seq
                self._cursor_dirty.set()
        elif kind == "D":
            token, _, through = rest.partition(" ")
            future = self._drains.get(token)
            if through.isdigit():
                self._applied = max(self._applied, int(through))
            if future is not None and not future.done():
                future.set_result(self._applied)
        elif kind == "F":
            self.failures += 1
            log.error("index worker: %s", rest[:MAX_LINE])
        else:
            log.error("index worker said %r", line[:MAX_LINE])

    async def _follow_loop(self) -> None:
        # Entries written behind (sightings of records already archived: carbons, MAM
        # replays, reflections) come with no notify(). Looking at the head now and then
        # brings them to the store in a quiet hour too, not only with the next spooled stanza.
        while True:
            await asyncio.sleep(self.follow_interval)
            if self._ready.is_set() and self.spool.head()[0] > self._sent:
                self.notify()  # as a stanza would: the batch interval holds for these too
            self.check_backlog()

    def running_priority(self) -> Priority:
        """The priority a child started now gets."""
        return "low" if self.boosted else self.priority

    def backlog(self) -> int:
        """Spooled entries the store does not have yet."""
        return max(0, self.spool.head()[0] - max(self._applied, self.spool.cursor()))

    def check_backlog(self) -> None:
        """Replace an idle child by a low one when indexing falls behind, and back."""
        if self.priority != "idle" or self._replacing or not self._ready.is_set():
            return
        backlog = self.backlog()
        if not self.boosted and backlog > self.boost_backlog:
            self.boosted = True
            log.warning(
                "indexing is %d entries behind: the index worker now shares the CPU "
                "(priority low) until it catches up",
                backlog,
            )
        elif self.boosted and backlog <= self.boost_backlog // 10:
            self.boosted = False
            log.info("indexing caught up: the index worker uses idle CPU time again")
        else:
            return
        self.priority_changes += 1
        self._replacing = self._send("Q")

    async def _cursor_loop(self) -> None:
        while True:
            await self._cursor_dirty.wait()
            self._cursor_dirty.clear()
            try:
                await self._move_cursor()
            except Exception:
                log.exception("moving the spool cursor failed")
            await asyncio.sleep(self.cursor_interval)

    async def _move_cursor(self) -> None:
        applied = min(self._applied, self.spool.head()[0])
        if applied > self.spool.cursor():
            await self.spool.commit_cursor(applied)
        if self.seal and applied >= self.spool.head()[0]:
            sealed = await self.spool.seal_indexed()
            if sealed:
                log.info("sealed spool segments", extra={"count": len(sealed)})


def run_worker() -> None:
    """`python -m stanzaguard.index_worker`."""
    try:
        sys.exit(main())
    except SpoolCorrupt as exc:
        print(f"index worker: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_worker()
