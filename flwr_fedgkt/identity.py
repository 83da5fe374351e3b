"""A node's proof that it holds its key: trust on first use with a signing key.

A node key (by default the node's ``partition-id``) is a name anyone can say. So
that no node can speak for another's key, every node also holds a secret: an
Ed25519 signing key it generates the first time it needs one and keeps in its
state (Flower's ``context.state`` and, with ``client-state-dir``, a file
``identity-<node key>.key`` there, so that a restarted node keeps it). Each reply
and key-query answer carries the node's public key and a signature over a
statement naming the message's kind, the node key, the Flower node id and the
round (:func:`statement`); the secret itself never leaves the node.

The server binds a key to the first public key that proves it (trust on first
use) and keeps that public key as the key's verifier, checkpointed with the
run: later replies under the key must prove the same public key, also after a
restart of the federation (new node ids). Without SuperNode authentication, the
very first contact of a key is not protected: a node that names another's key
before that node ever answered takes it (the real node is then refused, loudly).

This module imports no Flower code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .files import write_atomic

__all__ = [
    "PROOF_KEY",
    "PUBLIC_KEY",
    "NodeIdentity",
    "identity_file",
    "statement",
    "verify_proof",
]

PUBLIC_KEY = "node-public-key"
"""The meta entry holding the node's public key (hex, 32 bytes)."""
PROOF_KEY = "node-proof"
"""The meta entry holding the node's signature over :func:`statement` (hex)."""

_HEX = re.compile(r"[0-9a-f]*")


def statement(kind: str, node_key: str, node_id: int, server_round: int) -> bytes:
    """What a node signs for one message: its kind (``query``, ``train`` or
    ``evaluate``), the node key it speaks for, its Flower node id and the round
    (0 for a key query). A signature made for one message proves nothing for
    another node id, kind or round."""
    return f"flwr-fedgkt/1|{kind}|{node_key}|{int(node_id)}|{int(server_round)}".encode()


def verify_proof(public_hex: object, proof_hex: object, message: bytes) -> bool:
    """Whether ``proof_hex`` is a valid signature of ``message`` by ``public_hex``
    (both hex text as a reply carries them; anything else is no proof)."""
    if not isinstance(public_hex, str) or not isinstance(proof_hex, str):
        return False
    if len(public_hex) != 64 or len(proof_hex) != 128:
        return False
    if not (_HEX.fullmatch(public_hex) and _HEX.fullmatch(proof_hex)):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(proof_hex), message
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def identity_file(state_dir: str | os.PathLike, node_key: str) -> Path:
    """Where a node keeps its secret in ``client-state-dir``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node_key)
    return Path(state_dir) / f"identity-{safe}.key"


class NodeIdentity:
    """A node's signing key.

    Parameters
    ----------
    secret : bytes
        The 32-byte Ed25519 private key.
    """

    SECRET_BYTES = 32

    def __init__(self, secret: bytes) -> None:
        if len(secret) != self.SECRET_BYTES:
            raise ValueError(f"a node identity is {self.SECRET_BYTES} bytes, not {len(secret)}")
        self.secret = bytes(secret)
        self._key = Ed25519PrivateKey.from_private_bytes(self.secret)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A new identity from the operating system's random source."""
        return cls(os.urandom(cls.SECRET_BYTES))

    @classmethod
    def kept(
        cls, held: bytes | None, state_dir: str | os.PathLike | None, node_key: str
    ) -> NodeIdentity:
        """The node's identity: ``held`` (its own state, e.g. ``context.state``),
        else the file in ``state_dir`` (a restarted node), else a new one, which is
        written to ``state_dir`` (readable by its owner only)."""
        if held:
            return cls(held)
        path = identity_file(state_dir, node_key) if state_dir else None
        if path is not None and path.exists():
            return cls(path.read_bytes())
        identity = cls.generate()
        if path is not None:
            write_atomic(path, lambda handle: handle.write(identity.secret), fsync=True)
            path.chmod(0o600)
        return identity

    @property
    def public_hex(self) -> str:
        """The public key, as hex text (the server's verifier for the node key)."""
        from cryptography.hazmat.primitives import serialization

        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()

    def prove(self, kind: str, node_key: str, node_id: int, server_round: int) -> dict[str, str]:
        """The meta entries that prove this node holds ``node_key`` for one message."""
        signature = self._key.sign(statement(kind, node_key, node_id, server_round))
        return {PUBLIC_KEY: self.public_hex, PROOF_KEY: signature.hex()}
