"""RFC 9421 message signatures and RFC 9530 Content-Digest: published vectors and attacks."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import inspect
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keygrants.auth.httpsig import (
    MAX_COMPONENTS,
    MAX_SIGNATURE_INPUT_LENGTH,
    MAX_SIGNATURE_LENGTH,
    MAX_SIGNATURES,
    Component,
    Message,
    NonceCache,
    RequestVerifier,
    build_target_uri,
    check_content_digest,
    content_digest,
    parse_signatures,
    sign_message,
    signature_base,
    verify_signature,
)
from keygrants.client._signing import SignatureAuth
from keygrants.crypto.signing import (
    SigningKey,
    VerifyingKey,
    ecdsa_p256_der_to_raw,
    ecdsa_p256_raw_to_der,
)
from keygrants.errors import (
    CredentialRevoked,
    DigestMismatch,
    HeaderTooLarge,
    KeygrantsError,
    NonceReplayed,
    SignatureExpired,
    SignatureInvalid,
    UnknownCredential,
)


def _load_vectors() -> ModuleType:
    """``rfc9421_vectors.py`` next to this file (tests are not a package: import by path)."""
    spec = importlib.util.spec_from_file_location("rfc9421_vectors",
                                                  Path(__file__).with_name("rfc9421_vectors.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_vectors()
NOW = 1_800_000_000


def rfc_request() -> Message:
    return Message(method=V.REQUEST_METHOD, target_uri=V.REQUEST_TARGET_URI,
                   headers=dict(V.REQUEST_HEADERS))


def rfc_response() -> Message:
    return Message(method="", target_uri="", headers=dict(V.RESPONSE_HEADERS),
                   status=V.RESPONSE_STATUS)


def label_of(header: str) -> str:
    return header.partition("=")[0]


# -- RFC 9530 / RFC 9421 Appendix B ------------------------------------------------------------


def test_content_digest_matches_rfc_examples() -> None:
    assert content_digest(V.REQUEST_BODY) == V.REQUEST_BODY_SHA256_DIGEST
    assert content_digest(V.REQUEST_BODY, "sha-512") == V.REQUEST_HEADERS["content-digest"]
    assert content_digest(V.RESPONSE_BODY, "sha-512") == V.RESPONSE_HEADERS["content-digest"]
    check_content_digest(V.REQUEST_HEADERS["content-digest"], V.REQUEST_BODY, required=True)
    check_content_digest(V.REQUEST_BODY_SHA256_DIGEST, V.REQUEST_BODY, required=True)


def test_b25_hmac_sha256_byte_for_byte() -> None:
    parsed = parse_signatures(V.B25_SIGNATURE_INPUT, V.B25_SIGNATURE)[0]
    base = signature_base(rfc_request(), parsed.params.components, parsed.signature_params)
    assert base == V.B25_BASE.encode()
    produced = sign_message(rfc_request(), key=V.TEST_SHARED_SECRET, alg="hmac-sha256",
                            keyid="test-shared-secret", created=1618884473,
                            components=["date", "@authority", "content-type"], label="sig-b25")
    assert produced == (V.B25_SIGNATURE_INPUT, V.B25_SIGNATURE)
    verify_signature(rfc_request(), parsed, key=V.TEST_SHARED_SECRET, alg="hmac-sha256")


def test_b26_ed25519_byte_for_byte() -> None:
    parsed = parse_signatures(V.B26_SIGNATURE_INPUT, V.B26_SIGNATURE)[0]
    base = signature_base(rfc_request(), parsed.params.components, parsed.signature_params)
    assert base == V.B26_BASE.encode()
    key = SigningKey.from_pem(V.TEST_KEY_ED25519_PRIVATE)
    assert key.algorithm == "ed25519"
    produced = sign_message(rfc_request(), key=key, alg="ed25519", keyid="test-key-ed25519",
                            created=1618884473, label="sig-b26",
                            components=["date", "@method", "@path", "@authority", "content-type",
                                        "content-length"])
    assert produced == (V.B26_SIGNATURE_INPUT, V.B26_SIGNATURE)
    public = VerifyingKey.from_pem("ed25519", V.TEST_KEY_ED25519_PUBLIC)
    assert key.public_key().public_der() == public.public_der()
    verify_signature(rfc_request(), parsed, key=public, alg="ed25519")


@pytest.mark.parametrize(("signature_input", "signature", "expected_base"), [
    (V.B21_SIGNATURE_INPUT, V.B21_SIGNATURE, V.B21_BASE),
    (V.B22_SIGNATURE_INPUT, V.B22_SIGNATURE, V.B22_BASE),
    (V.B23_SIGNATURE_INPUT, V.B23_SIGNATURE, V.B23_BASE),
], ids=["B.2.1", "B.2.2", "B.2.3"])
def test_rsa_pss_sha512_examples_verify_over_our_signature_base(
        signature_input: str, signature: str, expected_base: str) -> None:
    parsed = parse_signatures(signature_input, signature)[0]
    assert f"{parsed.label}={parsed.signature_params}" == signature_input
    base = signature_base(rfc_request(), parsed.params.components, parsed.signature_params)
    assert base == expected_base.encode()
    # keygrants does not accept RSA; check the RFC signature with pyca directly (RFC 9421
    # §3.3.1: RSASSA-PSS, SHA-512, MGF1-SHA-512, 64-byte salt).
    public = serialization.load_pem_public_key(V.TEST_KEY_RSA_PSS_PUBLIC)
    assert isinstance(public, rsa.RSAPublicKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64)
    public.verify(parsed.signature, base, pss, hashes.SHA512())
    with pytest.raises(InvalidSignature):
        public.verify(parsed.signature, base + b" ", pss, hashes.SHA512())


def test_b24_ecdsa_p256_response_signature() -> None:
    parsed = parse_signatures(V.B24_SIGNATURE_INPUT, V.B24_SIGNATURE)[0]
    assert len(parsed.signature) == 64
    base = signature_base(rfc_response(), parsed.params.components, parsed.signature_params)
    assert base == V.B24_BASE.encode()
    key = VerifyingKey.from_pem("ecdsa-p256-sha256", V.TEST_KEY_ECC_P256_PUBLIC)
    verify_signature(rfc_response(), parsed, key=key, alg="ecdsa-p256-sha256")
    headers = dict(V.RESPONSE_HEADERS, **{"content-length": "24"})
    with pytest.raises(SignatureInvalid):
        verify_signature(Message("", "", headers, status=200), parsed, key=key,
                         alg="ecdsa-p256-sha256")
    with pytest.raises(SignatureInvalid):
        verify_signature(Message("", "", dict(V.RESPONSE_HEADERS), status=201), parsed, key=key,
                         alg="ecdsa-p256-sha256")


@pytest.mark.parametrize(("signature_input", "signature"), [
    (V.B21_SIGNATURE_INPUT, V.B21_SIGNATURE), (V.B22_SIGNATURE_INPUT, V.B22_SIGNATURE),
    (V.B23_SIGNATURE_INPUT, V.B23_SIGNATURE), (V.B24_SIGNATURE_INPUT, V.B24_SIGNATURE),
    (V.B25_SIGNATURE_INPUT, V.B25_SIGNATURE), (V.B26_SIGNATURE_INPUT, V.B26_SIGNATURE),
])
def test_rfc_headers_round_trip_through_parse(signature_input: str, signature: str) -> None:
    parsed = parse_signatures(signature_input, signature)
    assert [p.label for p in parsed] == [label_of(signature_input)]
    assert f"{parsed[0].label}={parsed[0].signature_params}" == signature_input


def test_rfc_signatures_fail_when_flipped() -> None:
    for signature_input, signature, key, alg, message in (
            (V.B25_SIGNATURE_INPUT, V.B25_SIGNATURE, V.TEST_SHARED_SECRET, "hmac-sha256",
             rfc_request()),
            (V.B26_SIGNATURE_INPUT, V.B26_SIGNATURE,
             VerifyingKey.from_pem("ed25519", V.TEST_KEY_ED25519_PUBLIC), "ed25519", rfc_request()),
            (V.B24_SIGNATURE_INPUT, V.B24_SIGNATURE,
             VerifyingKey.from_pem("ecdsa-p256-sha256", V.TEST_KEY_ECC_P256_PUBLIC),
             "ecdsa-p256-sha256", rfc_response())):
        good = parse_signatures(signature_input, signature)[0]
        for i in range(len(good.signature)):
            flipped = bytearray(good.signature)
            flipped[i] ^= 0x01
            bad = type(good)(good.label, good.params, bytes(flipped), good.signature_params)
            with pytest.raises(SignatureInvalid):
                verify_signature(message, bad, key=key, alg=alg)


# -- derived components and field values ---------------------------------------------------------


def base_lines(message: Message, *components: str) -> list[str]:
    return signature_base(message, components, "()").decode().split("\n")[:-1]


def test_derived_components() -> None:
    message = Message("GET", "https://WWW.Example.com:443/path/to?param=value&foo=bar&baz=batman&qux=",
                      {})
    assert base_lines(message, "@method", "@authority", "@scheme", "@request-target", "@path",
                      "@query") == [
        '"@method": GET',
        '"@authority": www.example.com',
        '"@scheme": https',
        '"@request-target": /path/to?param=value&foo=bar&baz=batman&qux=',
        '"@path": /path/to',
        '"@query": ?param=value&foo=bar&baz=batman&qux=',
    ]
    assert base_lines(message, '"@query-param";name="baz"', '"@query-param";name="qux"',
                      '"@query-param";name="param"') == [
        '"@query-param";name="baz": batman',
        '"@query-param";name="qux": ',
        '"@query-param";name="param": value',
    ]
    assert base_lines(Message("GET", "http://h:8080", {}), "@authority", "@path", "@query",
                      "@request-target") == [
        '"@authority": h:8080', '"@path": /', '"@query": ?', '"@request-target": /']
    assert base_lines(Message("GET", "http://user@H:80/p", {}), "@authority") == [
        '"@authority": h']


def test_query_param_encoding_of_rfc_9421_section_2_2_8() -> None:
    message = Message("GET", "http://www.example.com/parameters?var=this%20is%20a%20big%0A"
                      "multiline%20value&bar=with+plus+whitespace&fa%C3%A7ade%22%3A%20=something",
                      {})
    assert base_lines(message, '"@query-param";name="var"', '"@query-param";name="bar"',
                      '"@query-param";name="fa%C3%A7ade%22%3A%20"') == [
        '"@query-param";name="var": this%20is%20a%20big%0Amultiline%20value',
        '"@query-param";name="bar": with%20plus%20whitespace',
        '"@query-param";name="fa%C3%A7ade%22%3A%20": something',
    ]


def test_repeated_or_missing_query_param_cannot_be_covered() -> None:
    with pytest.raises(SignatureInvalid, match="repeated"):
        base_lines(Message("GET", "http://h/?a=1&a=2", {}), '"@query-param";name="a"')
    with pytest.raises(SignatureInvalid, match="missing"):
        base_lines(Message("GET", "http://h/?a=1", {}), '"@query-param";name="b"')


def test_field_values_are_trimmed_unfolded_and_structured_on_request() -> None:
    headers = {"x-a": "  one,\r\n two \t", "content-digest": "sha-256=:AAAA:,   sha-512=:AAAA:",
               "x-empty": ""}
    message = Message("GET", "http://h/", headers)
    assert base_lines(message, "x-a", "x-empty", "content-digest", '"content-digest";sf',
                      '"content-digest";key="sha-512"') == [
        '"x-a": one, two',
        '"x-empty": ',
        '"content-digest": sha-256=:AAAA:,   sha-512=:AAAA:',
        '"content-digest";sf: sha-256=:AAAA:, sha-512=:AAAA:',
        '"content-digest";key="sha-512": :AAAA:',
    ]


@pytest.mark.parametrize("identifier", [
    '"@unknown"', '"@signature-params"', '"@method";req', '"content-digest";bs',
    '"content-digest";tr', '"x-a";sf', '"@query-param"', '"@query-param";name=token',
    '"@path";name="x"', '"Content-Type"', '"x a"', '"content-digest";key=x',
    '"content-digest";key="missing"',
])
def test_unsupported_or_unknown_components_are_refused(identifier: str) -> None:
    message = Message("GET", "http://h/?a=1", {"x-a": "1", "content-digest": "sha-256=:AAAA:"})
    with pytest.raises(SignatureInvalid):
        base_lines(message, identifier)
    with pytest.raises(ValueError):  # the signer's side of the same refusal
        sign_message(message, key=b"k" * 32, alg="hmac-sha256", keyid="k", created=1,
                     components=[identifier])


def test_component_identifiers_parse_and_serialize() -> None:
    assert Component.parse("@method") == Component("@method")
    query = Component.parse('"@query-param";name="Pet"')
    assert query == Component("@query-param", (("name", "Pet"),))
    assert query.param("name") == "Pet" and query.param("sf") is None
    assert query.identifier() == '"@query-param";name="Pet"'
    assert Component.parse('"content-digest";sf').identifier() == '"content-digest";sf'
    for bad in ('"@method', '"@nope"', "@nope", "Content-Type", '"x";bs', '"x";sf=?0', "",
                '"caf\u00e9"', "café"):
        with pytest.raises(ValueError):
            Component.parse(bad)


def test_component_values_must_be_present_unique_and_printable() -> None:
    message = Message("POST", "http://h/", {"x-nl": "a\nb", "x-utf": "caf\u00e9", "x-ok": "1"})
    with pytest.raises(SignatureInvalid, match="x-missing is missing"):
        base_lines(message, "x-missing")
    with pytest.raises(SignatureInvalid, match="covered twice"):
        base_lines(message, "x-ok", "x-ok")
    for name in ("x-nl", "x-utf"):
        with pytest.raises(SignatureInvalid, match="control or non-ASCII"):
            base_lines(message, name)
    with pytest.raises(SignatureInvalid, match="@status"):
        base_lines(message, "@status")
    with pytest.raises(SignatureInvalid, match="not absolute"):
        base_lines(Message("GET", "/relative", {}), "@path")


def test_build_target_uri_matches_what_clients_sign() -> None:
    assert build_target_uri("HTTP", "127.0.0.1:8650", "/v1/keys/k/encrypt", "x=1") == (
        "http://127.0.0.1:8650/v1/keys/k/encrypt?x=1")
    assert build_target_uri("https", "KMS.example.com:443", "/a%20b") == "https://kms.example.com/a%20b"
    assert build_target_uri("http", "[::1]:80", "") == "http://[::1]/"


def test_p256_signature_conversions() -> None:
    key = SigningKey.generate("ecdsa-p256-sha256")
    der = key.sign(b"m")
    raw = ecdsa_p256_der_to_raw(der)
    assert len(raw) == 64
    assert ecdsa_p256_raw_to_der(raw) == der
    assert key.public_key().verify(b"m", ecdsa_p256_raw_to_der(raw))
    for bad in (b"", raw[:63], raw + b"\0"):
        with pytest.raises(ValueError):
            ecdsa_p256_raw_to_der(bad)
    with pytest.raises(ValueError):
        ecdsa_p256_der_to_raw(b"\x30\x00garbage")


# -- parsing ---------------------------------------------------------------------------------------

GOOD_INPUT = 'sig1=("@method" "@target-uri");created=1;keyid="k";nonce="n"'
GOOD_SIG = "sig1=:" + "A" * 86 + "==:"


@pytest.mark.parametrize(("signature_input", "signature"), [
    ("not a dictionary!", GOOD_SIG),
    (GOOD_INPUT, "sig1=:AAAA"),
    ("", GOOD_SIG),
    (GOOD_INPUT.replace("sig1", "sig2"), GOOD_SIG),                       # label mismatch
    (GOOD_INPUT + ', sig2=("@method");created=1', GOOD_SIG),              # label only in one
    ('sig1="@method"', GOOD_SIG),                                         # not an inner list
    ("sig1", GOOD_SIG),                                                   # a bare boolean
    ('sig1=(@method "@target-uri");created=1', GOOD_SIG),                 # not an sf-string
    ('sig1=(method "@target-uri");created=1', GOOD_SIG),                  # a token
    ('sig1=(1 "@target-uri");created=1', GOOD_SIG),
    ('sig1=("@method");created="1"', GOOD_SIG),                           # created as string
    ('sig1=("@method");created=1.5', GOOD_SIG),
    ('sig1=("@method");created=?1', GOOD_SIG),                            # a boolean is no int
    ('sig1=("@method");created=-1', GOOD_SIG),
    ('sig1=("@method");expires=abc', GOOD_SIG),
    ('sig1=("@method");keyid=k', GOOD_SIG),                               # token, not string
    ('sig1=("@method");keyid=""', GOOD_SIG),
    ('sig1=("@method");keyid="' + "k" * 257 + '"', GOOD_SIG),
    ('sig1=("@method");nonce="' + "n" * 129 + '"', GOOD_SIG),
    ('sig1=("@method");unknown=1', GOOD_SIG),
    (GOOD_INPUT, 'sig1="AAAA"'),                                          # not a byte sequence
    (GOOD_INPUT, "sig1=AAAA"),
    (GOOD_INPUT, "sig1=(:AAAA:)"),
    (GOOD_INPUT, "sig1=::"),                                              # empty
    (GOOD_INPUT, "sig1=:" + "A" * 700 + "==:"),                            # too long
    (GOOD_INPUT, GOOD_SIG + ";x=1"),
    (GOOD_INPUT, GOOD_SIG[:-1] + "AAAA:"),                                # data after padding
    (GOOD_INPUT, GOOD_SIG[:-3] + "=A=:"),
    ("sig1=(" + " ".join(f'"x-h{i}"' for i in range(MAX_COMPONENTS + 1)) + ");created=1",
     GOOD_SIG),
    (", ".join(f'l{i}=("@method");created=1' for i in range(MAX_SIGNATURES + 1)),
     ", ".join(f"l{i}=:AAAA:" for i in range(MAX_SIGNATURES + 1))),
    ('sig1=("@method");keyid="caf\u00e9"', GOOD_SIG),                       # not ASCII
    ('sig1=("@method" "@method");created=1', GOOD_SIG + "x"),
    ("sig1=(" + '"@method" ' * 2000 + ")", GOOD_SIG),                        # over the length limit
])
def test_malformed_signature_headers_are_refused(signature_input: str, signature: str) -> None:
    with pytest.raises(SignatureInvalid):
        parse_signatures(signature_input, signature)


def test_parse_keeps_order_and_all_labels() -> None:
    header = GOOD_INPUT + ', other=("@path");created=2;tag="t";alg="ed25519"'
    parsed = parse_signatures(header, GOOD_SIG + ", other=:AAAA:")
    assert [p.label for p in parsed] == ["sig1", "other"]
    assert parsed[1].params.tag == "t" and parsed[1].params.alg == "ed25519"
    assert parsed[1].signature_params == '("@path");created=2;tag="t";alg="ed25519"'


def test_sign_message_refuses_misuse() -> None:
    key = SigningKey.generate("ed25519")
    message = Message("GET", "http://h/", {})
    ok: dict[str, Any] = dict(key=key, alg="ed25519", keyid="k", created=1,
                              components=["@method"])
    sign_message(message, **ok)
    for changes in ({"alg": "rsa-pss-sha512"}, {"alg": "ecdsa-p256-sha256"},
                    {"alg": "hmac-sha256"}, {"alg": "hmac-sha256", "key": b"short"},
                    {"components": ["x-missing"]}, {"components": ["@nope"]},
                    {"keyid": ""}, {"keyid": "caf\u00e9"}, {"nonce": "n" * 200},
                    {"label": "Bad Label"}, {"components": ["@method"] * (MAX_COMPONENTS + 1)}):
        with pytest.raises(ValueError):
            sign_message(message, **(ok | changes))


# -- RequestVerifier -------------------------------------------------------------------------------

URI = "http://127.0.0.1:8650/v1/keys/k/encrypt?x=1"


@dataclass
class World:
    """A verifier with one key per algorithm and a settable clock."""

    ed: SigningKey = field(default_factory=lambda: SigningKey.generate("ed25519"))
    ec: SigningKey = field(default_factory=lambda: SigningKey.generate("ecdsa-p256-sha256"))
    secret: bytes = b"s" * 32
    cache: NonceCache = field(default_factory=NonceCache)
    now: float = NOW
    resolved: list[str] = field(default_factory=list)
    nonces: int = 0

    def resolve(self, keyid: str) -> tuple[str, VerifyingKey | bytes]:
        self.resolved.append(keyid)
        if keyid == "alice/ed":
            return "ed25519", self.ed.public_key()
        if keyid == "alice/ec":
            return "ecdsa-p256-sha256", self.ec.public_key()
        if keyid == "alice/mac":
            return "hmac-sha256", self.secret
        if keyid == "alice/revoked":
            raise CredentialRevoked()
        raise UnknownCredential()

    def verifier(self, **kwargs: Any) -> RequestVerifier:
        return RequestVerifier(resolve_key=self.resolve, nonce_cache=self.cache, **kwargs)

    def sign(self, *, method: str = "POST", uri: str = URI, body: bytes = b'{"a": 1}',
             keyid: str = "alice/ed", alg: str = "ed25519", created: int | None = None,
             expires: int | None = None, lifetime: int | None = 60, nonce: str | None = "",
             components: list[str] | None = None, extra_headers: dict[str, str] | None = None,
             include_alg: bool = False) -> tuple[Message, bytes, str, str]:
        headers = dict(extra_headers or {})
        if body and "content-digest" not in headers:
            headers["content-digest"] = content_digest(body)
        if components is None:
            components = ["@method", "@target-uri"] + (["content-digest"] if body else [])
        created = int(self.now) if created is None else created
        if expires is None and lifetime is not None:
            expires = created + lifetime
        if nonce == "":
            self.nonces += 1
            nonce = f"nonce-{self.nonces}"
        key: SigningKey | bytes = {"ed25519": self.ed, "ecdsa-p256-sha256": self.ec,
                                   "hmac-sha256": self.secret}[alg]
        message = Message(method, uri, headers)
        si, sig = sign_message(message, key=key, alg=alg, keyid=keyid, created=created,
                               expires=expires, nonce=nonce, components=components,
                               include_alg=include_alg)
        return message, body, si, sig

    def check(self, signed: tuple[Message, bytes, str, str], verifier: RequestVerifier | None = None
              ) -> Any:
        message, body, si, sig = signed
        return (verifier or self.verifier()).verify(message, body, signature_input=si,
                                                    signature=sig, now=self.now)


@pytest.fixture
def world() -> World:
    return World()


@pytest.mark.parametrize(("keyid", "alg"), [("alice/ed", "ed25519"),
                                            ("alice/ec", "ecdsa-p256-sha256"),
                                            ("alice/mac", "hmac-sha256")])
@pytest.mark.parametrize("body", [b"", b'{"plaintext": "aGk="}'])
def test_valid_requests_verify(world: World, keyid: str, alg: str, body: bytes) -> None:
    parsed = world.check(world.sign(keyid=keyid, alg=alg, body=body, method="GET" if not body
                                    else "POST"))
    assert parsed.params.keyid == keyid
    assert parsed.label == "sig1"
    assert len(world.cache) == 1


def test_authority_path_and_query_may_replace_target_uri(world: World) -> None:
    world.check(world.sign(components=["@method", "@authority", "@path", "@query",
                                       "content-digest"]))
    with pytest.raises(SignatureInvalid, match="@target-uri"):
        world.check(world.sign(components=["@method", "@authority", "@path", "content-digest"]))


def test_tampered_signature_is_refused(world: World) -> None:
    message, body, si, sig = world.sign()
    tampered = sig[:10] + ("B" if sig[10] != "B" else "C") + sig[11:]
    with pytest.raises(SignatureInvalid):
        world.check((message, body, si, tampered))


def test_tampered_request_parts_are_refused(world: World) -> None:
    message, body, si, sig = world.sign(
        extra_headers={"content-type": "application/json"},
        components=["@method", "@target-uri", "content-digest", "content-type"])
    for changed in (Message("PUT", message.target_uri, message.headers),
                    Message(message.method, message.target_uri + "&y=2", message.headers),
                    Message(message.method, message.target_uri.replace("/k/", "/other/"),
                            message.headers),
                    Message(message.method, message.target_uri,
                            {**message.headers, "content-type": "text/plain"})):
        with pytest.raises(SignatureInvalid):
            world.check((changed, body, si, sig))
    with pytest.raises(DigestMismatch):
        world.check((message, body + b" ", si, sig))
    forged_digest = {**message.headers, "content-digest": content_digest(b"evil")}
    with pytest.raises(SignatureInvalid):  # the digest matches the new body; the signature not
        world.check((Message(message.method, message.target_uri, forged_digest), b"evil", si, sig))
    world.check((message, body, si, sig))


def test_an_extra_unsigned_digest_cannot_vouch_for_a_tampered_body(world: World) -> None:
    body, evil = b'{"a": 1}', b'{"a": 2}'
    sha512 = content_digest(body, "sha-512")
    message, _, si, sig = world.sign(body=body, extra_headers={"content-digest": sha512})
    world.check((message, body, si, sig))
    # Appending a sha-256 that matches a tampered body does not help: every digest must match.
    appended = Message(message.method, message.target_uri,
                       {"content-digest": f"{sha512}, {content_digest(evil)}"})
    with pytest.raises(DigestMismatch):
        world.check((appended, evil, si, sig))
    # Covering a single member is not enough for a request with a body.
    message, body, si, sig = world.sign(
        body=body, extra_headers={"content-digest": f"{sha512}, {content_digest(body)}"},
        components=["@method", "@target-uri", '"content-digest";key="sha-512"'])
    with pytest.raises(SignatureInvalid, match="content-digest"):
        world.check((message, body, si, sig))
    # The sf form covers the whole field.
    world.check(world.sign(components=["@method", "@target-uri", '"content-digest";sf']))


def test_every_supported_digest_must_match() -> None:
    body = b"hello"
    both = f"{content_digest(body)}, {content_digest(b'other', 'sha-512')}"
    with pytest.raises(DigestMismatch):
        check_content_digest(both, body, required=True)
    with pytest.raises(DigestMismatch, match="no sha-256"):
        check_content_digest("md5=:AAAA:", body, required=True)
    with pytest.raises(DigestMismatch, match="malformed"):
        check_content_digest("sha-256=notbytes", body, required=True)
    with pytest.raises(DigestMismatch, match="malformed"):
        check_content_digest("not a dictionary!", body, required=True)
    with pytest.raises(DigestMismatch, match="missing"):
        check_content_digest(None, body, required=True)
    with pytest.raises(HeaderTooLarge):
        check_content_digest("sha-256=:" + "A" * 2000 + ":", body, required=True)
    check_content_digest(None, b"", required=False)
    check_content_digest(f"{content_digest(body)}, md5=:AAAA:", body, required=True)
    with pytest.raises(ValueError):
        content_digest(body, "md5")


def test_body_requires_covered_content_digest(world: World) -> None:
    with pytest.raises(SignatureInvalid, match="content-digest"):
        world.check(world.sign(components=["@method", "@target-uri"]))
    message, body, si, sig = world.sign()
    stripped = Message(message.method, message.target_uri, {})
    with pytest.raises(DigestMismatch, match="missing"):
        world.check((stripped, body, si, sig))


def test_created_and_expires_windows(world: World) -> None:
    verifier = world.verifier(max_skew=60, max_lifetime=300)
    world.check(world.sign(created=NOW + 60, lifetime=60), verifier)       # skew tolerated
    with pytest.raises(SignatureExpired, match="future"):
        world.check(world.sign(created=NOW + 61, lifetime=60), verifier)
    world.check(world.sign(created=NOW - 360, lifetime=None), verifier)    # lifetime + skew
    with pytest.raises(SignatureExpired, match="too old"):
        world.check(world.sign(created=NOW - 361, lifetime=None), verifier)
    with pytest.raises(SignatureExpired, match="expired"):
        world.check(world.sign(created=NOW - 200, expires=NOW - 61), verifier)
    world.check(world.sign(created=NOW - 200, expires=NOW - 60), verifier)
    with pytest.raises(SignatureExpired, match="lifetime"):
        world.check(world.sign(created=NOW, expires=NOW + 301), verifier)
    with pytest.raises(SignatureInvalid, match="precedes"):
        world.check(world.sign(created=NOW, expires=NOW - 1), verifier)


def test_replayed_nonce_is_refused(world: World) -> None:
    signed = world.sign(nonce="fixed")
    world.check(signed)
    with pytest.raises(NonceReplayed):
        world.check(signed)
    with pytest.raises(NonceReplayed):
        world.check(world.sign(nonce="fixed"))             # a new signature, the same nonce
    world.check(world.sign(nonce="fresh"))
    world.check(world.sign(nonce="fixed", keyid="alice/mac", alg="hmac-sha256"))  # other key
    world.now += 60 + 60 + 1                                 # past expires + skew: forgotten
    world.check(world.sign(nonce="fixed"))


def test_a_forgery_does_not_burn_the_nonce(world: World) -> None:
    message, body, si, sig = world.sign(nonce="precious")
    forged = sig[:8] + ("A" if sig[8] != "A" else "B") + sig[9:]
    with pytest.raises(SignatureInvalid):
        world.check((message, body, si, forged))
    with pytest.raises(DigestMismatch):
        world.check((message, body + b"x", si, sig))
    assert len(world.cache) == 0
    world.check((message, body, si, sig))


def test_nonce_is_required_unless_disabled(world: World) -> None:
    with pytest.raises(SignatureInvalid, match="nonce"):
        world.check(world.sign(nonce=None))
    world.check(world.sign(nonce=None), world.verifier(require_nonce=False))


@pytest.mark.parametrize(("keyid", "error"), [("bob/unknown", UnknownCredential),
                                              ("alice/revoked", CredentialRevoked)])
def test_resolver_errors_propagate(world: World, keyid: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        world.check(world.sign(keyid=keyid))


def test_alg_parameter_must_match_the_key(world: World) -> None:
    message, body, si, sig = world.sign(include_alg=True)
    world.check((message, body, si, sig))
    lying = si.replace('alg="ed25519"', 'alg="hmac-sha256"')
    with pytest.raises(SignatureInvalid, match="alg parameter"):
        world.check((message, body, lying, sig))
    # A MAC key's holder cannot pass off an HMAC as an Ed25519 signature either.
    message, body, si, sig = world.sign(keyid="alice/ed", alg="hmac-sha256", include_alg=True)
    with pytest.raises(SignatureInvalid):
        world.check((message, body, si, sig))


@pytest.mark.parametrize(("components", "match"), [
    (["@target-uri", "content-digest"], "@method"),
    (["@method", "content-digest"], "@target-uri"),
    (['"@method";req', "@target-uri", "content-digest"], "unsupported parameter"),
])
def test_required_components(world: World, components: list[str], match: str) -> None:
    message, body, _, sig = world.sign()
    si = 'sig1=(' + " ".join(c if c.startswith('"') else f'"{c}"' for c in components) + (
        f');created={NOW};keyid="alice/ed";nonce="n"')
    with pytest.raises(SignatureInvalid, match=match):
        world.check((message, body, si, sig))


@pytest.mark.parametrize("drop", ["created", "keyid"])
def test_created_and_keyid_are_required(world: World, drop: str) -> None:
    message, body, si, sig = world.sign()
    parsed = parse_signatures(si, sig)[0]
    params = {"created": f";created={parsed.params.created}", "keyid": ';keyid="alice/ed"'}
    mutilated = si.replace(params[drop], "")
    assert mutilated != si
    with pytest.raises(SignatureInvalid, match=drop):
        world.check((message, body, mutilated, sig))


@pytest.mark.parametrize(("signature_input", "signature"), [
    ("sig1=not-a-dict!", GOOD_SIG),
    ('sig2=("@method" "@target-uri");created=1;keyid="k"', GOOD_SIG),
    ('sig1=("@method" "@target-uri");created="1800000000";keyid="alice/ed";nonce="n"', GOOD_SIG),
    ('sig1=("@method" "@target-uri");created=1800000000;keyid="alice/ed";nonce="n"', 'sig1="x"'),
    ("sig1=(" + " ".join(f'"x-{i}"' for i in range(MAX_COMPONENTS + 1)) + ")", GOOD_SIG),
])
def test_malformed_headers_reach_the_verifier_as_signature_invalid(
        world: World, signature_input: str, signature: str) -> None:
    message, body, _, _ = world.sign()
    with pytest.raises(SignatureInvalid):
        world.check((message, body, signature_input, signature))
    assert world.resolved == []


def test_absent_and_oversize_headers(world: World) -> None:
    message, body, si, sig = world.sign()
    verifier = world.verifier()
    with pytest.raises(SignatureInvalid, match="missing Signature-Input"):
        verifier.verify(message, body, signature_input=None, signature=sig, now=world.now)
    with pytest.raises(SignatureInvalid, match=r"missing Signature$"):
        verifier.verify(message, body, signature_input=si, signature=None, now=world.now)
    with pytest.raises(HeaderTooLarge):
        verifier.verify(message, body, signature_input=si + " " * MAX_SIGNATURE_INPUT_LENGTH,
                        signature=sig, now=world.now)
    with pytest.raises(HeaderTooLarge):
        verifier.verify(message, body, signature_input=si,
                        signature=sig + ", x=:" + "A" * MAX_SIGNATURE_LENGTH + ":", now=world.now)


def test_only_the_first_signature_is_checked(world: World) -> None:
    message, body, si, sig = world.sign()
    extra_input = si + ', sig2=("@method");created=1;keyid="nobody"'
    extra_sig = sig + ", sig2=:AAAA:"
    parsed = world.check((message, body, extra_input, extra_sig))
    assert parsed.label == "sig1" and world.resolved == ["alice/ed"]
    swapped_input = 'sig2=("@method");created=1;keyid="nobody", ' + si
    with pytest.raises(SignatureInvalid):
        world.check((message, body, swapped_input, extra_sig))


def test_verifier_configuration_is_checked() -> None:
    for kwargs in ({"max_skew": -1}, {"max_lifetime": 0}):
        with pytest.raises(ValueError):
            RequestVerifier(resolve_key=World().resolve, nonce_cache=NonceCache(), **kwargs)
    with pytest.raises(ValueError):
        NonceCache(0)


def _mutate(rng: random.Random, text: str) -> str:
    alphabet = '();=,":* \t-_.@?abcdefsigkeyndpt0123456789AZ+/\u00e9\x00\n'
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op == 1:
            chars.insert(i, rng.choice(alphabet))
        elif op == 2 and chars:
            chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
        elif op == 3:
            j = rng.randrange(len(chars) + 1)
            chars[i:i] = chars[min(i, j):max(i, j)][:64]
        else:
            chars = chars[:i]
    return "".join(chars)


def test_fuzzed_headers_only_raise_keygrants_errors(world: World) -> None:
    rng = random.Random(9421)
    for alg, keyid in (("ed25519", "alice/ed"), ("ecdsa-p256-sha256", "alice/ec"),
                       ("hmac-sha256", "alice/mac")):
        message, body, si, sig = world.sign(alg=alg, keyid=keyid, components=[
            "@method", "@target-uri", "content-digest", '"content-digest";sf', "@authority",
            "@query", '"@query-param";name="x"'])
        outcomes: dict[str, int] = {}
        for n in range(1500):
            mutated_si = _mutate(rng, si) if n % 3 != 1 else si
            mutated_sig = _mutate(rng, sig) if n % 3 != 0 else sig
            world.cache = NonceCache()
            try:
                world.check((message, body, mutated_si, mutated_sig))
                outcome = "ok"
            except KeygrantsError as exc:
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes.get("SignatureInvalid", 0) > 500, outcomes


def test_fuzzed_messages_only_raise_keygrants_errors(world: World) -> None:
    rng = random.Random(8941)
    message, body, si, sig = world.sign(extra_headers={"x-h": "v"}, components=[
        "@method", "@target-uri", "content-digest", "x-h", '"content-digest";key="sha-256"',
        "@path", "@request-target", '"@query-param";name="x"'])
    for _ in range(1500):
        headers = {k: _mutate(rng, v) if rng.random() < 0.5 else v
                   for k, v in message.headers.items()}
        mutated = Message(_mutate(rng, message.method) if rng.random() < 0.2 else message.method,
                          _mutate(rng, message.target_uri) if rng.random() < 0.5
                          else message.target_uri, headers)
        with contextlib.suppress(KeygrantsError):
            world.check((mutated, body, si, sig))


# -- NonceCache ------------------------------------------------------------------------------------


def test_nonce_cache_is_bounded_and_fails_closed() -> None:
    cache = NonceCache(max_entries=3, max_per_key=3)
    for n in "abc":
        cache.check_and_remember("k", n, until=100, now=0)
    with pytest.raises(NonceReplayed, match="full"):
        cache.check_and_remember("k", "d", until=100, now=50)
    with pytest.raises(NonceReplayed):
        cache.check_and_remember("k", "a", until=100, now=100)      # still inside its window
    assert len(cache) == 3
    cache.check_and_remember("k", "d", until=300, now=100.5)       # a, b, c expired: purged
    assert len(cache) == 1
    cache.check_and_remember("k", "a", until=300, now=101)
    cache.check_and_remember("other", "d", until=300, now=101)     # nonces are per key


def test_one_key_cannot_fill_the_nonce_cache_for_everyone() -> None:
    cache = NonceCache(max_entries=16)  # a quarter (4) per key by default
    for n in "abcd":
        cache.check_and_remember("mallory", n, until=100, now=0)
    with pytest.raises(NonceReplayed, match="this signer"):
        cache.check_and_remember("mallory", "e", until=100, now=1)
    for n in "abcd":
        cache.check_and_remember("victim", n, until=100, now=1)  # still room for others
    cache.check_and_remember("mallory", "e", until=300, now=100.5)  # its old ones expired
    with pytest.raises(ValueError):
        NonceCache(max_entries=16, max_per_key=0)


def test_an_owners_keys_share_one_quota_of_the_nonce_cache() -> None:
    """Four keys of one principal used to get a quarter each, so together they filled the
    cache and every other signer was refused."""
    cache = NonceCache(max_entries=16)  # 4 per owner
    for i, key in enumerate(("m/k1", "m/k2", "m/k3", "m/k4")):
        cache.check_and_remember(key, "a", until=100, now=0, owner="m")
        if i < 3:
            continue
        with pytest.raises(NonceReplayed, match="this signer"):
            cache.check_and_remember(key, "b", until=100, now=0, owner="m")
    for n in "abcd":
        cache.check_and_remember("victim/k", n, until=100, now=1, owner="victim")
    assert cache.seen("m/k1", "a", now=1) and not cache.seen("m/k1", "b", now=1)
    assert not cache.seen("m/k1", "a", now=101)  # expired
    cache.check_and_remember("m/k1", "c", until=300, now=100.5, owner="m")  # old ones purged
    assert len(cache) == 1


def test_nonce_cache_keeps_every_pair_apart() -> None:
    """Pairs are held as digests of keyid and nonce: pairs whose concatenations match are still
    different pairs, and a nonce is per key."""
    cache = NonceCache(max_entries=100)
    for keyid, nonce in (("ab", "c"), ("a", "bc"), ("abc", ""), ("", "abc"), ("k\u00e9", "n"),
                         ("k", "\u00e9n"), ("1:a", "b"), ("a", "1:b")):
        cache.check_and_remember(keyid, nonce, until=100, now=0)
        assert cache.seen(keyid, nonce, now=1)
    assert len(cache) == 8
    with pytest.raises(NonceReplayed):
        cache.check_and_remember("a", "bc", until=100, now=2)
    assert not cache.seen("b", "c", now=1)


def test_a_principal_at_the_default_rate_limit_fits_its_share_of_the_replay_cache() -> None:
    """A principal signing with the SDK's default 60-second signatures as fast as the server's
    default rate limit lets it (1,000/s after a 2,000 burst) must never be refused: each nonce
    is kept for 120 s (expires + the 60 s skew), about 122,000 at once. The share used to be
    50,000 (and, after shares became per principal, a busy service got refused within a
    minute)."""
    from keygrants.auth.authenticator import AuthSettings
    from keygrants.server import ServerConfig

    settings, config = AuthSettings(), ServerConfig()
    lifetime = 60  # SignatureAuth's default
    assert inspect.signature(SignatureAuth).parameters["lifetime"].default == lifetime
    cache = NonceCache(max_entries=settings.nonce_cache_size)
    accepted = 0
    for second in range(2 * (lifetime + settings.max_skew) + 5):
        per_second = config.rate_burst if second == 0 else int(config.rate_limit)
        for i in range(per_second):
            now = second + i / per_second
            created = int(now)
            cache.check_and_remember("svc/k1", f"{second}.{i}", owner="svc",
                                     until=created + lifetime + settings.max_skew, now=now)
            accepted += 1
    assert accepted > 2 * 120_000 and len(cache) >= 120_000


def test_nonce_cache_purges_lazily_in_expiry_order() -> None:
    cache = NonceCache(max_entries=1000, max_per_key=1000)
    for i in range(500):
        cache.check_and_remember("k", f"n{i}", until=i, now=0)
    cache.check_and_remember("k", "late", until=10_000, now=250.5)
    assert len(cache) == 250
    cache.check_and_remember("k", "n10", until=10_000, now=251)    # expired: usable again
    with pytest.raises(NonceReplayed):
        cache.check_and_remember("k", "n400", until=10_000, now=251)


def test_nonce_cache_is_thread_safe() -> None:
    cache = NonceCache(max_entries=100_000)
    accepted: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        mine = 0
        for i in range(2000):
            try:
                cache.check_and_remember("k", f"n{(i * 7 + seed) % 2000}", until=10, now=0)
                mine += 1
            except NonceReplayed:
                pass
        with lock:
            accepted.append(mine)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(accepted) == 2000          # every nonce accepted exactly once across threads
    assert len(cache) == 2000



# -- the canonical-form fast path agrees with the structured-field parser -----------------------

def _slow(monkeypatch: pytest.MonkeyPatch, signature_input: str, signature: str) -> object:
    from keygrants.auth import httpsig

    with monkeypatch.context() as m:
        m.setattr(httpsig, "_parse_fast", lambda a, b: None)
        try:
            return httpsig.parse_signatures(signature_input, signature)
        except KeygrantsError as exc:
            return type(exc)


def test_the_fast_path_reads_exactly_what_the_full_parser_reads(monkeypatch) -> None:
    import random

    from keygrants.auth import httpsig

    rng = random.Random(9421)
    names = ["@method", "@target-uri", "content-digest", "@authority", "@path", "@query",
             "x-custom", "date"]
    params = ['created=1618884473', 'expires=1618884773', 'keyid="svc/abc"', 'nonce="n-1"',
              'alg="ed25519"', 'tag="app"', 'created=0', 'keyid=""', 'nonce="a b"']
    mutations = [lambda t: t, lambda t: t.replace(" ", "  ", 1), lambda t: t.replace(";", "; ", 1),
                 lambda t: t.replace('"', "", 2), lambda t: t + ";created=1",
                 lambda t: t.replace("=", "=0", 1), lambda t: t.replace("(", "( ", 1),
                 lambda t: t.upper(), lambda t: t.replace('"', '\\"', 1), lambda t: t[:-1]]
    fast_hits = 0
    for _ in range(3000):
        inner = "(" + " ".join(f'"{n}"' for n in rng.sample(names, rng.randint(0, 4))) + ")"
        text = "sig1=" + inner + "".join(";" + p for p in rng.sample(params, rng.randint(0, 5)))
        text = rng.choice(mutations)(text)
        sig = "sig1=:" + base64.b64encode(bytes(rng.randrange(256) for _ in range(64))).decode() + ":"
        try:
            fast: object = httpsig._parse_fast(text, sig)
        except KeygrantsError as exc:
            fast = type(exc)
        if fast is None:
            continue  # the full parser decides; nothing to compare
        fast_hits += 1
        assert fast == _slow(monkeypatch, text, sig), text
    assert fast_hits > 500  # the comparison actually exercised the fast path
