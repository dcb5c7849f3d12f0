"""Ephemeral SSH key pairs for the build and validation VMs. They live in a private temporary
directory outside outputs/ and are deleted when the stage ends."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class KeyPair:
    private_key_file: Path
    public_key: str


@contextlib.contextmanager
def ephemeral_keypair(comment: str) -> Iterator[KeyPair]:
    """Yield a fresh ed25519 key pair whose private half is removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="factory-key-"))
    try:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        key_file = folder / "id_ed25519"
        key_file.touch(mode=0o600)
        key_file.write_bytes(private)
        yield KeyPair(key_file, f"{public.decode()} {comment}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
