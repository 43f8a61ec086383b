"""Transport benchmark of the inline c2s proxy: direct to Prosody vs through `stanzaguard run`.

One run starts a throwaway Prosody (benchmark config: no rate limit, Nagle off, no MAM) and
the proxy in its own process with the default pass-through hook, then measures:

  (a) throughput: N one-line chat messages, one sender -> one receiver, STARTTLS on the
      client leg in both cases; delivered msgs/s and CPU time per delivered message of the
      Prosody process, the proxy process and the load client (this process);
  (b) latency at a paced R msgs/s: p50/p99 direct vs proxy, and the p99 the proxy adds;
  (c) memory per idle client connection: C STARTTLS connections through a fresh proxy that
      authenticate and bind and then stay idle; RSS of the proxy and of Prosody before/after
      (and, for comparison, Prosody's RSS for the same number of direct connections);
  (d) optionally (--profile), where the proxy's CPU goes: py-spy samples the proxy under the
      throughput load (a separate, unmeasured round) and the hottest functions are printed.

Everything listens on 127.0.0.1. Every process started is stopped by its PID, also on error.

    .venv/bin/python benchmarks/bench_transport.py                  # full size
    .venv/bin/python benchmarks/bench_transport.py --quick          # a few seconds
    .venv/bin/python benchmarks/bench_transport.py --profile /tmp/sg-profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import xmppload
from benchmarks._services import (
    OtherLoad,
    Prosody,
    Proxy,
    cpu_split,
    main_thread_cpu,
    make_cert,
    native_state,
    rss_kib,
    wait_quiet,
)

DOMAIN = "localhost"
USERS = {"alice": "alice-bench-pw", "bob": "bob-bench-pw", "idle": "idle-bench-pw"}


@dataclass(frozen=True)
class Targets:
    """An issue's targets: proxy CPU per message as a share of Prosody's, throughput as a
    share of direct, and the p99 the proxy may add at the paced rate."""

    issue: str
    cpu_ratio: float
    cpu_label: str
    throughput_ratio: float
    added_p99_ms: float


# The inline proxy's transport alone (issue "inline proxy") and the full pipeline behind
# `stanzaguard run` (issue 3) have different targets; report the ones of what was measured.
TARGETS = {
    "passthrough": Targets("inline proxy (transport)", 1 / 3, "1/3 of", 0.8, 1.0),
    "service": Targets("3, the per-stanza pipeline", 1.0, "", 0.6, 2.0),
}


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Throughput:
    rates: list[float] = field(default_factory=list)
    other_load: list[float] = field(default_factory=list)
    delivered: int = 0
    prosody_cpu: float = 0.0
    prosody_sys: float = 0.0
    proxy_cpu: float = 0.0
    proxy_sys: float = 0.0
    # The proxy's main thread alone (its event loop): one thread can use one core at most,
    # so this bounds the proxy's rate however many cores the machine has.
    proxy_loop_cpu: float = 0.0
    seconds: float = 0.0  # wall time of the measured rounds
    client_cpu: float = 0.0
    # The index worker (a child of the proxy): its CPU from the round's start until it has
    # caught up, which may be after the last message was delivered.
    worker_cpu: float = 0.0
    round_us: list[tuple[float, float]] = field(default_factory=list)  # (prosody, proxy) per msg

    def per_msg_us(self, cpu: float) -> float:
        return cpu / self.delivered * 1e6 if self.delivered else float("nan")

    @property
    def best_rate(self) -> float:
        return max(self.rates) if self.rates else float("nan")

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


async def _pair(port: int, tag: str) -> tuple[xmppload.Session, xmppload.Session]:
    receiver = await xmppload.connect(
        "127.0.0.1", port, "bob", USERS["bob"], domain=DOMAIN, resource=f"recv-{tag}", presence=True
    )
    sender = await xmppload.connect(
        "127.0.0.1", port, "alice", USERS["alice"], domain=DOMAIN, resource=f"send-{tag}"
    )
    return sender, receiver


class Quiet:
    """Waits for a quiet machine before each measured round (it may be shared)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.threshold = args.quiet_threshold
        self.timeout = args.quiet_timeout
        self.pids: list[int] = []

    def wait(self) -> float:
        if self.timeout <= 0:
            return float("nan")
        return wait_quiet(self.pids, self.threshold, self.timeout)

    def load(self) -> OtherLoad:
        return OtherLoad(self.pids)


QUIET: Quiet | None = None


async def throughput_round(
    port: int,
    count: int,
    window: int,
    tag: str,
    prosody_pid: int,
    proxy_pid: int,
    into: Throughput | None,
) -> float:
    sender, receiver = await _pair(port, tag)
    try:
        if QUIET is not None and into is not None:
            QUIET.wait()
        other = QUIET.load() if QUIET is not None else None
        if other is not None:
            other.start()
        workers = child_pids(proxy_pid)
        worker_before = sum(_cpu_or_zero(pid) for pid in workers)
        before = (
            *cpu_split(prosody_pid),
            *cpu_split(proxy_pid),
            _self_cpu(),
            main_thread_cpu(proxy_pid),
            time.perf_counter(),
        )
        result = await xmppload.run_burst(sender, receiver, f"bob@{DOMAIN}", count, window=window)
        after = (
            *cpu_split(prosody_pid),
            *cpu_split(proxy_pid),
            _self_cpu(),
            main_thread_cpu(proxy_pid),
            time.perf_counter(),
        )
        other_cores = other.stop() if other is not None else float("nan")
        worker_after = await _settled_cpu(workers)
    finally:
        await sender.close()
        await receiver.close()
    if result.delivered != count:
        raise RuntimeError(f"{tag}: delivered {result.delivered} of {count}")
    if into is not None:
        into.rates.append(result.msgs_per_s)
        into.other_load.append(other_cores)
        d = [a - b for a, b in zip(after, before, strict=True)]
        into.delivered += result.delivered
        into.prosody_cpu += d[0] + d[1]
        into.prosody_sys += d[1]
        into.proxy_cpu += d[2] + d[3]
        into.proxy_sys += d[3]
        into.client_cpu += d[4]
        into.proxy_loop_cpu += d[5]
        into.seconds += d[6]
        into.worker_cpu += worker_after - worker_before
        into.round_us.append(((d[0] + d[1]) / count * 1e6, (d[2] + d[3]) / count * 1e6))
    return result.msgs_per_s


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the index worker of `stanzaguard run`)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    return out


def _cpu_or_zero(pid: int) -> float:
    try:
        return sum(cpu_split(pid))
    except OSError:
        return 0.0


async def _settled_cpu(pids: list[int], quiet_s: float = 0.5, limit_s: float = 120.0) -> float:
    """The CPU of ``pids`` once it stopped growing for ``quiet_s`` (they caught up)."""
    last = sum(_cpu_or_zero(pid) for pid in pids)
    waited = 0.0
    while pids and waited < limit_s:
        await asyncio.sleep(quiet_s)
        waited += quiet_s
        now = sum(_cpu_or_zero(pid) for pid in pids)
        if now == last:
            break
        last = now
    return last


async def latency_round(port: int, count: int, rate: float, tag: str) -> xmppload.RunResult:
    sender, receiver = await _pair(port, tag)
    try:
        if QUIET is not None:
            QUIET.wait()
        other = QUIET.load() if QUIET is not None else None
        if other is not None:
            other.start()
        result = await xmppload.run_paced(sender, receiver, f"bob@{DOMAIN}", count, rate)
        if other is not None and result.latency_ms is not None:
            result.latency_ms["other_load"] = other.stop()
        return result
    finally:
        await sender.close()
        await receiver.close()


async def open_idle(port: int, n: int, concurrency: int, tag: str) -> list[xmppload.Session]:
    sessions: list[xmppload.Session] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            s = await xmppload.connect(
                "127.0.0.1",
                port,
                "idle",
                USERS["idle"],
                domain=DOMAIN,
                resource=f"{tag}-{i}",
                setup_s=60.0,
            )
            sessions.append(s)

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(sessions)
        raise RuntimeError(f"{len(errors)} of {n} idle connections failed; first: {errors[0]!r}")
    return sessions


async def close_all(sessions: list[xmppload.Session]) -> None:
    for start in range(0, len(sessions), 100):
        await asyncio.gather(*(s.close() for s in sessions[start : start + 100]))


async def settle_rss(pid: int, seconds: float = 2.0) -> int:
    await asyncio.sleep(seconds)
    return rss_kib(pid)


# -- profiling ------------------------------------------------------------------------------


def aggregate_raw(path: Path, top: int) -> dict[str, object]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        self_c[frames[-1]] += count
        for name in set(frames):
            incl_c[name] += count
        groups[_category(frames)] += count
    idle = sum(c for name, c in self_c.items() if name.startswith(IDLE_FRAMES))
    inclusive = [
        (name, 100 * c / total)
        for name, c in incl_c.most_common()
        if c < 0.85 * total  # leave out the frames every sample has (typer, asyncio.run)
    ][: top * 2]
    return {
        "samples": total,
        "idle_pct": 100 * idle / total if total else 0.0,
        "self": [(name, 100 * c / total) for name, c in self_c.most_common(top)] if total else [],
        "inclusive": inclusive if total else [],
        "categories": [(name, 100 * c / total) for name, c in groups.most_common()],
    }


# Each sample goes to the category of its leaf-most frame that matches one (first rule wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting in epoll (idle)", ("EpollSelector.select", "epoll_wait", "(selectors.py)")),
    (
        "framing: proxy/stream.py incl. expat",
        ("(proxy/stream.py)", "(pyexpat", "(xmlparse.c", "(xmltok", "(xmlrole", "libexpat"),
    ),
    ("prometheus_client counters", ("(prometheus_client/",)),
    (
        "TLS: ssl.py / sslproto.py / OpenSSL",
        ("(ssl.py)", "(asyncio/sslproto.py)", "(_ssl.c", "libssl", "libcrypto"),
    ),
    (
        "socket send/recv: selector_events.py, libc",
        (
            "(asyncio/selector_events.py)",
            "(socketmodule",
            "send (libc",
            "recv (libc",
            "__send",
            "__recv",
            "__libc_send",
            "__libc_recv",
        ),
    ),
    (
        "relay logic: proxy/c2s.py, hook.py, sm.py",
        ("(proxy/c2s.py)", "(proxy/hook.py)", "(proxy/sm.py)"),
    ),
    ("asyncio streams/scheduling", ("(asyncio/", "(_asynciomodule")),
)


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


# Waiting in epoll_wait is not work; py-spy cannot always tell (--nonblocking).
IDLE_FRAMES = ("EpollSelector.select", "select (selectors.py)", "epoll_wait")


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    short = "/".join(Path(file).parts[-2:]) if file else ""
    return f"{name} ({short})" if short else name


async def profile_round(
    args: argparse.Namespace, proxy: Proxy, prosody: Prosody, out_dir: Path
) -> dict[str, object]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    # Python stacks without pausing the proxy; then native stacks (C frames of expat, OpenSSL,
    # the kernel entry), which py-spy can only take by pausing the process per sample.
    for label, extra in (("python", ["--nonblocking"]), ("native", ["--native"])):
        raw = out_dir / f"proxy-{label}.txt"
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(proxy.pid),
            "--rate",
            str(args.profile_rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            *extra,
        ]
        log = (out_dir / f"py-spy-{label}.log").open("wb")
        spy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        try:
            await asyncio.sleep(1.0)
            if spy.poll() is not None:
                results[label] = {"error": (out_dir / f"py-spy-{label}.log").read_text()[-500:]}
                continue
            rates = []
            for i in range(args.profile_rounds):
                rates.append(
                    await throughput_round(
                        proxy.port,
                        args.count,
                        args.window,
                        f"prof-{label}-{i}",
                        prosody.pid,
                        proxy.pid,
                        None,
                    )
                )
        finally:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            log.close()
        if raw.exists():
            results[label] = aggregate_raw(raw, args.profile_top) | {
                "raw": str(raw),
                "msgs_per_s_under_sampling": rates,
            }
        else:
            results[label] = {"error": (out_dir / f"py-spy-{label}.log").read_text()[-500:]}
    return results


async def cprofile_round(
    args: argparse.Namespace,
    work: Path,
    prosody: Prosody,
    cert: Path,
    key: Path,
    started: list[Prosody | Proxy],
) -> dict[str, object]:
    """Throughput rounds through a separate proxy under cProfile with a CPU-time clock.

    py-spy samples wall-clock stacks: a proxy preempted right after a send() that woke
    Prosody is sampled "in send()". cProfile on time.thread_time charges only CPU time, at
    the price of per-call overhead (which inflates call-heavy code such as expat callbacks).
    """
    import pstats

    out = Path(args.cprofile)
    out.mkdir(parents=True, exist_ok=True)
    stats_file = out / "proxy-cprofile.pstats"
    prof = Proxy(
        work,
        prosody.port,
        cert,
        key,
        name="proxy-cprofile",
        kind="passthrough",
        cprofile=str(stats_file),
        event_loop=args.loop,
    )
    started.append(prof)
    prof.start()
    rates = []
    try:
        for i in range(args.profile_rounds):
            rates.append(
                await throughput_round(
                    prof.port, args.count, args.window, f"cprof-{i}", prosody.pid, prof.pid, None
                )
            )
    finally:
        prof.stop()
    stats = pstats.Stats(str(stats_file))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    by_file: Counter[str] = Counter()
    for (file, line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(Path(file).parts[-2:]) if file != "~" else "builtins"
        rows.append((tt, f"{func} ({short}:{line})" if file != "~" else func))
        by_file[_file_group(file, func)] += tt
    rows.sort(reverse=True)
    return {
        "msgs_per_s_under_profiler": rates,
        "cpu_seconds": total,
        "top": [(name, 100 * tt / total) for tt, name in rows[: args.profile_top]],
        "groups": [(name, 100 * tt / total) for name, tt in by_file.most_common()],
    }


def _file_group(file: str, func: str) -> str:
    if "proxy/stream.py" in file or "pyexpat" in func or "xmlparser" in func:
        return "framing: proxy/stream.py + expat Parse"
    if "prometheus_client" in file:
        return "prometheus_client counters"
    if file.endswith(("/ssl.py", "sslproto.py")) or "_ssl." in func:
        return "TLS: ssl.py / sslproto.py / _ssl"
    if "selector_events.py" in file or "socket" in func or "'send'" in func or "'recv" in func:
        return "socket send/recv: selector_events.py + socket methods"
    if "epoll" in func or "selectors.py" in file:
        return "epoll"
    if "/proxy/" in file:
        return "relay logic: proxy/c2s.py, hook.py, sm.py"
    if "/asyncio/" in file or "_asyncio" in func:
        return "asyncio streams/scheduling"
    return "other"


# -- reporting ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_state() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "status",
                "--porcelain",
                "--",
                "proxy",
                "stanzaguard",
                "archive_api",
                "classifier",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(res: dict[str, object]) -> str:
    lines: list[str] = []
    add = lines.append
    d: Throughput = res["direct"]  # type: ignore[assignment]
    p: Throughput = res["proxy"]  # type: ignore[assignment]
    add("")
    add(
        f"(a) throughput: {res['count']} messages x {res['repeats']} rounds per path, "
        "1 sender -> 1 receiver, STARTTLS client legs (median of rounds; CPU summed over rounds)"
    )
    add(f"{'':34}{'direct':>12}{'via proxy':>12}{'ratio':>10}")
    add(
        f"{'delivered msgs/s (median)':34}{d.median_rate:12,.0f}{p.median_rate:12,.0f}"
        f"{p.median_rate / d.median_rate:10.2f}"
    )
    add(
        f"{'delivered msgs/s (best round)':34}{d.best_rate:12,.0f}{p.best_rate:12,.0f}"
        f"{p.best_rate / d.best_rate:10.2f}"
    )
    add(
        f"{'  rounds':34}{' '.join(f'{r:,.0f}' for r in d.rates):>12}  "
        f"{' '.join(f'{r:,.0f}' for r in p.rates)}"
    )
    add(
        f"{'  other processes, cores busy':34}"
        f"{' '.join(f'{r:.2f}' for r in d.other_load):>12}  "
        f"{' '.join(f'{r:.2f}' for r in p.other_load)}"
    )
    add(
        f"{'Prosody CPU us/msg (all rounds)':34}{d.per_msg_us(d.prosody_cpu):12.1f}"
        f"{p.per_msg_us(p.prosody_cpu):12.1f}"
    )
    add(
        f"{'  of which kernel (stime)':34}{d.per_msg_us(d.prosody_sys):12.1f}"
        f"{p.per_msg_us(p.prosody_sys):12.1f}"
    )
    add(
        f"{'  per round':34}{' '.join(f'{r[0]:.0f}' for r in d.round_us):>12}  "
        f"{' '.join(f'{r[0]:.0f}' for r in p.round_us)}"
    )
    add(
        f"{'proxy CPU us/msg (all rounds)':34}{d.per_msg_us(d.proxy_cpu):12.1f}"
        f"{p.per_msg_us(p.proxy_cpu):12.1f}"
    )
    add(
        f"{'  of which kernel (stime)':34}{d.per_msg_us(d.proxy_sys):12.1f}"
        f"{p.per_msg_us(p.proxy_sys):12.1f}"
    )
    add(f"{'  per round':34}{'':>12}  {' '.join(f'{r[1]:.0f}' for r in p.round_us)}")
    if p.seconds:
        add(
            f"{'  of which its loop thread':34}{'':>12}{p.per_msg_us(p.proxy_loop_cpu):12.1f}"
            f"  ({p.proxy_loop_cpu / p.seconds:.2f} of a core busy; alone it would allow "
            f"{p.delivered / p.proxy_loop_cpu if p.proxy_loop_cpu else float('nan'):,.0f} msgs/s)"
        )
    if p.worker_cpu:
        add(
            f"{'index worker CPU us/msg':34}{'':>12}{p.per_msg_us(p.worker_cpu):12.1f}"
            "  (a child process; until it caught up)"
        )
    add(
        f"{'load client CPU us/msg':34}{d.per_msg_us(d.client_cpu):12.1f}"
        f"{p.per_msg_us(p.client_cpu):12.1f}"
    )
    proxy_us = p.per_msg_us(p.proxy_cpu)
    vs_direct = proxy_us / d.per_msg_us(d.prosody_cpu)
    vs_same = proxy_us / p.per_msg_us(p.prosody_cpu)
    tput = p.median_rate / d.median_rate
    lat = res["latency"]  # type: ignore[assignment]
    added = lat["proxy"]["p99"] - lat["direct"]["p99"]  # type: ignore[index]
    add("")
    add(
        f"(b) latency at a paced {res['rate']:,.0f} msgs/s, {res['latency_count']} messages per "
        f"path in {res['latency_slices']} alternating slices (ms, send->receive, CLOCK_MONOTONIC)"
    )
    add(
        f"{'':14}"
        + "".join(f"{k:>9}" for k in ("p50", "p90", "p99", "p99.9", "max", "rate/s"))
        + "  others busy"
    )
    for mode in ("direct", "proxy"):
        m = lat[mode]  # type: ignore[index]
        add(
            f"{mode:14}"
            + "".join(f"{m[k]:9.3f}" for k in ("p50", "p90", "p99", "p999", "max"))
            + f"{m['rate']:9.0f}{m.get('other_load', float('nan')):9.2f} cores"
        )
    add(
        f"{'added by proxy':14}{lat['proxy']['p50'] - lat['direct']['p50']:9.3f}"  # type: ignore[index]
        f"{'':9}{added:9.3f}"
    )
    mem = res["memory"]  # type: ignore[assignment]
    add("")
    add(f"(c) memory: {mem['connections']} idle STARTTLS connections (authenticated, bound)")
    add(f"{'':34}{'before KiB':>12}{'after KiB':>12}{'KiB/conn':>10}")
    for key, label in (
        ("proxy", "proxy RSS (via proxy)"),
        ("prosody_via_proxy", "Prosody RSS (via proxy)"),
        ("prosody_direct", "Prosody RSS (direct, TLS)"),
    ):
        if key in mem:
            b, a = mem[key]
            add(f"{label:34}{b:12,}{a:12,}{(a - b) / mem['connections']:10.1f}")
    add(f"{'connect+auth+bind time via proxy':34}{mem['connect_seconds']:11.1f}s")
    add("")
    goal = TARGETS.get(str(res.get("proxy_kind")), TARGETS["passthrough"])
    add(f"targets (issue {goal.issue})")
    add(
        f"  proxy CPU/msg <= {goal.cpu_label + ' ' if goal.cpu_label else ''}Prosody's: "
        f"{proxy_us:.1f} us vs Prosody direct "
        f"{d.per_msg_us(d.prosody_cpu):.1f} us = {vs_direct:.2f} "
        f"({verdict(vs_direct <= goal.cpu_ratio)}); "
        f"vs Prosody behind the proxy {p.per_msg_us(p.prosody_cpu):.1f} us = {vs_same:.2f} "
        f"({verdict(vs_same <= goal.cpu_ratio)})"
    )
    add(
        f"  throughput >= {goal.throughput_ratio}x direct: {tput:.2f}x "
        f"({verdict(tput >= goal.throughput_ratio)})"
    )
    add(
        f"  added p99 <= {goal.added_p99_ms:g} ms: {added:+.3f} ms "
        f"({verdict(added <= goal.added_p99_ms)})"
    )
    prof = res.get("profile")
    if isinstance(prof, dict):
        for label, data in prof.items():
            add("")
            if "error" in data:
                add(f"profile ({label}): py-spy failed: {data['error']}")
                continue
            add(
                f"profile ({label} stacks, {data['samples']} samples, "
                f"{data['idle_pct']:.1f}% of them waiting in epoll; "
                "rounds under sampling: "
                + ", ".join(f"{r:,.0f}" for r in data["msgs_per_s_under_sampling"])
                + " msgs/s)"
            )
            busy = 100 - data["idle_pct"]
            per_msg = res["proxy"].per_msg_us(res["proxy"].proxy_cpu)  # type: ignore[attr-defined]
            add(
                f"  where the proxy's {per_msg:.1f} us/msg goes (share of busy samples, "
                "attributed by leaf-most matching frame):"
            )
            for name, pct in data["categories"]:
                if name.startswith("waiting"):
                    continue
                add(f"    {100 * pct / busy:5.1f}%  ~{per_msg * pct / busy:5.1f} us/msg  {name}")
            add("  self time:")
            for name, pct in data["self"]:
                add(f"    {pct:5.1f}%  {name}")
            add("  inclusive time:")
            for name, pct in data["inclusive"]:
                add(f"    {pct:5.1f}%  {name}")
    cp = res.get("cprofile")
    if isinstance(cp, dict):
        add("")
        add(
            f"cProfile on CPU time (separate proxy; {cp['cpu_seconds']:.2f} s CPU profiled; "
            "rounds under the profiler: "
            + ", ".join(f"{r:,.0f}" for r in cp["msgs_per_s_under_profiler"])
            + " msgs/s)"
        )
        add("  by part (tottime):")
        for name, pct in cp["groups"]:
            add(f"    {pct:5.1f}%  {name}")
        add("  top functions (tottime):")
        for name, pct in cp["top"]:
            add(f"    {pct:5.1f}%  {name}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, work: Path, res: dict[str, object], started: list[Prosody | Proxy]
) -> None:
    # Inside Prosody's directory, which is handed to the prosody user (it must read the key).
    cert, key = make_cert(work / "prosody" / "certs", DOMAIN)
    prosody = Prosody(work / "prosody", cert, key)
    for user, password in USERS.items():
        prosody.register(user, password)
    started.append(prosody)
    prosody.start()
    res["prosody_version"] = prosody.version()
    proxy = Proxy(
        work,
        prosody.port,
        cert,
        key,
        name="proxy",
        kind=args.proxy,
        ssl_buffer_kib=args.ssl_buffer_kib,
        pure=args.pure,
        event_loop=args.loop,
    )
    started.append(proxy)
    proxy.start()
    res["proxy_kind"] = args.proxy
    res["proxy_code"] = "pure Python" if args.pure else native_state()
    res["proxy_loop"] = args.loop
    res["proxy_argv"] = " ".join(Path(a).name if "/" in a else a for a in proxy.argv()[:3])
    res["git"] = git_state()
    global QUIET
    QUIET = Quiet(args)
    QUIET.pids = [prosody.pid, proxy.pid]
    print(
        f"prosody pid {prosody.pid} port {prosody.port}; proxy pid {proxy.pid} "
        f"port {proxy.port}; work dir {work}",
        flush=True,
    )

    # Warm-up (and the check that nothing throttles: Debian's default would give ~60/s).
    for port, tag in ((prosody.port, "warm-direct"), (proxy.port, "warm-proxy")):
        rate = await throughput_round(
            port, args.warmup, args.window, tag, prosody.pid, proxy.pid, None
        )
        print(f"warm-up {tag}: {rate:,.0f} msgs/s", flush=True)
        if rate < 300:  # Debian's default c2s limit gives about 60 msgs/s
            raise RuntimeError(f"{tag}: {rate:.0f} msgs/s - is a c2s rate limit in force?")

    # (a) throughput, direct and proxy rounds interleaved.
    direct, via = Throughput(), Throughput()
    for i in range(args.repeats):
        for port, acc, tag in ((prosody.port, direct, "direct"), (proxy.port, via, "proxy")):
            rate = await throughput_round(
                port, args.count, args.window, f"{tag}-{i}", prosody.pid, proxy.pid, acc
            )
            print(f"throughput {tag} round {i}: {rate:,.0f} msgs/s", flush=True)
    res["direct"], res["proxy"] = direct, via

    # (b) latency at a paced rate, in slices that alternate direct and proxy, so that both
    # paths see the same share of whatever else the machine is doing.
    pooled: dict[str, list[int]] = {"direct": [], "proxy": []}
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    others: dict[str, list[float]] = {"direct": [], "proxy": []}
    per_slice = max(1, args.latency_count // args.latency_slices)
    for i in range(args.latency_slices):
        for port, tag in ((prosody.port, "direct"), (proxy.port, "proxy")):
            r = await latency_round(port, per_slice, args.rate, f"lat-{tag}-{i}")
            if r.delivered != per_slice or r.latencies_ns is None or r.latency_ms is None:
                raise RuntimeError(f"latency {tag}: delivered {r.delivered} of {per_slice}")
            pooled[tag] += r.latencies_ns
            rates[tag].append(r.msgs_per_s)
            others[tag].append(r.latency_ms.get("other_load", float("nan")))
            print(
                f"latency {tag} slice {i}: p50 {r.latency_ms['p50']:.3f} ms "
                f"p99 {r.latency_ms['p99']:.3f} ms at {r.msgs_per_s:,.0f} msgs/s",
                flush=True,
            )
    latency: dict[str, dict[str, float]] = {}
    for tag, values in pooled.items():
        latency[tag] = xmppload.latency_summary(values) | {
            "rate": statistics.mean(rates[tag]),
            "other_load": statistics.mean(others[tag]),
            "count": float(len(values)),
        }
    res["latency"] = latency

    # (d) profile (before the memory test, on the proxy that carried the load).
    if args.profile:
        res["profile"] = await profile_round(args, proxy, prosody, Path(args.profile))

    if args.cprofile:
        res["cprofile"] = await cprofile_round(args, work, prosody, cert, key, started)

    # (c) memory per idle connection: a fresh proxy, so earlier load does not hide the cost.
    proxy.stop()
    fresh = Proxy(
        work,
        prosody.port,
        cert,
        key,
        name="proxy-mem",
        kind=args.proxy,
        ssl_buffer_kib=args.ssl_buffer_kib,
        pure=args.pure,
        event_loop=args.loop,
    )
    started.append(fresh)
    fresh.start()
    QUIET.pids = [prosody.pid, fresh.pid]
    warm = await open_idle(fresh.port, 2, 2, "warm")  # import/SSL set-up costs out of the way
    await close_all(warm)
    mem: dict[str, object] = {"connections": args.connections}
    QUIET.wait()
    before = (await settle_rss(fresh.pid), rss_kib(prosody.pid))
    t0 = time.monotonic()
    sessions = await open_idle(fresh.port, args.connections, args.concurrency, "via")
    mem["connect_seconds"] = time.monotonic() - t0
    after = (await settle_rss(fresh.pid), rss_kib(prosody.pid))
    mem["proxy"], mem["prosody_via_proxy"] = (before[0], after[0]), (before[1], after[1])
    print(
        f"memory via proxy: proxy {before[0]:,} -> {after[0]:,} KiB, "
        f"prosody {before[1]:,} -> {after[1]:,} KiB",
        flush=True,
    )
    await close_all(sessions)
    fresh.stop()
    if args.direct_memory:
        await asyncio.sleep(2.0)
        b = rss_kib(prosody.pid)
        sessions = await open_idle(prosody.port, args.connections, args.concurrency, "direct")
        a = await settle_rss(prosody.pid)
        mem["prosody_direct"] = (b, a)
        print(f"memory direct: prosody {b:,} -> {a:,} KiB", flush=True)
        await close_all(sessions)
    res["memory"] = mem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--proxy",
        choices=("passthrough", "service"),
        default="passthrough",
        help="passthrough: C2SProxy with PassThroughHook (the transport alone); "
        "service: the full `stanzaguard run` (pipeline, spool, SQLite indexer)",
    )
    parser.add_argument(
        "--ssl-buffer-kib",
        type=int,
        default=0,
        help="experiment (passthrough only): shrink asyncio's 256 KiB "
        "per-connection TLS read buffer to this size",
    )
    parser.add_argument("--count", type=int, default=20_000, help="messages per throughput round")
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds per path")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument(
        "--window",
        type=int,
        default=1_000,
        help="max messages in flight in throughput rounds (0 = unlimited; "
        "Prosody re-concatenates its whole write buffer on every partial "
        "send, so an unbounded burst measures that quadratic copy instead)",
    )
    parser.add_argument("--rate", type=float, default=1_000.0, help="paced msgs/s for latency")
    parser.add_argument(
        "--latency-count",
        type=int,
        default=10_000,
        help="paced messages per path (10,000 = 10 s at 1,000/s)",
    )
    parser.add_argument(
        "--latency-slices",
        type=int,
        default=5,
        help="split each path's paced run into this many alternating slices",
    )
    parser.add_argument("--connections", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--no-direct-memory", dest="direct_memory", action="store_false")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the proxy; write stacks here")
    parser.add_argument(
        "--cprofile",
        metavar="DIR",
        help="also run a separate proxy under cProfile (CPU-time clock)",
    )
    parser.add_argument("--profile-rounds", type=int, default=2)
    parser.add_argument("--profile-rate", type=int, default=500, help="py-spy samples/s")
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="before each round, wait until other processes use fewer cores",
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=120.0,
        help="longest wait for a quiet machine per round (0 = do not wait)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority for this run and everything it starts "
        "(e.g. -5 on a shared machine; negative needs root)",
    )
    parser.add_argument(
        "--pure",
        action="store_true",
        help="run the proxy from its .py sources even where `make native` compiled them "
        "(benchmarks/pure_python; bench_native.py compares the two)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the proxy's event loop (the event_loop setting; uvloop is the default)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeats, args.warmup, args.latency_slices = 2_000, 1, 500, 1
        args.latency_count, args.connections, args.quiet_timeout = 1_000, 100, 0

    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # Prosody and the proxy inherit it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.connections + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))

    # A SIGTERM must still run the finally below (and stop what we started).
    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    work = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    work.chmod(0o755)
    res: dict[str, object] = {
        "count": args.count,
        "repeats": args.repeats,
        "rate": args.rate,
        "latency_count": args.latency_count,
        "latency_slices": args.latency_slices,
    }
    started: list[Prosody | Proxy] = []
    rc = 0
    try:
        asyncio.run(run(args, work, res, started))
    except Exception as exc:
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        rc = 1
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()
        if not args.keep and rc == 0:
            shutil.rmtree(work, ignore_errors=True)
        elif rc:
            print(f"logs kept in {work}", file=sys.stderr)
    if rc:
        return rc
    info = machine() | {"prosody": str(res.get("prosody_version"))}
    print("\nmachine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    if args.nice:
        print(f"priority: nice {args.nice} for the harness, Prosody and the proxy")
    print(
        f"proxy: {args.proxy} ({res.get('proxy_argv')})"
        + (f", asyncio TLS read buffer {args.ssl_buffer_kib} KiB" if args.ssl_buffer_kib else "")
        + f"; {res.get('proxy_code')}; event loop {res.get('proxy_loop')}"
        + f"; code: {res.get('git')}"
    )
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(report(res))
    if args.json:
        out = dict(res)
        for key in ("direct", "proxy"):
            t: Throughput = out[key]  # type: ignore[assignment]
            out[key] = {
                "rates": t.rates,
                "delivered": t.delivered,
                "prosody_us_per_msg": t.per_msg_us(t.prosody_cpu),
                "proxy_us_per_msg": t.per_msg_us(t.proxy_cpu),
                "proxy_loop_thread_us_per_msg": t.per_msg_us(t.proxy_loop_cpu),
                "client_us_per_msg": t.per_msg_us(t.client_cpu),
                "index_worker_us_per_msg": t.per_msg_us(t.worker_cpu),
            }
        out["machine"] = info
        for key in ("direct", "proxy"):
            out[key]["other_load"] = res[key].other_load  # type: ignore[attr-defined,index]
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
