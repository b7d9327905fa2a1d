"""HKDF-SHA256 bounds and salt handling, scrypt against RFC 7914 (Wycheproof HKDF elsewhere)."""

from __future__ import annotations

import pytest

from keygrants.crypto import hkdf_sha256, scrypt_derive
from keygrants.crypto.kdf import HKDF_MAX_LENGTH

IKM = bytes(range(22))


@pytest.mark.parametrize("length", [0, -1, HKDF_MAX_LENGTH + 1])
def test_hkdf_refuses_lengths_out_of_range(length: int) -> None:
    with pytest.raises(ValueError):
        hkdf_sha256(IKM, salt=None, info=b"", length=length)


def test_hkdf_length_bounds_are_inclusive() -> None:
    assert HKDF_MAX_LENGTH == 8160
    assert len(hkdf_sha256(IKM, salt=None, info=b"", length=1)) == 1
    longest = hkdf_sha256(IKM, salt=None, info=b"", length=HKDF_MAX_LENGTH)
    assert len(longest) == HKDF_MAX_LENGTH
    # HKDF-Expand output is a stream: a shorter request is a prefix of a longer one.
    assert hkdf_sha256(IKM, salt=None, info=b"", length=42) == longest[:42]


def test_hkdf_absent_salt_is_hashlen_zeros() -> None:
    # RFC 5869 2.2: "if not provided, [salt] is set to a string of HashLen zeros".
    expected = hkdf_sha256(IKM, salt=bytes(32), info=b"i", length=32)
    assert hkdf_sha256(IKM, salt=None, info=b"i", length=32) == expected
    assert hkdf_sha256(IKM, salt=b"", info=b"i", length=32) == expected
    assert hkdf_sha256(IKM, salt=b"\x01", info=b"i", length=32) != expected


@pytest.mark.parametrize(
    ("passphrase", "salt", "n", "r", "p", "expected"),
    [
        pytest.param(
            b"", b"", 16, 1, 1,
            "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
            "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906",
            id="rfc7914-1",
        ),
        pytest.param(
            b"password", b"NaCl", 1024, 8, 16,
            "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
            "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
            id="rfc7914-2",
        ),
    ],
)
def test_scrypt_rfc7914(passphrase: bytes, salt: bytes, n: int, r: int, p: int,
                        expected: str) -> None:
    out = scrypt_derive(passphrase, salt=salt, n=n, r=r, p=p, length=64)
    assert out == bytes.fromhex(expected)


def test_scrypt_default_length_is_a_key() -> None:
    assert len(scrypt_derive(b"pw", salt=b"salt", n=16, r=1, p=1)) == 32
