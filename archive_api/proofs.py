"""A record's place in the hash chain, and the proof that it is there unaltered.

The message view shows, next to the record, the chain link that carries it (its seq,
prev_hash, hash and payload), the hashes of the links on either side, and the nearest
signed checkpoint at or after it. The service recomputes every hash from the record's link
to that checkpoint and checks the checkpoint's Ed25519 signature; the result is a list of
named checks, each passed or failed.

What a reader can re-check alone, with the archive's public key: the record's link hash
from its payload (`SHA-256(prev_hash || seq || payload)`, archive_api/store/chain.py), that
the neighbours' hashes join it, and the checkpoint's signature over its head. The links in
between are other people's messages, so only their hashes are shown; `stanzaguard verify`
or an export re-checks them in full.

A record newer than the last checkpoint is not yet covered by a signature: the proof then
hashes forward from the newest checkpoint before it instead, which shows the record extends
a signed chain, and says so (`covered` False).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.base import ArchiveStore, ChainPosition, Tombstone
from archive_api.store.chain import GENESIS, ChainLink, Checkpoint, link_hash
from archive_api.store.records import EntryOp, SpoolEntry

MAX_PROOF_PATH: Final = 5000
"""Most links hashed for one proof; a checkpoint further away is named but not reached."""


@dataclass(frozen=True, slots=True)
class ProofCheck:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class RecordProof:
    chain: str
    seq: int
    link: ChainLink
    previous: ChainLink | None
    next: ChainLink | None
    checkpoint: Checkpoint | None  # the one the checks reached (covering or, else, before)
    covered: bool  # a signed checkpoint at or after the record's seq was reached
    links_hashed: int
    checks: tuple[ProofCheck, ...]

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        def neighbour(link: ChainLink | None) -> dict[str, Any] | None:
            if link is None:
                return None
            return {"seq": link.seq, "prev_hash": link.prev_hash.hex(), "hash": link.hash.hex()}

        checkpoint = self.checkpoint
        return {
            "chain": self.chain,
            "seq": self.seq,
            "link": {
                "seq": self.link.seq,
                "prev_hash": self.link.prev_hash.hex(),
                "hash": self.link.hash.hex(),
                "payload_base64": base64.b64encode(self.link.payload).decode("ascii"),
            },
            "previous": neighbour(self.previous),
            "next": neighbour(self.next),
            "checkpoint": None
            if checkpoint is None
            else {
                "chain": checkpoint.chain_name,
                "seq": checkpoint.seq,
                "head": checkpoint.head.hex(),
                "signature": checkpoint.signature.hex(),
            },
            "covered": self.covered,
            "links_hashed": self.links_hashed,
            "checks": [check.to_json() for check in self.checks],
            "verified": self.verified,
        }


def _is_tombstone(payload: bytes) -> bool:
    try:
        return Tombstone.from_payload(payload) is not None
    except ValueError:
        return False


def _carries(payload: bytes, record_id: str) -> bool:
    try:
        entry = SpoolEntry.from_payload(payload)
    except (ValueError, KeyError, TypeError):
        return False
    return entry.op is EntryOp.RECORD and entry.record_id == record_id


def _hash_run(links: list[ChainLink], start: int) -> str | None:
    """Why the run of links from `start` does not hold together (None when it does).

    A purged record's link keeps its hash but not the payload it covers (a tombstone), so
    for those only the joins are checked.
    """
    expected = start
    previous: ChainLink | None = None
    for link in links:
        if link.seq != expected:
            return f"seq {expected} is missing"
        if previous is not None and link.prev_hash != previous.hash:
            return f"seq {link.seq} does not link to the one before it"
        tombstone = _is_tombstone(link.payload)
        if not tombstone and link_hash(link.prev_hash, link.seq, link.payload) != link.hash:
            return f"seq {link.seq}: content does not match its hash"
        previous, expected = link, expected + 1
    return None


async def record_proof(
    store: ArchiveStore,
    record_id: str,
    position: ChainPosition,
    public_key: Ed25519PublicKey | None,
    *,
    max_path: int = MAX_PROOF_PATH,
) -> RecordProof:
    """Build and check the proof of one record (its RECORD entry at `position`)."""
    seq, chain = position.seq, position.chain
    checkpoints = [cp for cp in await store.checkpoints(chain) if cp.chain_name == chain]
    after = [cp for cp in checkpoints if cp.seq >= seq]
    before = [cp for cp in checkpoints if cp.seq < seq]
    covering = min(after, key=lambda cp: cp.seq) if after else None
    if covering is not None and covering.seq - seq > max_path:
        covering = None
    base = max(before, key=lambda cp: cp.seq) if before else None
    if covering is not None or (base is not None and seq - base.seq > max_path):
        base = None
    first = base.seq if base is not None else max(seq - 1, 1)
    last = max(covering.seq if covering is not None else seq, seq + 1)
    links = [link async for link in store.chain_links(first, last, chain=chain)]
    by_seq = {link.seq: link for link in links}
    own = by_seq.get(seq)
    checks: list[ProofCheck] = []
    if own is None:
        # The records row names an entry the ledger does not have: the store is damaged.
        missing = ChainLink(seq, GENESIS, GENESIS, b"")
        checks.append(ProofCheck("link", False, f"the chain has no entry at seq {seq}"))
        return RecordProof(chain, seq, missing, None, None, None, False, 0, tuple(checks))
    previous, following = by_seq.get(seq - 1), by_seq.get(seq + 1)
    checks.append(
        ProofCheck(
            "payload",
            _carries(own.payload, record_id),
            "the link's payload is this record's RECORD entry",
        )
    )
    checks.append(
        ProofCheck(
            "link-hash",
            link_hash(own.prev_hash, own.seq, own.payload) == own.hash,
            "SHA-256(prev_hash || seq || payload) equals the link's hash",
        )
    )
    if previous is not None:
        checks.append(
            ProofCheck(
                "previous",
                previous.hash == own.prev_hash,
                f"seq {previous.seq}'s hash is this link's prev_hash",
            )
        )
    elif seq == 1:
        checks.append(
            ProofCheck("previous", own.prev_hash == GENESIS, "the first link starts from zeros")
        )
    if following is not None:
        checks.append(
            ProofCheck(
                "next", following.prev_hash == own.hash, f"seq {following.seq} links to this one"
            )
        )
    problem = _hash_run(links, first)
    checks.append(
        ProofCheck(
            "path",
            problem is None,
            problem or f"seqs {first}..{links[-1].seq} hash and link unbroken",
        )
    )
    checkpoint = covering or base
    if checkpoint is not None:
        head = by_seq.get(checkpoint.seq)
        checks.append(
            ProofCheck(
                "checkpoint-head",
                head is not None and head.hash == checkpoint.head,
                f"the checkpoint at seq {checkpoint.seq} signs the stored hash there",
            )
        )
        if public_key is not None:
            checks.append(
                ProofCheck(
                    "checkpoint-signature",
                    checkpoint.verify(public_key),
                    "the checkpoint's Ed25519 signature verifies with the archive's key",
                )
            )
    return RecordProof(
        chain,
        seq,
        own,
        previous,
        following,
        checkpoint,
        covering is not None,
        len(links),
        tuple(checks),
    )
