"""HMAC-SHA256: RFC 4231 vector, and full-length-only verification (Wycheproof runs elsewhere)."""

from __future__ import annotations

import pytest

from keygrants.crypto import hmac_sha256, verify_hmac_sha256

# RFC 4231, test case 2.
KEY = b"Jefe"
MESSAGE = b"what do ya want for nothing?"
TAG = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_rfc4231_case_2() -> None:
    assert hmac_sha256(KEY, MESSAGE) == TAG
    assert verify_hmac_sha256(KEY, MESSAGE, TAG) is True


@pytest.mark.parametrize("length", range(32))
def test_truncated_tags_are_refused(length: int) -> None:
    assert verify_hmac_sha256(KEY, MESSAGE, TAG[:length]) is False


@pytest.mark.parametrize("tag", [TAG + b"\x00", TAG + TAG, bytes(32)])
def test_longer_or_wrong_tags_are_refused(tag: bytes) -> None:
    assert verify_hmac_sha256(KEY, MESSAGE, tag) is False


def test_every_bit_flip_is_refused() -> None:
    for position in range(32):
        for bit in range(8):
            tampered = bytearray(TAG)
            tampered[position] ^= 1 << bit
            assert verify_hmac_sha256(KEY, MESSAGE, bytes(tampered)) is False


def test_wrong_key_or_message_is_refused() -> None:
    assert verify_hmac_sha256(b"Jeff", MESSAGE, TAG) is False
    assert verify_hmac_sha256(KEY, MESSAGE + b"!", TAG) is False
