"""``gcp-kms:`` specifics: CRC32C integrity checks, the AAD mechanism, signing names.

Run against the in-repo fake Cloud KMS (``fake_gcp_kms.py``), not against Google: no
emulator exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports.grpc import (
    KeyManagementServiceGrpcTransport,
)

from keygrants.errors import DecryptionError, EncryptionError, KMSError, UnsupportedOperation
from keygrants.keys.context import canonical_context
from keygrants.providers import open_provider
from keygrants.providers.gcp import MAX_CIPHERTEXT, GcpKmsProvider, crc32c
from keygrants.providers.models import EncryptedData, KeyReference

if TYPE_CHECKING:
    from conftest import FakeGcp

pytestmark = pytest.mark.anyio

RING = "projects/kg-test/locations/global/keyRings/ring"


def test_crc32c_vectors() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


@pytest.mark.parametrize(("uri", "message"), [
    ("gcp-kms://projects/p/keyRings/r/cryptoKeys/k", "must be projects/"),
    ("gcp-kms:projects/p/locations/l/keyRings/r/cryptoKeys/k", "URI must be"),
    (f"gcp-kms://{RING}/cryptoKeys/k?insecure=perhaps", "true or false"),
    (f"gcp-kms://{RING}/cryptoKeys/k?project=x", "unknown URI option"),
])
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_provider(uri)


def test_uri_round_trip() -> None:
    uri = f"gcp-kms://{RING}/cryptoKeys/k?endpoint=127.0.0.1%3A9&insecure=true"
    p = GcpKmsProvider.from_uri(uri)
    assert p.uri == uri and p.default_key_id == f"{RING}/cryptoKeys/k"


async def test_the_context_is_the_additional_authenticated_data(gcp_honest: FakeGcp) -> None:
    p = open_provider(gcp_honest.uri())
    ctx = {"tenant": "42", "a": "b"}
    enc = await p.encrypt(b"secret", context=ctx)
    channel = grpc.insecure_channel(gcp_honest.endpoint)
    client = kms_v1.KeyManagementServiceClient(
        transport=KeyManagementServiceGrpcTransport(host=gcp_honest.endpoint, channel=channel))
    out = client.decrypt(request={"name": f"{RING}/cryptoKeys/enc", "ciphertext": enc.ciphertext,
                                  "additional_authenticated_data": canonical_context(ctx)},
                         timeout=5)
    assert out.plaintext == b"secret"
    channel.close()
    await p.close()


@pytest.mark.parametrize("lie", ["ciphertext_crc", "unverified", "name"])
async def test_a_corrupted_encrypt_is_caught(gcp_honest: FakeGcp, lie: str) -> None:
    p = open_provider(gcp_honest.uri())
    gcp_honest.fake.corrupt = lie
    with pytest.raises(EncryptionError, match="corrupted"):
        await p.encrypt(b"secret", context={"a": "b"})
    await p.close()


async def test_a_corrupted_decrypt_is_caught(gcp_honest: FakeGcp) -> None:
    p = open_provider(gcp_honest.uri())
    enc = await p.encrypt(b"secret")
    gcp_honest.fake.corrupt = "plaintext_crc"
    with pytest.raises(DecryptionError):
        await p.decrypt(enc)
    await p.close()


@pytest.mark.parametrize("lie", ["ciphertext_crc", "unverified"])
async def test_a_corrupted_signature_is_caught(gcp_honest: FakeGcp, lie: str) -> None:
    p = open_provider(gcp_honest.uri())
    gcp_honest.fake.corrupt = lie
    with pytest.raises(KMSError, match="corrupted"):
        await p.sign(b"message", key_id=f"{RING}/cryptoKeys/sig/cryptoKeyVersions/1")
    await p.close()


async def test_signing_names(gcp_honest: FakeGcp) -> None:
    p = open_provider(gcp_honest.uri())
    with pytest.raises(ValueError, match="cryptoKeyVersions"):
        await p.sign(b"message", key_id=f"{RING}/cryptoKeys/sig")
    with pytest.raises(UnsupportedOperation):
        await p.sign(b"message", key_id=f"{RING}/cryptoKeys/enc/cryptoKeyVersions/1")
    signing = open_provider(gcp_honest.uri("sig"))
    with pytest.raises(UnsupportedOperation, match="ENCRYPT_DECRYPT"):
        await signing.initialize()
    await p.close()
    await signing.close()


async def test_no_retries_behind_the_callers_back(gcp_honest: FakeGcp) -> None:
    """A failed call is one request: the library's default retry policy is off."""
    p = open_provider(gcp_honest.uri())
    enc = await p.encrypt(b"secret")
    before = len(gcp_honest.fake.requests)
    with pytest.raises(DecryptionError):
        await p.decrypt(enc, context={"wrong": "context"})
    assert gcp_honest.fake.requests[before:] == ["Decrypt"]
    await p.close()


async def test_an_oversized_ciphertext_is_refused_before_its_checksum(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CRC32C is pure Python on the event loop: a record over Cloud KMS's limit never gets
    that far (and never reaches the network: the endpoint here is closed)."""
    checksummed: list[int] = []

    def spy(data: bytes) -> int:
        checksummed.append(len(data))
        return crc32c(data)

    monkeypatch.setattr("keygrants.providers.gcp.crc32c", spy)
    p = GcpKmsProvider(f"{RING}/cryptoKeys/k", endpoint="127.0.0.1:9", insecure=True, timeout=1)
    record = EncryptedData(ciphertext=bytes(MAX_CIPHERTEXT + 1),
                           key_reference=KeyReference("gcp-kms", f"{RING}/cryptoKeys/k"),
                           algorithm="GOOGLE_SYMMETRIC_ENCRYPTION")
    with pytest.raises(DecryptionError):
        await p.decrypt(record)
    assert checksummed == []
    await p.close()


async def test_a_ciphertext_at_the_limit_is_sent(gcp_honest: FakeGcp) -> None:
    """The limit refuses only what Cloud KMS would: a record of exactly MAX_CIPHERTEXT bytes
    still goes to the server (which finds it invalid)."""
    p = open_provider(gcp_honest.uri())
    before = len(gcp_honest.fake.requests)
    record = EncryptedData(ciphertext=bytes(MAX_CIPHERTEXT),
                           key_reference=KeyReference("gcp-kms", f"{RING}/cryptoKeys/enc"),
                           algorithm="GOOGLE_SYMMETRIC_ENCRYPTION")
    with pytest.raises(DecryptionError):
        await p.decrypt(record)
    assert gcp_honest.fake.requests[before:] == ["Decrypt"]
    await p.close()
