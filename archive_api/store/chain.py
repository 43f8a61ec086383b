"""The hash-chain format and signed checkpoints shared by the spool, the store and the audit log.

hash(n) = SHA-256(prev_hash || seq as 8 big-endian bytes || payload); the first entry's
prev_hash is 32 zero bytes. A checkpoint is an Ed25519 signature over the chain name, a
sequence number and the hash at that sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

GENESIS = bytes(32)


def link_hash(prev_hash: bytes, seq: int, payload: bytes) -> bytes:
    return hashlib.sha256(prev_hash + seq.to_bytes(8, "big") + payload).digest()


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """Where and why a chain stops verifying."""

    seq: int
    problem: str

    def __str__(self) -> str:
        return f"chain broken at seq {self.seq}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainLink:
    seq: int
    prev_hash: bytes
    hash: bytes
    payload: bytes

    def __init__(
        self,
        seq: int,
        prev_hash: bytes,
        hash: bytes,
        payload: bytes,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "prev_hash", prev_hash)
        object.__setattr__(self, "hash", hash)
        object.__setattr__(self, "payload", payload)


def verify_links(
    links: Iterable[ChainLink],
    *,
    start_seq: int = 1,
    start_prev: bytes = GENESIS,
    unhashable: Container[int] = (),
) -> ChainBreak | None:
    """Check a run of links in order; return the first break or None when whole.

    Links whose seq is in `unhashable` (tombstones checked by the caller) must still continue
    the chain, but their hash is not recomputed: the payload it covered is gone."""
    expected_seq = start_seq
    prev = start_prev
    for link in links:
        if link.seq != expected_seq:
            kind = "missing" if link.seq > expected_seq else "out of order or repeated"
            return ChainBreak(expected_seq, f"{kind} entry (found seq {link.seq})")
        if link.prev_hash != prev:
            return ChainBreak(link.seq, "previous-hash does not match the entry before it")
        if link.seq not in unhashable and (
            link_hash(link.prev_hash, link.seq, link.payload) != link.hash
        ):
            return ChainBreak(link.seq, "content does not match its hash (edited)")
        prev = link.hash
        expected_seq += 1
    return None


def checkpoint_message(chain_name: str, seq: int, head: bytes) -> bytes:
    return f"stanzaguard-checkpoint-v1\n{chain_name}\n{seq}\n{head.hex()}".encode()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain_name: str
    seq: int
    head: bytes
    signature: bytes

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(
                self.signature, checkpoint_message(self.chain_name, self.seq, self.head)
            )
        except InvalidSignature:
            return False
        return True


class CheckpointSigner:
    """Signs chain heads with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> CheckpointSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> CheckpointSigner:
        key = load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the signing key is not an Ed25519 private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def sign(self, chain_name: str, seq: int, head: bytes) -> Checkpoint:
        signature = self._key.sign(checkpoint_message(chain_name, seq, head))
        return Checkpoint(chain_name, seq, head, signature)
