"""Framing cost per stanza: `proxy.stream.Framer.feed` against bare expat, sans I/O.

Feeds a stream of one-line chat messages (as Prosody delivers them, with `from` and
`xml:lang`) in chunks of the proxy's read size and reports CPU microseconds per stanza for:

- expat alone, no Python callbacks (the floor for any expat-based framer);
- expat with empty start/end callbacks, with and without namespace processing (the price of
  calling back into Python for every element, nested ones included);
- `Framer.feed` (what the proxy runs per leg);
- `Element.tree()` on every framed stanza (what the pipeline reads), against the baseline of
  an `ElementTree.XMLPullParser` kept open in the same wrapper element and replaced after every
  MiB (how the proxy parsed stanzas before session 9), with the ratio.

    .venv/bin/python benchmarks/bench_framing.py [--count 50000] [--chunk 65536]
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.parsers import expat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.stream import Element, Framer

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='x' version='1.0'>"
)
STANZA = (
    b"<message to='bob@localhost' type='chat' id='m%d' from='alice@localhost/send' "
    b"xml:lang='en'><body>benchmark message with a one-line body of ordinary length %d"
    b"</body></message>"
)


def chunks(count: int, size: int) -> list[bytes]:
    data = b"".join(STANZA % (i, i) for i in range(count))
    return [data[i : i + size] for i in range(0, len(data), size)]


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=64 * 1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    parts = chunks(args.count, args.chunk)
    n = args.count

    def bare() -> None:
        p = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        p.Parse(HEADER, False)
        for part in parts:
            p.Parse(part, False)

    def callbacks_ns() -> None:
        p = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        if hasattr(p, "SetReparseDeferralEnabled"):
            p.SetReparseDeferralEnabled(False)
        p.StartElementHandler = lambda name, attrs: None
        p.EndElementHandler = lambda name: None
        p.StartNamespaceDeclHandler = lambda prefix, uri: None
        p.Parse(HEADER, False)
        for part in parts:
            p.Parse(part, False)

    def callbacks_flat() -> None:
        p = expat.ParserCreate(encoding="UTF-8")
        p.ordered_attributes = True
        if hasattr(p, "SetReparseDeferralEnabled"):
            p.SetReparseDeferralEnabled(False)
        p.StartElementHandler = lambda name, attrs: None
        p.EndElementHandler = lambda name: None
        p.Parse(HEADER, False)
        for part in parts:
            p.Parse(part, False)

    frames_seen = [0]

    def framer() -> None:
        f = Framer()
        f.feed(HEADER)
        total = 0
        for part in parts:
            for frame in f.feed(part):
                if isinstance(frame, Element) and frame.is_stanza:
                    total += 1
        frames_seen[0] = total

    framed: list[Element] = []
    f = Framer()
    f.feed(HEADER)
    for part in parts:
        framed += [frame for frame in f.feed(part) if isinstance(frame, Element)]

    def trees() -> None:
        for element in framed:
            element._tree = None  # parse again on every repeat
            element.tree()

    wrapper = b"<w xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"

    def pull_parser_trees() -> None:
        # As the proxy did: a fresh pull parser after every MiB fed (its wrapper keeps what
        # it parsed).
        pull: ET.XMLPullParser[ET.Element] | None = None
        fed = 0
        last: ET.Element | None = None
        for element in framed:
            if pull is None or fed > 1024 * 1024:
                pull = ET.XMLPullParser(events=("end",))
                pull.feed(wrapper)
                fed = 0
            pull.feed(element.data)
            fed += len(element.data)
            last = list(pull.read_events())[-1][1]
        assert last is not None and last.tag == "{jabber:client}message"

    rows = [
        ("expat, no callbacks", timed(bare, args.repeats)),
        ("expat+callbacks, namespaces on", timed(callbacks_ns, args.repeats)),
        ("expat+callbacks, no namespaces", timed(callbacks_flat, args.repeats)),
        ("Framer.feed (+ is_stanza check)", timed(framer, args.repeats)),
    ]
    assert frames_seen[0] == n, frames_seen
    print(
        f"{n} stanzas of {len(STANZA % (1, 1))} bytes, fed in {args.chunk}-byte chunks; "
        f"Python {sys.version.split()[0]}, expat {expat.EXPAT_VERSION}"
    )
    for label, seconds in rows:
        print(f"  {label:34} {seconds / n * 1e6:6.2f} us/stanza")
    baseline = timed(pull_parser_trees, args.repeats)
    ours = timed(trees, args.repeats)
    print(f"  {'tree: XMLPullParser (baseline)':34} {baseline / n * 1e6:6.2f} us/stanza")
    print(f"  {'tree: Element.tree()':34} {ours / n * 1e6:6.2f} us/stanza")
    print(f"  {'tree ratio, ours / baseline':34} {ours / baseline:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
