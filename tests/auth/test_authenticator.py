"""The authenticator and rate limiter as units: methods per deployment, settings checks."""

from __future__ import annotations

import os

import httpx
import pytest

from keygrants.access import open_access
from keygrants.auth import RequestContext, ensure_admin_token
from keygrants.auth.authenticator import Authenticator, AuthRequest, AuthSettings
from keygrants.auth.ratelimit import RateLimiter
from keygrants.client._signing import SignatureAuth
from keygrants.crypto.signing import SigningKey
from keygrants.errors import RateLimited, Unauthenticated
from keygrants.models import AddPublicKeyRequest, CreateApiKeyRequest, CreatePrincipalRequest
from keygrants.store.memory import MemoryStore

ADMIN = RequestContext(principal="admin")


def _setup(methods: frozenset[str]) -> tuple[Authenticator, str, httpx.Request]:
    store = MemoryStore()
    ensure_admin_token(store)
    access = open_access(store, os.urandom(32), settings=AuthSettings(methods=methods))
    access.service.create_principal(ADMIN, CreatePrincipalRequest(id="svc"))
    key = SigningKey.generate("ed25519")
    cred = access.service.add_public_key(ADMIN, "svc", AddPublicKeyRequest(
        public_key=key.public_key().public_pem()))
    api_key = access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest()).api_key
    request = httpx.Request("GET", "http://test/v1/whoami")
    SignatureAuth(str(cred.keyid), key).sign(request)
    return access.authenticator, api_key, request


def _signed(request: httpx.Request) -> AuthRequest:
    headers = {k.lower(): v for k, v in request.headers.items()}
    return AuthRequest(method="GET", target_uri=str(request.url),
                       signature_input=headers["signature-input"],
                       signature=headers["signature"], headers=lambda: headers)


def test_each_method_is_enabled_per_deployment() -> None:
    authn, api_key, request = _setup(frozenset({"api_key", "admin_token"}))
    with pytest.raises(Unauthenticated) as info:
        authn.authenticate(_signed(request))
    assert info.value.code == "unauthenticated"
    assert authn.authenticate(AuthRequest(method="GET", target_uri="",
                                          authorization=f"Bearer {api_key}")).principal == "svc"

    authn, api_key, request = _setup(frozenset({"signature", "admin_token"}))
    assert authn.authenticate(_signed(request)).auth_method == "signature"
    with pytest.raises(Unauthenticated) as info:
        authn.authenticate(AuthRequest(method="GET", target_uri="",
                                       authorization=f"Bearer {api_key}"))
    assert info.value.code == "unauthenticated"


@pytest.mark.parametrize("kwargs", [{"methods": frozenset({"kerberos"})}, {"max_skew": 0},
                                    {"max_signature_lifetime": 99999}, {"nonce_cache_size": 0}])
def test_bad_settings_fail_in_the_constructor(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AuthSettings(**kwargs)  # type: ignore[arg-type]


def test_the_token_bucket_refills_and_exempts_the_admin() -> None:
    now = [0.0]
    limiter = RateLimiter(10, 2, clock=lambda: now[0])
    limiter.take("svc")
    limiter.take("svc")
    with pytest.raises(RateLimited) as info:
        limiter.take("svc")
    assert info.value.retry_after == pytest.approx(0.1)
    limiter.take("other")  # buckets are per principal
    for _ in range(100):
        limiter.take("admin")
    now[0] += 0.1
    limiter.take("svc")
    with pytest.raises(ValueError):
        RateLimiter(0, 1)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)


def _certificate() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "billing")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_certificate_moved_to_another_principal_stays_theirs_after_a_reload() -> None:
    """The revoked mapping of the certificate's old principal, read after the live one on a
    reload (store order), used to replace it: the certificate was refused as revoked, and a
    third principal could map it while the second still held it."""
    from keygrants.access import reload_access
    from keygrants.auth.credentials import certificate_fingerprint
    from keygrants.errors import AlreadyExists
    from keygrants.models import AddCertificateRequest

    store = MemoryStore()
    ensure_admin_token(store)
    access = open_access(store, os.urandom(32),
                         settings=AuthSettings(methods=frozenset({"mtls", "admin_token"})))
    der = _certificate()
    match = certificate_fingerprint(der)
    for principal in ("zed-old", "bob", "carol"):  # the old owner sorts after the new one
        access.service.create_principal(ADMIN, CreatePrincipalRequest(id=principal))
    old = access.service.add_certificate(ADMIN, "zed-old", AddCertificateRequest(match=match))
    access.service.revoke_credential(ADMIN, "zed-old", old.id)
    access.service.add_certificate(ADMIN, "bob", AddCertificateRequest(match=match))
    request = AuthRequest(method="GET", target_uri="", client_cert=der)
    assert access.authenticator.authenticate(request).principal == "bob"
    reload_access(access, store)  # a restart, or a peer node's change message
    assert access.authenticator.authenticate(request).principal == "bob"
    with pytest.raises(AlreadyExists):
        access.service.add_certificate(ADMIN, "carol", AddCertificateRequest(match=match))
    access.service.revoke_credential(ADMIN, "zed-old", old.id)  # re-indexing the old one
    assert access.authenticator.authenticate(request).principal == "bob"


def test_a_reload_picks_up_an_admin_token_reset_by_another_node() -> None:
    """A node restarted with --reset-admin-token changes the digest in the shared store; the
    others read it again on their reload, so the old token stops working there too."""
    from keygrants.access import reload_access
    from keygrants.auth import reset_admin_token
    from keygrants.errors import UnknownCredential

    store = MemoryStore()
    old_token = ensure_admin_token(store)
    assert old_token is not None
    access = open_access(store, os.urandom(32))

    def as_admin(token: str) -> AuthRequest:
        return AuthRequest(method="GET", target_uri="", authorization=f"Bearer {token}")

    assert access.authenticator.authenticate(as_admin(old_token)).principal == "admin"
    new_token = reset_admin_token(store)  # on another node
    reload_access(access, store)  # that node's change message
    with pytest.raises(UnknownCredential):
        access.authenticator.authenticate(as_admin(old_token))
    assert access.authenticator.authenticate(as_admin(new_token)).principal == "admin"
