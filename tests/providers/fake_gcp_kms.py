"""A fake Cloud KMS gRPC server for the ``gcp-kms:`` provider tests (no emulator exists).

It speaks the real wire protocol: the service path ``google.cloud.kms.v1.KeyManagementService``
and the request/response messages of ``google.cloud.kms_v1`` (the client library's own
types, serialized exactly as the client's gRPC transport does). It implements only what the
provider calls: ``GetCryptoKey``, ``GetCryptoKeyVersion``, ``Encrypt``, ``Decrypt`` (AES-256-GCM
with a key held here, the additional authenticated data bound) and ``AsymmetricSign`` (ECDSA
P-256 over a SHA-256 digest), with Cloud KMS's CRC32C integrity fields: request checksums are
checked (``INVALID_ARGUMENT`` on mismatch) and acknowledged in the ``verified_*`` flags, and
responses carry their own checksums. Any other method answers ``UNIMPLEMENTED``.

``corrupt`` makes the next responses lie, to test the client-side integrity checks.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud import kms_v1

from keygrants.providers.gcp import crc32c

SERVICE = "google.cloud.kms.v1.KeyManagementService"
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm


@dataclass
class _Version:
    algorithm: Any
    aes: bytes | None = None
    ec: ec.EllipticCurvePrivateKey | None = None


@dataclass
class _Key:
    purpose: Any
    versions: dict[str, _Version] = field(default_factory=dict)
    primary: str | None = None


class FakeKms:
    """The fake's state and RPC handlers."""

    def __init__(self) -> None:
        self.keys: dict[str, _Key] = {}
        self.corrupt: str | None = None  # "ciphertext_crc", "unverified", "plaintext_crc", "name"
        self.requests: list[str] = []
        self._lock = threading.Lock()

    # -- admin (tests) ---------------------------------------------------------------------
    def create_key(self, name: str, purpose: Any = Purpose.ENCRYPT_DECRYPT) -> str:
        key = _Key(purpose=purpose)
        if purpose == Purpose.ENCRYPT_DECRYPT:
            key.versions["1"] = _Version(Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                                         aes=AESGCM.generate_key(256))
            key.primary = "1"
        else:
            key.versions["1"] = _Version(Algorithm.EC_SIGN_P256_SHA256,
                                         ec=ec.generate_private_key(ec.SECP256R1()))
        self.keys[name] = key
        return name

    def public_key(self, version_name: str) -> ec.EllipticCurvePublicKey:
        key_name, _, version = version_name.partition("/cryptoKeyVersions/")
        private = self.keys[key_name].versions[version].ec
        assert private is not None
        return private.public_key()

    # -- helpers -------------------------------------------------------------------------
    def _key(self, name: str, context: grpc.ServicerContext) -> _Key:
        key = self.keys.get(name)
        if key is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{name} not found")
        return key

    @staticmethod
    def _check_crc(request: Any, data_field: str, crc_field: str,
                   context: grpc.ServicerContext) -> bool:
        if crc_field not in request:
            return False
        if getattr(request, crc_field) != crc32c(getattr(request, data_field)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{crc_field} did not match")
        return True

    def _lie(self, what: str) -> bool:
        return self.corrupt == what

    # -- RPCs ----------------------------------------------------------------------------
    def get_crypto_key(self, request: kms_v1.GetCryptoKeyRequest,
                       context: grpc.ServicerContext) -> kms_v1.CryptoKey:
        self.requests.append("GetCryptoKey")
        key = self._key(request.name, context)
        out = kms_v1.CryptoKey(name=request.name, purpose=key.purpose)
        if key.primary:
            out.primary = kms_v1.CryptoKeyVersion(
                name=f"{request.name}/cryptoKeyVersions/{key.primary}",
                algorithm=key.versions[key.primary].algorithm)
        return out

    def get_crypto_key_version(self, request: kms_v1.GetCryptoKeyVersionRequest,
                               context: grpc.ServicerContext) -> kms_v1.CryptoKeyVersion:
        self.requests.append("GetCryptoKeyVersion")
        key_name, _, version = request.name.partition("/cryptoKeyVersions/")
        key = self._key(key_name, context)
        if version not in key.versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        return kms_v1.CryptoKeyVersion(name=request.name, algorithm=key.versions[version].algorithm)

    def encrypt(self, request: kms_v1.EncryptRequest,
                context: grpc.ServicerContext) -> kms_v1.EncryptResponse:
        self.requests.append("Encrypt")
        key = self._key(request.name, context)
        if key.purpose != Purpose.ENCRYPT_DECRYPT or key.primary is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not an ENCRYPT_DECRYPT key")
        verified_pt = self._check_crc(request, "plaintext", "plaintext_crc32c", context)
        verified_aad = self._check_crc(request, "additional_authenticated_data",
                                       "additional_authenticated_data_crc32c", context)
        version = key.primary
        aes = key.versions[version].aes
        assert aes is not None
        header = b"\x01" + struct.pack(">I", int(version))
        nonce = os.urandom(12)
        ciphertext = header + nonce + AESGCM(aes).encrypt(
            nonce, request.plaintext, header + request.additional_authenticated_data)
        crc = crc32c(ciphertext) ^ (1 if self._lie("ciphertext_crc") else 0)
        name = f"{request.name}/cryptoKeyVersions/{version}"
        if self._lie("name"):
            name = name.replace("cryptoKeys/", "cryptoKeys/x")
        unverified = self._lie("unverified")
        return kms_v1.EncryptResponse(
            name=name, ciphertext=ciphertext, ciphertext_crc32c=crc,
            verified_plaintext_crc32c=verified_pt and not unverified,
            verified_additional_authenticated_data_crc32c=verified_aad and not unverified)

    def decrypt(self, request: kms_v1.DecryptRequest,
                context: grpc.ServicerContext) -> kms_v1.DecryptResponse:
        self.requests.append("Decrypt")
        key = self._key(request.name, context)
        self._check_crc(request, "ciphertext", "ciphertext_crc32c", context)
        self._check_crc(request, "additional_authenticated_data",
                        "additional_authenticated_data_crc32c", context)
        blob = request.ciphertext
        version = str(struct.unpack(">I", blob[1:5])[0]) if len(blob) >= 5 else ""
        entry = key.versions.get(version)
        if blob[:1] != b"\x01" or entry is None or entry.aes is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed")
        try:
            plaintext = AESGCM(entry.aes).decrypt(
                blob[5:17], blob[17:], blob[:5] + request.additional_authenticated_data)
        except (InvalidTag, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed")
        crc = crc32c(plaintext) ^ (1 if self._lie("plaintext_crc") else 0)
        return kms_v1.DecryptResponse(plaintext=plaintext, plaintext_crc32c=crc)

    def asymmetric_sign(self, request: kms_v1.AsymmetricSignRequest,
                        context: grpc.ServicerContext) -> kms_v1.AsymmetricSignResponse:
        self.requests.append("AsymmetricSign")
        key_name, _, version = request.name.partition("/cryptoKeyVersions/")
        key = self._key(key_name, context)
        entry = key.versions.get(version)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        if entry.ec is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not an ASYMMETRIC_SIGN key")
        digest = request.digest.sha256
        if len(digest) != 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a SHA-256 digest")
        if "digest_crc32c" in request and request.digest_crc32c != crc32c(digest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest_crc32c did not match")
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        signature = entry.ec.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        crc = crc32c(signature) ^ (1 if self._lie("ciphertext_crc") else 0)
        return kms_v1.AsymmetricSignResponse(
            name=request.name, signature=signature, signature_crc32c=crc,
            verified_digest_crc32c="digest_crc32c" in request and not self._lie("unverified"))


def _handler(fn: Callable[..., Any], request_type: Any, response_type: Any
             ) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request_type.deserialize,
        response_serializer=response_type.serialize)


def serve(fake: FakeKms) -> tuple[grpc.Server, int]:
    """Start the fake on a free loopback port; returns the server (call ``stop``) and port."""
    handlers = {
        "GetCryptoKey": _handler(fake.get_crypto_key, kms_v1.GetCryptoKeyRequest,
                                 kms_v1.CryptoKey),
        "GetCryptoKeyVersion": _handler(fake.get_crypto_key_version,
                                        kms_v1.GetCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
        "Encrypt": _handler(fake.encrypt, kms_v1.EncryptRequest, kms_v1.EncryptResponse),
        "Decrypt": _handler(fake.decrypt, kms_v1.DecryptRequest, kms_v1.DecryptResponse),
        "AsymmetricSign": _handler(fake.asymmetric_sign, kms_v1.AsymmetricSignRequest,
                                   kms_v1.AsymmetricSignResponse),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
