"""Signatures over a cache's fingerprint: who vouches for a cache that came from elsewhere (ed25519).

    fusion-cache keygen --out ~/.keys/team-a            # team-a (private, mode 0600) and team-a.pub
    fusion-cache sign ./cache/qwen --key ~/.keys/team-a
    fusion-cache verify ./cache/qwen --trusted-key team-a.pub
    fusion-cache train ... --require-signature --trusted-key team-a.pub

Checksums and fingerprints detect damage, not intent: their formulas are public, so whoever edits a cache can
reseal its manifest. A signature binds a key holder to one fingerprint, and the fingerprint covers everything a
reader trusts (the config fingerprint, which covers the teacher block, the dataset, K, the codec and the length
policy; every shard's path, rows and sha256, each of which the reader checks against the shard's bytes). A resealed
cache has another fingerprint, so no signature of a trusted key verifies it.

``signatures.json`` in the cache directory holds one entry per key: ``{"key_id", "public_key" (base64 of the raw
32-byte ed25519 key), "fingerprint", "signature" (base64 of the ed25519 signature of
``b"fusion-cache signature v1\\n" + fingerprint``)}``. It is not covered by the fingerprint (it signs it), and a
signature is only as good as the trust in its key: `verify_signature` accepts only the keys it is given.

Needs the `cryptography` package (``pip install 'fusion-cache[sign]'``), imported only here, when used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.errors import SignatureError

SIGNATURES_NAME = "signatures.json"
DOMAIN = b"fusion-cache signature v1\n"  # signed before the fingerprint: a signature means nothing elsewhere


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise MissingDependencyError(
            "cache signatures need the `cryptography` package: pip install 'fusion-cache[sign]'"
        ) from e
    return ed25519, serialization, InvalidSignature


def key_id(raw_public: bytes) -> str:
    """The first 16 hex characters of the sha256 of a raw public key: how messages and files name a key."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def generate_key(out: str | Path) -> tuple[Path, Path]:
    """Write a new ed25519 key pair: ``out`` (PKCS#8 PEM, mode 0600) and ``out.pub`` (one OpenSSH line).

    Raises:
        ConfigError: ``out`` or ``out.pub`` exists (a key is never overwritten).
    """
    ed25519, serialization, _ = _crypto()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for path in (out, pub):
        if path.exists():
            raise ConfigError(f"--out {path}: exists; a key is never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub.write_bytes(line + b" fusion-cache\n")
    return out, pub


def load_private_key(path: str | Path):
    """An ed25519 private key from a PEM (PKCS#8) or OpenSSH file, unencrypted."""
    ed25519, serialization, _ = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--key {path}: cannot be read: {e}") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--key {path}: not an unencrypted PEM or OpenSSH private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"--key {path}: an ed25519 key is needed, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path):
    """An ed25519 public key from an OpenSSH line (``ssh-ed25519 AAAA...``) or a PEM file."""
    ed25519, serialization, _ = _crypto()
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"--trusted-key {path}: cannot be read: {e}") from None
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(b" ".join(data.split()[:2]))
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, binascii.Error) as e:
        raise ConfigError(f"--trusted-key {path}: not an OpenSSH or PEM public key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"--trusted-key {path}: an ed25519 key is needed, got {type(key).__name__}")
    return key


def _raw(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_signatures(loc: CacheLocation) -> list[dict]:
    """The entries of ``signatures.json`` (none when absent), each checked for its fields and types."""
    if not loc.exists(SIGNATURES_NAME):
        return []
    try:
        doc = json.loads(loc.read_bytes(SIGNATURES_NAME).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{loc}/{SIGNATURES_NAME}: unreadable: {e}") from None
    entries = doc.get("signatures") if isinstance(doc, dict) else None
    fields = ("key_id", "public_key", "fingerprint", "signature")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and all(isinstance(e.get(f), str) for f in fields) for e in entries
    ):
        raise SignatureError(f"{loc}/{SIGNATURES_NAME}: must be {{'signatures': [{{{', '.join(fields)}}}, ...]}}")
    return entries


def sign_cache(cache: str, key_path: str | Path) -> dict:
    """Sign the cache's fingerprint with the key at ``key_path`` and record it in ``signatures.json`` (replacing an
    earlier signature of the same key). The cache is loaded, so its manifest must be consistent; run
    ``fusion-cache verify`` first to check its shards too.

    Returns:
        The entry written.
    """
    key = load_private_key(key_path)
    loc = CacheLocation(str(cache))
    manifest = load_manifest(loc)
    raw = _raw(key.public_key())
    entry = {
        "key_id": key_id(raw),
        "public_key": base64.b64encode(raw).decode(),
        "fingerprint": manifest.fingerprint,
        "signature": base64.b64encode(key.sign(DOMAIN + manifest.fingerprint.encode())).decode(),
    }
    entries = [e for e in read_signatures(loc) if e["key_id"] != entry["key_id"]] + [entry]
    text = json.dumps({"signatures": entries}, indent=2, sort_keys=True) + "\n"
    if loc.local:
        tmp = Path(loc.join(f"{SIGNATURES_NAME}.{os.getpid()}.tmp"))
        tmp.write_text(text)
        os.replace(tmp, loc.join(SIGNATURES_NAME))
    else:
        loc.fs.pipe_file(loc.join(SIGNATURES_NAME), text.encode())
    return entry


def verify_signature(cache: str, trusted_keys: list[str | Path], fingerprint: str | None = None) -> str:
    """The key id of a trusted key whose signature in ``signatures.json`` verifies the cache's fingerprint.

    Args:
        cache: the cache directory or URL.
        trusted_keys: public key files (OpenSSH or PEM); only signatures of these keys count.
        fingerprint: the fingerprint to check (default: the cache's manifest's, loaded and validated here).

    Raises:
        ConfigError: no trusted key given, or a key file is unreadable.
        SignatureError: no signature of a trusted key verifies the fingerprint (none, another key's, a signature of
            another fingerprint: the cache was changed and resealed after it was signed).
    """
    _, _, invalid_signature = _crypto()
    if not trusted_keys:
        raise ConfigError("--trusted-key: give at least one public key whose signature is required")
    keys = {key_id(_raw(k)): k for k in (load_public_key(p) for p in trusted_keys)}
    loc = CacheLocation(str(cache))
    if fingerprint is None:
        fingerprint = load_manifest(loc).fingerprint
    entries = read_signatures(loc)
    seen = []
    for e in entries:
        key = keys.get(e["key_id"])
        if key is None:
            continue
        try:
            sig = base64.b64decode(e["signature"], validate=True)
            key.verify(sig, DOMAIN + fingerprint.encode())
        except (invalid_signature, binascii.Error, ValueError):
            seen.append(f"key {e['key_id']} signed fingerprint {e['fingerprint'][:16]}, not this one")
            continue
        return e["key_id"]
    why = "; ".join(seen) if seen else f"{len(entries)} signature(s), none by a trusted key ({', '.join(keys)})"
    raise SignatureError(
        f"{cache}: no valid signature of a trusted key over its fingerprint {fingerprint[:16]} ({why}); the cache is "
        "unsigned, signed by someone else, or was changed after it was signed"
    )
