"""The Ed25519 key that signs chain checkpoints: generated once, kept in the data directory."""

from __future__ import annotations

import os
from pathlib import Path

from archive_api.store.chain import CheckpointSigner
from stanzaguard.errors import SettingsError


def load_or_create_signer(keys_dir: Path) -> CheckpointSigner:
    """The signing key in `keys_dir`, made on first start (mode 0600, public key beside it)."""
    private = keys_dir / "checkpoint-signing.pem"
    public = keys_dir / "checkpoint-signing.pub.pem"
    if private.exists():
        try:
            return CheckpointSigner.from_pem(private.read_bytes())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"signing key: cannot load {private}: {exc}") from None
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signer = CheckpointSigner.generate()
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(signer.private_pem())
        handle.flush()
        os.fsync(handle.fileno())
    public.write_bytes(signer.public_pem())
    return signer


def load_public_key(keys_dir: Path) -> bytes | None:
    public = keys_dir / "checkpoint-signing.pub.pem"
    return public.read_bytes() if public.exists() else None
