"""How the SDK connects: addresses (scheme, plain HTTP, malformed, userinfo), TLS settings,
which credentials it sends, key file modes, and what a failed request raises."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from keygrants import errors
from keygrants.auth.credentials import generate_shared_secret
from keygrants.client import AsyncClient, Client
from keygrants.client._connection import redact_address, server_url, tls_verify
from keygrants.client._signing import private_file_problem
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.crypto.signing import SigningKey

from .conftest import FakeKMS

pytestmark = pytest.mark.anyio
ENV = ("KEYGRANTS_ADDR", "KEYGRANTS_TOKEN", "KEYGRANTS_PRINCIPAL", "KEYGRANTS_KEY_FILE",
       "KEYGRANTS_GRANT", "KEYGRANTS_DPOP_KEY_FILE", "KEYGRANTS_ALLOW_INSECURE_HTTP")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the developer's shell exports stays out."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


class Recorder:
    """A MockTransport that records each request and answers ``random`` (or raises)."""

    def __init__(self, fail: Callable[[httpx.Request], Exception] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.fail = fail

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail(request)
        return httpx.Response(200, json={"random": "AAAA"})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def private_pem(tmp_path: Path, name: str = "svc.pem", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(SigningKey.generate("ed25519").private_pem())
    path.chmod(mode)
    return path


def ca_pem(tmp_path: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# -- addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("addr", ["kms.example:8443", "10.0.0.5:8650", "127.0.0.1:8650",
                                  "localhost:8650"])
def test_an_address_without_a_scheme_is_refused(addr: str, monkeypatch) -> None:
    """It used to mean plain http://, and the token went out in clear (to a TLS server too)."""
    expected = r"has no scheme: write https://HOST:PORT \(or http://127.0.0.1:PORT for a local"
    with pytest.raises(ValueError, match=expected):
        Client(addr, token="kg_admin_SECRET")
    with pytest.raises(ValueError, match=expected):
        AsyncClient(addr, token="kg_admin_SECRET")
    with pytest.raises(ValueError, match=expected):
        Verifier(addr)
    monkeypatch.setenv("KEYGRANTS_ADDR", addr)
    with pytest.raises(ValueError, match=expected):
        Client(token="kg_admin_SECRET")


@pytest.mark.parametrize("addr", ["http://kms.example:8443", "http://10.0.0.5:8650",
                                  "HTTP://KMS.example", "http://[2001:db8::1]:8650",
                                  "http://localhost.evil.example:8650"])
def test_plain_http_to_a_remote_host_is_refused_unless_allowed(addr: str, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"refusing plain http:// .* use https://, or pass "
                                         r"allow_insecure_http=True"):
        Client(addr, token="kg_admin_SECRET")
    with pytest.raises(ValueError, match="refusing plain http://"):
        AsyncClient(addr, token="kg_admin_SECRET")
    with pytest.raises(ValueError, match="refusing plain http://"):
        Verifier(addr, audience="svc-ledger")
    with pytest.raises(ValueError, match="refusing plain http://"):
        AsyncVerifier(addr, audience="svc-ledger")
    Client(addr, token="t", allow_insecure_http=True).close()
    Verifier(addr, allow_insecure_http=True).close()
    monkeypatch.setenv("KEYGRANTS_ALLOW_INSECURE_HTTP", "1")
    Client(addr, token="t").close()
    with pytest.raises(ValueError, match="refusing plain http://"):
        Verifier(addr)  # the variable is the clients' opt-in only


@pytest.mark.parametrize("addr", ["http://127.0.0.1:8650", "http://127.3.2.1:1", "http://[::1]:8650",
                                  "http://localhost:8650", "http://LOCALHOST", "https://kms.example",
                                  "https://10.0.0.5:8650/kms/", "https://[2001:db8::1]:8650",
                                  "https://bücher.example"])
def test_https_anywhere_and_plain_http_to_loopback_are_accepted(addr: str) -> None:
    with Client(addr, token="t") as c:
        assert c.addr == addr.rstrip("/")
    Verifier(addr).close()


async def test_a_transport_of_the_callers_own_decides_what_goes_on_the_wire() -> None:
    """httpx.MockTransport / ASGITransport with base http://test: the scheme is not checked."""
    recorder = Recorder()
    with Client("http://test", token="t", transport=recorder.transport()) as c:
        c.random(3)
    async with AsyncClient("http://kms.example", token="t", transport=recorder.transport()) as ac:
        await ac.random(3)
    assert [str(r.url) for r in recorder.requests] == ["http://test/v1/random",
                                                        "http://kms.example/v1/random"]
    with pytest.raises(ValueError, match="no scheme"):  # still an address, though
        Client("test", token="t", transport=recorder.transport())


@pytest.mark.parametrize(("addr", "reason"), [
    ("https://kms.example:84x3", "Invalid port"),
    ("https://127.0.0.1:notaport", "Invalid port"),
    ("http://[::1", "Invalid port"),
    ("https://kms.example:99999", "port must be 1 to 65535"),
    ("https://kms.example:0", "port must be 1 to 65535"),
    ("https://", "names no host"),
    ("https://:8650", "names no host"),
    ("https://kms example:8650", "not a host name"),
    ("https://kms.example:8650?x=1", "query or fragment"),
    ("ftp://kms.example", "has the scheme 'ftp'"),
    ("ws://127.0.0.1:8650", "has the scheme 'ws'"),
    ("://kms.example", "has no scheme"),
])
def test_a_malformed_address_is_a_value_error_at_construction(addr: str, reason: str) -> None:
    """Never httpx.InvalidURL (an Exception the CLI did not catch: a traceback)."""
    for build in (lambda: Client(addr, token="t"), lambda: AsyncClient(addr, token="t"),
                  lambda: Verifier(addr), lambda: AsyncVerifier(addr)):
        with pytest.raises(ValueError, match=reason):
            build()


def test_userinfo_in_the_address_never_appears_in_an_error(closed_port: int) -> None:
    with Client(f"http://user:s3cret@127.0.0.1:{closed_port}", token="t", timeout=5) as dead, \
            pytest.raises(errors.ServerUnreachable) as info:
        dead.random()
    assert "s3cret" not in str(info.value) and f"http://***@127.0.0.1:{closed_port}" in str(info.value)
    for addr in ("http://user:s3cret@kms.example", "https://user:s3cret@kms.example:x",
                 "user:s3cret@kms.example:8650", "ftp://user:s3cret@kms.example"):
        with pytest.raises(ValueError) as refused:
            Client(addr, token="t")
        assert "s3cret" not in str(refused.value) and "***@" in str(refused.value), addr
    assert redact_address("https://a:b@c@host:1/x@y") == "https://***@host:1/x@y"
    assert redact_address("https://host:1/p?u=a@b") == "https://host:1/p?u=a@b"


def test_server_url_strips_and_keeps_a_path() -> None:
    assert server_url(" https://kms.example:8650/ \n", allow_insecure_http=False,
                      own_transport=False) == "https://kms.example:8650"
    assert server_url("https://kms.example/prefix/", allow_insecure_http=False,
                      own_transport=False) == "https://kms.example/prefix"


# -- the verifier's issuer -------------------------------------------------------------------

def test_a_pinned_issuer_refuses_a_jwks_of_another_issuer() -> None:
    """An on-path answer carrying an attacker's key and issuer used to be believed."""
    kms = FakeKMS(lambda: 1_800_000_000.0)
    _, token = kms.mint()
    with Verifier("http://kms.internal:8650", audience="svc", issuer="urn:keygrants:ours",
                  transport=kms.transport(), clock=kms.clock) as v:
        with pytest.raises(errors.VerifierUnavailable,
                           match="the JWK Set names the issuer 'urn:keygrants:fake-kms', not "
                                 "the expected 'urn:keygrants:ours'"):
            v.verify(token, operation="decrypt")
        with pytest.raises(ValueError, match="not the expected"):
            v.refresh_keys()
    with Verifier("http://kms.internal:8650", audience="svc", issuer=FakeKMS.ISSUER,
                  transport=kms.transport(), clock=kms.clock) as v:
        assert v.verify(token, operation="decrypt").grantee == "svc"
    with pytest.raises(ValueError, match="issuer"):
        Verifier("https://kms.example", issuer="")


async def test_the_async_verifier_pins_the_issuer_too() -> None:
    kms = FakeKMS(lambda: 1_800_000_000.0)
    _, token = kms.mint()
    v = AsyncVerifier("http://kms", audience="svc", issuer="urn:keygrants:ours",
                      transport=kms.transport(), clock=kms.clock)
    with pytest.raises(errors.VerifierUnavailable, match="not the expected"):
        await v.verify(token)
    await v.aclose()
    v = AsyncVerifier("http://kms", audience="svc", issuer=FakeKMS.ISSUER,
                      transport=kms.transport(), clock=kms.clock)
    assert (await v.verify(token)).grantee == "svc"
    await v.aclose()


# -- TLS -------------------------------------------------------------------------------------

def test_verify_takes_a_path_like_ca_bundle(tmp_path: Path) -> None:
    """A pathlib.Path used to fail at the first call with AttributeError (when the TLS
    handshake began)."""
    ca = ca_pem(tmp_path)
    with socket.socket() as listener:  # accepts the TCP connection, never answers the TLS one
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with Client(f"https://127.0.0.1:{port}", token="t", verify=ca, timeout=0.5) as c, \
                pytest.raises(errors.ServerUnreachable, match="cannot reach"):
            c.random()
    assert tls_verify(ca).verify_mode == tls_verify(str(ca)).verify_mode  # type: ignore[union-attr]
    assert tls_verify(True) is True and tls_verify(False) is False


def test_the_verifier_builds_an_ssl_context_for_a_ca_bundle(tmp_path: Path) -> None:
    """A str went straight to httpx, which warns (DeprecationWarning) that it is deprecated."""
    ca = ca_pem(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for verify_tls in (str(ca), ca):
            Verifier("https://kms.example", verify_tls=verify_tls).close()
            AsyncVerifier("https://kms.example", verify_tls=verify_tls)


# -- credentials -----------------------------------------------------------------------------

def test_a_token_and_a_signing_key_given_together_are_refused(tmp_path: Path) -> None:
    """The token used to be dropped without a word: the client acted as the principal."""
    key_file = private_pem(tmp_path)
    signer = SigningKey.generate("ed25519")
    for kwargs in ({"principal": "svc-a", "key_file": str(key_file)},
                   {"principal": "svc-a", "signing_key": signer},
                   {"key_file": key_file}):
        with pytest.raises(ValueError, match=r"give either token= or a signing key \(principal= "
                                             r"with key_file= or signing_key=\), not both"):
            Client("http://test", token="kg_admin_x", transport=Recorder().transport(), **kwargs)


def test_a_token_and_a_signing_key_in_the_environment_are_refused(tmp_path: Path,
                                                                  monkeypatch) -> None:
    key_file = private_pem(tmp_path)
    monkeypatch.setenv("KEYGRANTS_TOKEN", "kg_admin_x")
    monkeypatch.setenv("KEYGRANTS_PRINCIPAL", "svc-a")
    monkeypatch.setenv("KEYGRANTS_KEY_FILE", str(key_file))
    with pytest.raises(ValueError, match="both KEYGRANTS_TOKEN and KEYGRANTS_PRINCIPAL and "
                                         "KEYGRANTS_KEY_FILE are set"):
        Client("http://test", transport=Recorder().transport())
    with pytest.raises(ValueError, match="both KEYGRANTS_TOKEN and KEYGRANTS_PRINCIPAL and"):
        AsyncClient("http://test", transport=Recorder().transport())
    monkeypatch.delenv("KEYGRANTS_PRINCIPAL")
    with pytest.raises(ValueError, match="both KEYGRANTS_TOKEN and KEYGRANTS_KEY_FILE are set"):
        Client("http://test", transport=Recorder().transport())
    monkeypatch.delenv("KEYGRANTS_TOKEN")  # a half-set pair keeps its own error
    with pytest.raises(ValueError, match="needs both a principal"):
        Client("http://test", transport=Recorder().transport())


def test_arguments_decide_over_the_environment(tmp_path: Path, monkeypatch) -> None:
    """Explicit credentials mean the environment's are not read (no conflict across them)."""
    key_file = private_pem(tmp_path)
    monkeypatch.setenv("KEYGRANTS_PRINCIPAL", "svc-a")
    monkeypatch.setenv("KEYGRANTS_KEY_FILE", str(key_file))
    recorder = Recorder()
    with Client("http://test", token="kg_ak_x", transport=recorder.transport()) as c:
        c.random(3)
    assert recorder.requests[-1].headers["authorization"] == "Bearer kg_ak_x"
    assert "signature" not in recorder.requests[-1].headers
    monkeypatch.delenv("KEYGRANTS_PRINCIPAL")
    monkeypatch.delenv("KEYGRANTS_KEY_FILE")
    monkeypatch.setenv("KEYGRANTS_TOKEN", "kg_admin_x")
    with Client("http://test", principal="svc-a", key_file=key_file,
                transport=recorder.transport()) as c:
        c.random(3)
    assert "authorization" not in recorder.requests[-1].headers
    assert recorder.requests[-1].headers["signature-input"].startswith("sig1=")


def test_a_non_ascii_token_is_refused_at_construction() -> None:
    """It used to be a UnicodeEncodeError at the first request."""
    for token in ("kg_ak_ééé", "kg_ak_x\u200b"):
        with pytest.raises(ValueError, match="non-ASCII"):
            Client("http://test", token=token, transport=Recorder().transport())
        with pytest.raises(ValueError, match="non-ASCII"):
            AsyncClient("http://test", token=token, transport=Recorder().transport())


# -- private files ---------------------------------------------------------------------------

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@posix_only
def test_private_file_problem(tmp_path: Path) -> None:
    path = private_pem(tmp_path, mode=0o600)
    assert private_file_problem(path) is None
    assert private_file_problem(tmp_path / "missing.pem") is None  # reading it will say why
    for mode in (0o640, 0o604, 0o644, 0o660, 0o610):
        path.chmod(mode)
        assert private_file_problem(str(path)) == (
            f"private key file {path} is accessible by group or others (mode {mode:o}); "
            f"run: chmod 600 {path}")


@posix_only
def test_a_key_file_others_may_read_is_used_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    pem = private_pem(tmp_path, "svc.pem", 0o644)
    secret = tmp_path / "svc.secret"
    secret.write_text(generate_shared_secret()[1])
    secret.chmod(0o640)
    dpop = private_pem(tmp_path, "dpop.pem", 0o604)
    for kwargs in ({"principal": "svc", "key_file": pem}, {"principal": "svc", "key_file": secret}):
        path = kwargs["key_file"]
        with pytest.warns(UserWarning, match=f"{path} is accessible by group or others .*; "
                                             f"run: chmod 600 {path}"):
            Client("http://test", transport=Recorder().transport(), **kwargs).close()
    monkeypatch.setenv("KEYGRANTS_DPOP_KEY_FILE", str(dpop))
    with pytest.warns(UserWarning, match=f"run: chmod 600 {dpop}"):
        Client("http://test", token="t", transport=Recorder().transport()).close()
    for path in (pem, secret, dpop):
        path.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client("http://test", transport=Recorder().transport(), principal="svc",
               key_file=secret).close()
        Client("http://test", token="t", transport=Recorder().transport()).close()


def test_an_unreadable_dpop_key_file_is_invalid_request(tmp_path: Path, monkeypatch) -> None:
    """It used to be a raw FileNotFoundError."""
    monkeypatch.setenv("KEYGRANTS_DPOP_KEY_FILE", str(tmp_path / "nonexistent.pem"))
    with pytest.raises(errors.InvalidRequest, match=r"cannot read the DPoP key file .*"
                                                    r"nonexistent.pem .*KEYGRANTS_DPOP_KEY_FILE"):
        Client("http://test", token="t", transport=Recorder().transport())


# -- requests that got no answer ---------------------------------------------------------------

NOT_SENT: list[type[httpx.TransportError]] = [httpx.ConnectError, httpx.ConnectTimeout,
                                              httpx.PoolTimeout]
SENT: list[type[httpx.TransportError]] = [httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError,
                                          httpx.WriteError, httpx.RemoteProtocolError]


def raising(exc_type: type[httpx.TransportError]) -> Callable[[httpx.Request], Exception]:
    return lambda request: exc_type("boom", request=request)


@pytest.mark.parametrize("exc_type", NOT_SENT)
async def test_nothing_sent_is_server_unreachable(exc_type: type[httpx.TransportError]) -> None:
    transport = Recorder(raising(exc_type)).transport()
    with Client("http://test", token="t", transport=transport) as c, \
            pytest.raises(errors.ServerUnreachable) as info:
        c.create_key("k")
    async with AsyncClient("http://test", token="t", transport=transport) as ac:
        with pytest.raises(errors.ServerUnreachable) as ainfo:
            await ac.create_key("k")
    for err in (info.value, ainfo.value):
        assert type(err) is errors.ServerUnreachable and err.code == "server_unreachable"
        assert err.message == "cannot reach http://test: boom" and err.request_id is None


@pytest.mark.parametrize("exc_type", SENT)
async def test_no_answer_after_sending_is_no_response(exc_type: type[httpx.TransportError]) -> None:
    """A read timeout used to say "cannot reach": the user retried a request the server had
    carried out (a second grant, rotation, API key)."""
    transport = Recorder(raising(exc_type)).transport()
    expected = ("the request was sent to http://test but no answer came (boom): it may have "
                "taken effect; check before retrying")
    with Client("http://test", token="t", transport=transport) as c, \
            pytest.raises(errors.NoResponse) as info:
        c.create_grant("k", "svc", ["decrypt"])
    async with AsyncClient("http://test", token="t", transport=transport) as ac:
        with pytest.raises(errors.NoResponse) as ainfo:
            await ac.rotate_key("k")
    for err in (info.value, ainfo.value):
        assert isinstance(err, errors.ServerUnreachable)  # existing handlers keep working
        assert err.code == "no_response" and err.request_id is None
        assert err.message == expected
        assert err.to_dict()["error"]["code"] == "no_response"


async def test_a_read_that_got_no_answer_can_be_retried() -> None:
    transport = Recorder(raising(httpx.ReadTimeout)).transport()
    with Client("http://test", token="t", transport=transport) as c:
        with pytest.raises(errors.NoResponse, match=r"\(boom\); it only reads, so it can be "
                                                    "retried"):
            c.list_keys()
        with pytest.raises(errors.NoResponse, match="it only reads"):
            c.audit_export(_Sink())
    async with AsyncClient("http://test", token="t", transport=transport) as ac:
        with pytest.raises(errors.NoResponse, match="it only reads"):
            await ac.audit_export(_Sink())
    with Client("http://test", token="t",
                transport=Recorder(raising(httpx.ConnectError)).transport()) as c, \
            pytest.raises(errors.ServerUnreachable, match="cannot reach http://test"):
        c.audit_export(_Sink())


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


def test_the_error_tree_has_no_response_under_server_unreachable() -> None:
    assert errors.error_from_code("no_response", "m").__class__ is errors.NoResponse
    assert "no_response" in (errors.__doc__ or "")


def test_a_network_transport_of_the_callers_own_is_held_to_the_http_rule() -> None:
    """Only transports that answer in-process are exempt: an HTTPTransport (with retries,
    say) puts the token on the network like the default one."""
    for make in (lambda: Client("http://kms.example:8650", token="t",
                                transport=httpx.HTTPTransport(retries=2)),
                 lambda: Verifier("http://kms.example:8650", transport=httpx.HTTPTransport())):
        with pytest.raises(ValueError, match="refusing plain http://"):
            make()
    with Client("http://kms.example:8650", token="t",
                transport=httpx.MockTransport(lambda r: httpx.Response(200))):
        pass
