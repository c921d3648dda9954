"""Signatures over a cache's fingerprint (cache/signature.py): a resealed cache verifies against no trusted key."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.errors import SignatureError

pytest.importorskip("cryptography")

from fusion_cache.cache.signature import SIGNATURES_NAME  # noqa: E402
from fusion_cache.cache.signature import generate_key  # noqa: E402
from fusion_cache.cache.signature import sign_cache  # noqa: E402
from fusion_cache.cache.signature import verify_signature  # noqa: E402


@pytest.fixture
def signed(synthetic_caches, tmp_path):
    """A copy of a synthetic cache signed by key ``a``; returns (cache, a's public key, b's public key)."""
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_caches["raw"], cache)
    _, pub_a = generate_key(tmp_path / "keys" / "a")
    _, pub_b = generate_key(tmp_path / "keys" / "b")
    sign_cache(str(cache), tmp_path / "keys" / "a")
    return cache, pub_a, pub_b


def test_keys_are_private_and_never_overwritten(tmp_path):
    private, public = generate_key(tmp_path / "k")
    assert os.stat(private).st_mode & 0o777 == 0o600 and public.read_text().startswith("ssh-ed25519 ")
    with pytest.raises(ConfigError, match="exists; a key is never overwritten"):
        generate_key(tmp_path / "k")


def test_a_signed_cache_verifies_with_its_key_only(signed):
    cache, pub_a, pub_b = signed
    assert len(verify_signature(str(cache), [pub_b, pub_a])) == 16  # the id of the key that signed
    with pytest.raises(SignatureError, match=r"1 signature\(s\), none by a trusted key"):
        verify_signature(str(cache), [pub_b])
    with pytest.raises(ConfigError, match="--trusted-key: give at least one"):
        verify_signature(str(cache), [])


def test_a_resealed_cache_is_refused_when_a_key_is_required(signed, reseal):
    """The attack the checksums cannot stop: edit, recompute every checksum and both fingerprints, keep the old
    signatures.json. The manifest loads (it is consistent), but its fingerprint is not the one that was signed."""
    cache, pub_a, _ = signed

    def edit(m):  # the field that decides whether cached ids are fed to the student as its own
        m["teacher"]["tokenizer_hash"] = "1" * 64

    reseal(cache, edit=edit)
    with pytest.raises(SignatureError, match="signed fingerprint .*, not this one.*changed after it was signed"):
        verify_signature(str(cache), [pub_a])


def test_a_forged_or_malformed_signatures_file_is_refused(signed):
    cache, pub_a, _ = signed
    path = cache / SIGNATURES_NAME
    doc = json.loads(path.read_text())
    doc["signatures"][0]["signature"] = doc["signatures"][0]["signature"][::-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="not this one"):
        verify_signature(str(cache), [pub_a])
    path.write_text("[1, 2]")
    with pytest.raises(SignatureError, match="must be"):
        verify_signature(str(cache), [pub_a])
