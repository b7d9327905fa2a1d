"""The local root key providers (key file, passphrase) and root key bootstrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keygrants.errors import SealError, UnsealFailed
from keygrants.providers import open_root_provider
from keygrants.providers.local import KeyFileProvider, PassphraseProvider
from keygrants.seal import open_root_key
from keygrants.store.memory import MemoryStore

PASS = "correct horse battery staple"


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    p = KeyFileProvider(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    blob = p.wrap(b"root", aad=b"aad")
    assert KeyFileProvider(path).unwrap(blob, aad=b"aad") == b"root"
    with pytest.raises(UnsealFailed):
        p.unwrap(blob, aad=b"other")
    with pytest.raises(UnsealFailed):
        p.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), aad=b"aad")


def test_key_file_with_loose_permissions_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(SealError, match="chmod 600"):
        KeyFileProvider(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(SealError, match="32-byte"):
        KeyFileProvider(path)


def test_passphrase_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYGRANTS_PASSPHRASE", raising=False)
    with pytest.raises(SealError, match="KEYGRANTS_PASSPHRASE"):
        PassphraseProvider()
    with pytest.raises(SealError, match="at least"):
        PassphraseProvider("short")
    blob = PassphraseProvider(PASS).wrap(b"root", aad=b"a")
    assert blob[0] == 0x02 and blob[17:20] == bytes([17, 8, 1])  # scrypt N=2**17, r=8, p=1
    monkeypatch.setenv("KEYGRANTS_PASSPHRASE", PASS)
    assert PassphraseProvider().unwrap(blob, aad=b"a") == b"root"
    with pytest.raises(UnsealFailed, match="wrong passphrase"):
        PassphraseProvider(PASS + "!").unwrap(blob, aad=b"a")
    tampered = blob[:17] + bytes([30]) + blob[18:]
    with pytest.raises(UnsealFailed):
        PassphraseProvider(PASS).unwrap(tampered, aad=b"a")


def test_open_root_provider_by_uri(tmp_path: Path) -> None:
    p = open_root_provider(f"local://{tmp_path / 'k'}")
    assert isinstance(p, KeyFileProvider) and p.uri == f"local://{(tmp_path / 'k').resolve()}"
    assert isinstance(open_root_provider("local:passphrase", passphrase=PASS), PassphraseProvider)
    with pytest.raises(ValueError, match="unknown seal provider"):
        open_root_provider("hsm:slot0")
    with pytest.raises(ValueError):
        open_root_provider("local:")


def test_root_key_first_start_then_reuse(tmp_path: Path) -> None:
    store = MemoryStore()
    provider = KeyFileProvider(tmp_path / "seal.key")
    root, created = open_root_key(store, provider)
    assert created and len(root) == 32
    again, created_again = open_root_key(store, provider)
    assert again == root and not created_again


def test_root_key_with_the_wrong_seal_says_which(tmp_path: Path) -> None:
    store = MemoryStore()
    open_root_key(store, PassphraseProvider(PASS))
    with pytest.raises(UnsealFailed, match="sealed with local:passphrase"):
        open_root_key(store, KeyFileProvider(tmp_path / "seal.key"))
    with pytest.raises(UnsealFailed, match="wrong passphrase"):
        open_root_key(store, PassphraseProvider(PASS + "x"))
