"""RFC 9449 DPoP: the proof of possession a client sends with each use of a key-bound grant.

A grant bound to a key carries ``cnf.jkt``, the RFC 7638 thumbprint of that key
(:func:`proof_key_thumbprint`). Each request that presents the grant carries a ``DPoP`` header:
a fresh compact JWS signed by the bound key (:func:`make_proof`)::

    BASE64URL(header) "." BASE64URL(claims) "." BASE64URL(signature)

    header  {"typ": "dpop+jwt", "alg": "EdDSA" | "ES256", "jwk": <the public key>}
    claims  {"jti": <1-128 chars>, "htm": "POST", "htu": "https://host/path", "iat": <Unix s>,
             "ath": BASE64URL(SHA-256(access token)), "nonce"?: <a server nonce>}

``ES256`` signatures are the raw 64-byte ``r || s``, as JOSE requires. :meth:`DpopVerifier.verify`
checks, in the order of RFC 9449 §4.3, and each refusal names the check that failed without
repeating the proof: one proof of at most :data:`MAX_PROOF_LENGTH` characters
(:class:`PopRequired` when there is none); three strict base64url parts with JSON object header
and claims (duplicate members refused); the required claims and their types; ``typ``; ``alg``
(``EdDSA`` or ``ES256`` only: ``none``, HMAC and RSA are refused); no ``crit``, ``jku``,
``x5u``, ``x5c``, ``x5t`` header; a public ``jwk`` whose ``kty``/``crv`` match ``alg``; the
signature; ``htm``; ``htu`` (both sides normalised by :func:`htu_of`); the server nonce when
required (:class:`UseDpopNonce`, carrying a fresh one); ``iat`` within ``max_age`` and
``leeway``; ``ath``; the key's thumbprint against the grant's ``jkt``; and last the ``jti``,
remembered only once everything else passed (:class:`PopReplayed`), so unauthenticated junk
never reaches the replay cache. Every other refusal is a :class:`PopInvalid`.

Server nonce layout (RFC 9449 §8), unpadded base64url of 41 bytes (55 characters)::

    0x01 (version) || issued (8 bytes, big-endian Unix seconds)
         || HMAC-SHA256(nonce key, "keygrants dpop nonce" || 0x01 || issued)

Nonces are stateless: any verifier holding the same nonce key accepts them until
``nonce_lifetime`` seconds after ``issued``. The key is random per :class:`DpopVerifier` unless
one is passed in (``nonce_key``), which several server processes behind one address need.

The JWS is encoded and parsed here for the reasons :mod:`keygrants.grants.token` gives; the
signatures are made and checked by :mod:`keygrants.crypto.signing`, and the tests cross-check
proofs with joserfc.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from keygrants.auth.credentials import jwk_thumbprint
from keygrants.auth.httpsig import DEFAULT_NONCE_CACHE_SIZE, NonceCache
from keygrants.crypto import hmac_sha256, nonce_bytes, random_bytes, verify_hmac_sha256
from keygrants.crypto.signing import (
    P256_RAW_SIGNATURE_SIZE,
    SigningAlgorithm,
    SigningKey,
    VerifyingKey,
    b64url,
    ecdsa_p256_der_to_raw,
    ecdsa_p256_raw_to_der,
)
from keygrants.errors import NonceReplayed, PopInvalid, PopReplayed, PopRequired, UseDpopNonce

__all__ = [
    "ALGORITHMS",
    "DPOP_TYPE",
    "MAX_JTI_LENGTH",
    "MAX_NONCE_LENGTH",
    "MAX_PROOF_LENGTH",
    "MIN_NONCE_KEY_LENGTH",
    "DpopProof",
    "DpopVerifier",
    "access_token_hash",
    "htu_of",
    "make_proof",
    "proof_key_thumbprint",
]

DPOP_TYPE: Final = "dpop+jwt"
#: JOSE ``alg`` -> keygrants signing algorithm; read-only, since it decides what verifies.
ALGORITHMS: Final[Mapping[str, SigningAlgorithm]] = MappingProxyType(
    {"EdDSA": "ed25519", "ES256": "ecdsa-p256-sha256"})
MAX_PROOF_LENGTH: Final = 8192
MAX_JTI_LENGTH: Final = 128
MAX_NONCE_LENGTH: Final = 64
MIN_NONCE_KEY_LENGTH: Final = 32

_JOSE_ALG: Final[Mapping[str, str]] = MappingProxyType({v: k for k, v in ALGORITHMS.items()})
# kty, crv and the coordinate members a proof key of each alg must have.
_JWK_SHAPES: Final[Mapping[str, tuple[str, str, tuple[str, ...]]]] = MappingProxyType({
    "EdDSA": ("OKP", "Ed25519", ("x",)),
    "ES256": ("EC", "P-256", ("x", "y")),
})
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_FORBIDDEN_HEADER_MEMBERS: Final = ("crit", "jku", "x5u", "x5c", "x5t", "x5t#S256", "b64", "zip")
_COORDINATE_SIZE: Final = 32
# DER SubjectPublicKeyInfo of a P-256 key up to its uncompressed point (RFC 5480): a JWK's
# x and y complete it, and the loader then checks that the point is on the curve.
_P256_SPKI_PREFIX: Final = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + b"\x04"

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_SEPARATOR_RE: Final = re.compile(r"[\s,]")
_PERCENT_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_URL_RE: Final = re.compile(r"[\x21-\x7e]+")
_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_DEFAULT_PORTS: Final[Mapping[str, int]] = MappingProxyType({"http": 80, "https": 443})

_NONCE_VERSION: Final = 1
_NONCE_LABEL: Final = b"keygrants dpop nonce"
_NONCE_HEAD_SIZE: Final = 1 + 8  # version, issued
_NONCE_SIZE: Final = _NONCE_HEAD_SIZE + 32
_JTI_BYTES: Final = 16


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: unpadded base64url of the SHA-256 of the ASCII access token.

    Raises:
        ValueError: if ``token`` is not ASCII (access tokens never are).
    """
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def htu_of(url: str) -> str:
    """The URL as DPoP compares it (RFC 9449 §4.3; RFC 3986 §6.2.2-6.2.3).

    The scheme and host are lower-cased, a default port (80, 443) or an empty one dropped,
    percent-encodings upper-cased and those of unreserved characters decoded, dot segments
    removed, an empty path made ``/``, and the query and fragment left off.

    Raises:
        ValueError: for anything but an absolute ``http``/``https`` URL of printable ASCII
            without userinfo.
    """
    if not isinstance(url, str) or not _URL_RE.fullmatch(url):
        raise ValueError("a URL is printable ASCII without spaces")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("htu must be an absolute http or https URL")
    if "@" in parts.netloc:
        raise ValueError("htu must not carry userinfo")
    host = parts.hostname
    if not host:
        raise ValueError("htu must name a host")
    port = parts.port  # ValueError for a port that is not a number in 0-65535
    authority = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        authority += f":{port}"
    return f"{scheme}://{authority}{_remove_dot_segments(_PERCENT_RE.sub(_percent, parts.path))}"


def _percent(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for the absolute (or empty) path of a URL with an authority."""
    segments = path.split("/")
    out = [""]
    for segment in segments[1:]:
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", "..") or len(out) == 1:
        out.append("")  # "/a/.." is "/a/" minus "a": a directory, and "" is "/"
    return "/".join(out)


def _jose_alg(algorithm: str) -> str:
    alg = _JOSE_ALG.get(algorithm)
    if alg is None:
        raise ValueError("DPoP proofs are signed with Ed25519 or ECDSA P-256 keys")
    return alg


def _public_jwk(key: VerifyingKey) -> dict[str, str]:
    """The RFC 7638 required members only: what a proof header carries and a thumbprint hashes."""
    jwk = key.jwk()
    kty, crv, coordinates = _JWK_SHAPES[_jose_alg(key.algorithm)]
    return {"kty": kty, "crv": crv} | {m: jwk[m] for m in coordinates}


def proof_key_thumbprint(key: SigningKey | VerifyingKey) -> str:
    """The RFC 7638 JWK thumbprint of a proof key: the ``jkt`` a grant is bound to.

    Raises:
        ValueError: for a key DPoP does not use here (RSA).
    """
    public = key.public_key() if isinstance(key, SigningKey) else key
    return jwk_thumbprint(_public_jwk(public))


def _json_part(data: dict[str, object]) -> str:
    return b64url(json.dumps(data, separators=(",", ":")).encode("utf-8"))


def make_proof(key: SigningKey, *, method: str, url: str, access_token: str | None = None,
               nonce: str | None = None, iat: int | None = None, jti: str | None = None) -> str:
    """A DPoP proof for one request (the client side).

    Args:
        key: the proof key (Ed25519 signs ``EdDSA``, ECDSA P-256 ``ES256``).
        method: the request's HTTP method; sent upper-cased.
        url: the request URL; sent as :func:`htu_of` gives it (no query, no fragment).
        access_token: the grant token the request presents, hashed into ``ath``.
        nonce: the server's last ``DPoP-Nonce``, if it asked for one.
        iat: the creation time (default: now).
        jti: the proof's unique id (default: 128 random bits).

    Returns:
        The compact JWS for the ``DPoP`` header.

    Raises:
        ValueError: for an RSA key, a URL :func:`htu_of` refuses or a non-ASCII access token.
    """
    public = key.public_key()
    alg = _jose_alg(public.algorithm)
    claims: dict[str, object] = {
        "jti": b64url(nonce_bytes(_JTI_BYTES)) if jti is None else jti,
        "htm": method.upper(),
        "htu": htu_of(url),
        "iat": int(time.time()) if iat is None else iat,
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    header: dict[str, object] = {"typ": DPOP_TYPE, "alg": alg, "jwk": _public_jwk(public)}
    signing_input = f"{_json_part(header)}.{_json_part(claims)}"
    signature = key.sign(signing_input.encode("ascii"))
    if alg == "ES256":
        signature = ecdsa_p256_der_to_raw(signature)
    return f"{signing_input}.{b64url(signature)}"


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A verified proof: the thumbprint of its key and its claims (``htu`` normalised)."""

    jkt: str
    jti: str
    iat: int
    htm: str
    htu: str


def _b64decode(part: object) -> bytes:
    """Strict unpadded base64url: the alphabet, no padding, and no stray trailing bits."""
    if not isinstance(part, str) or not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc
    if b64url(data) != part:  # a second spelling of the same bytes
        raise ValueError("not canonical base64url")
    return data


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member")
    return members


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_members,
                           parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise PopInvalid(f"DPoP proof {what} is not a JSON object") from exc
    if not isinstance(value, dict):
        raise PopInvalid(f"DPoP proof {what} is not a JSON object")
    return value


def _proof_key(alg: str, jwk: object) -> VerifyingKey:
    """The header's ``jwk`` as a key for ``alg``, if it is a well-formed public key of its type."""
    if not isinstance(jwk, dict):
        raise PopInvalid("DPoP proof jwk missing")
    if not _PRIVATE_JWK_MEMBERS.isdisjoint(jwk):
        raise PopInvalid("DPoP proof jwk holds a private key")
    kty, crv, coordinates = _JWK_SHAPES[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv or jwk.get("alg", alg) != alg:
        raise PopInvalid("DPoP proof jwk does not match alg")
    try:
        raw = [_b64decode(jwk.get(m)) for m in coordinates]
        if alg == "EdDSA":
            return VerifyingKey.from_raw("ed25519", raw[0])
        if any(len(c) != _COORDINATE_SIZE for c in raw):
            raise ValueError("a P-256 coordinate is 32 bytes")
        return VerifyingKey.from_der("ecdsa-p256-sha256", _P256_SPKI_PREFIX + b"".join(raw))
    except ValueError as exc:  # also a point off the curve
        raise PopInvalid("DPoP proof jwk invalid") from exc


def _check_header(header: dict[str, object]) -> tuple[str, VerifyingKey]:
    if header.get("typ") != DPOP_TYPE:
        raise PopInvalid("DPoP proof typ is not dpop+jwt")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise PopInvalid("DPoP proof alg not accepted")
    for member in _FORBIDDEN_HEADER_MEMBERS:
        if member in header:
            raise PopInvalid(f"DPoP proof header member {member!r} not accepted")
    return alg, _proof_key(alg, header.get("jwk"))


def _signature_valid(alg: str, key: VerifyingKey, signing_input: bytes, signature_b64: str) -> bool:
    try:
        signature = _b64decode(signature_b64)
        if alg == "ES256":
            if len(signature) != P256_RAW_SIGNATURE_SIZE:
                return False
            signature = ecdsa_p256_raw_to_der(signature)
    except ValueError:
        return False
    return key.verify(signing_input, signature)


def _utf8(text: str) -> bytes:
    """UTF-8 that also encodes a lone surrogate (JSON ``"\\ud800"`` decodes to one), still one
    byte string per string: a claim that is not valid Unicode is compared or hashed like any
    other (an ``ath`` that cannot match is ``pop_invalid``), never a server error."""
    return text.encode("utf-8", "surrogatepass")


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(_utf8(a), _utf8(b))


class DpopVerifier:
    """Checks DPoP proofs (the server side); thread-safe.

    Args:
        max_age: how old (by ``iat``) a proof may be, in seconds.
        leeway: the clock skew allowed either way, in seconds.
        replay_window: how long a ``jti`` is remembered; at least (and by default)
            ``max_age + 2 * leeway``, the longest a proof is acceptable.
        max_replay_entries: the most ``(jkt, jti)`` pairs remembered at once. When the cache is
            full of unexpired pairs it fails closed (:class:`PopReplayed`) rather than forget
            one that could then be replayed, and one key may hold at most a quarter of it
            (:class:`keygrants.auth.httpsig.NonceCache`).
        require_nonce: refuse proofs without a valid server nonce (:class:`UseDpopNonce`).
        nonce_lifetime: how long a nonce from :meth:`new_nonce` is accepted, in seconds.
        nonce_key: the key nonces are authenticated with (at least 32 bytes); default a random
            one, so only this verifier accepts its nonces.
        clock: the current Unix time.

    Raises:
        ValueError: for a setting out of range.
    """

    def __init__(self, *, max_age: int = 60, leeway: int = 5, replay_window: int | None = None,
                 max_replay_entries: int = DEFAULT_NONCE_CACHE_SIZE, require_nonce: bool = False,
                 nonce_lifetime: int = 300, nonce_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if max_age < 1 or leeway < 0 or nonce_lifetime < 1:
            raise ValueError("max_age and nonce_lifetime must be positive, leeway not negative")
        acceptable_for = max_age + 2 * leeway
        if replay_window is None:
            replay_window = acceptable_for
        if replay_window < acceptable_for:
            raise ValueError("replay_window shorter than max_age + 2 * leeway lets proofs be replayed")
        if nonce_key is not None and len(nonce_key) < MIN_NONCE_KEY_LENGTH:
            raise ValueError(f"nonce_key must be at least {MIN_NONCE_KEY_LENGTH} bytes")
        self._max_age = max_age
        self._leeway = leeway
        self._replay_window = replay_window
        self._replay = NonceCache(max_replay_entries)  # ValueError below 1
        self._require_nonce = require_nonce
        self._nonce_lifetime = nonce_lifetime
        self._nonce_key = random_bytes(MIN_NONCE_KEY_LENGTH) if nonce_key is None else bytes(nonce_key)
        self._clock = clock

    @property
    def replay_cache(self) -> NonceCache:
        """The proof ids remembered against replay (its size is a metric)."""
        return self._replay

    def new_nonce(self) -> str:
        """A server nonce for the ``DPoP-Nonce`` header, accepted for ``nonce_lifetime`` seconds."""
        head = bytes([_NONCE_VERSION]) + int(self._clock()).to_bytes(8, "big", signed=True)
        return b64url(head + hmac_sha256(self._nonce_key, _NONCE_LABEL + head))

    def _nonce_valid(self, nonce: object, now: float) -> bool:
        if not isinstance(nonce, str) or len(nonce) > MAX_NONCE_LENGTH:
            return False
        try:
            data = _b64decode(nonce)
        except ValueError:
            return False
        if len(data) != _NONCE_SIZE or data[0] != _NONCE_VERSION:
            return False
        head, tag = data[:_NONCE_HEAD_SIZE], data[_NONCE_HEAD_SIZE:]
        if not verify_hmac_sha256(self._nonce_key, _NONCE_LABEL + head, tag):
            return False
        issued = int.from_bytes(head[1:], "big", signed=True)
        return now - self._nonce_lifetime <= issued <= now + self._leeway

    def verify(self, proof: str | None, *, method: str, url: str, access_token: str,
               expected_jkt: str, holder: str | None = None) -> DpopProof:
        """Check the proof of one request and remember its ``jti``.

        Args:
            proof: the ``DPoP`` header; several header lines must be passed joined with ``,``
                so that they are refused.
            method: the request's HTTP method.
            url: the request's absolute URL (any query is ignored).
            access_token: the grant token the request presents (``ath`` must hash it).
            expected_jkt: the grant's ``cnf.jkt``.
            holder: whose share of the replay cache the proof counts against (the grantee:
                proof keys cost nothing to mint, so a share per key would let one holder fill
                the cache); default: the proof key.

        Returns:
            The verified proof.

        Raises:
            PopRequired: no proof, or an empty one.
            UseDpopNonce: a nonce is required and the proof has none, or an unknown or expired
                one; ``nonce`` holds a fresh one for the ``DPoP-Nonce`` header.
            PopReplayed: the ``jti`` was seen within the replay window (or the replay cache is
                full of unexpired entries).
            PopInvalid: any other check failed; the message says which.
        """
        if proof is None or not proof.strip():
            raise PopRequired("DPoP proof required")
        if len(proof) > MAX_PROOF_LENGTH:
            raise PopInvalid("DPoP proof too large")
        proof = proof.strip()
        if _SEPARATOR_RE.search(proof):
            raise PopInvalid("more than one DPoP proof")
        parts = proof.split(".")
        if len(parts) != 3:
            raise PopInvalid("DPoP proof is not a compact JWS")
        header_b64, claims_b64, signature_b64 = parts
        try:
            header_json, claims_json = _b64decode(header_b64), _b64decode(claims_b64)
        except ValueError as exc:
            raise PopInvalid("DPoP proof is not a compact JWS") from exc
        header = _json_object(header_json, "header")
        claims = _json_object(claims_json, "claims")

        jti, htm, htu, iat, ath = (claims.get(c) for c in ("jti", "htm", "htu", "iat", "ath"))
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_LENGTH:
            raise PopInvalid("DPoP proof jti missing or invalid")
        if not isinstance(htm, str) or not isinstance(htu, str):
            raise PopInvalid("DPoP proof htm or htu missing")
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise PopInvalid("DPoP proof iat missing or not an integer")
        if not isinstance(ath, str):
            raise PopInvalid("DPoP proof ath missing")

        alg, key = _check_header(header)
        signing_input = proof[: len(header_b64) + 1 + len(claims_b64)].encode("ascii")
        if not _signature_valid(alg, key, signing_input, signature_b64):
            raise PopInvalid("DPoP proof signature invalid")

        if htm != method.upper():
            raise PopInvalid("DPoP proof htm does not match")
        try:
            proof_htu = htu_of(htu)
        except ValueError as exc:
            raise PopInvalid("DPoP proof htu does not match") from exc
        try:
            request_htu = htu_of(url)
        except ValueError as exc:  # the Host header is the client's to choose
            raise PopInvalid("request URL cannot be normalised for DPoP") from exc
        if proof_htu != request_htu:
            raise PopInvalid("DPoP proof htu does not match")
        now = self._clock()
        if self._require_nonce:
            if "nonce" not in claims:
                raise UseDpopNonce("DPoP nonce required", nonce=self.new_nonce())
            if not self._nonce_valid(claims["nonce"], now):
                raise UseDpopNonce("DPoP nonce invalid or expired", nonce=self.new_nonce())
        if iat < now - self._max_age - self._leeway:
            raise PopInvalid("DPoP proof iat too old")
        if iat > now + self._leeway:
            raise PopInvalid("DPoP proof iat in the future")
        try:
            expected_ath = access_token_hash(access_token)
        except ValueError as exc:
            raise PopInvalid("DPoP proof ath does not match") from exc
        if not _equal(ath, expected_ath):
            raise PopInvalid("DPoP proof ath does not match")
        jkt = jwk_thumbprint(key.jwk())
        if not _equal(jkt, expected_jkt):
            raise PopInvalid("DPoP proof signed by another key")

        # Hashed: the cache holds 22 characters per jti whatever the client sent.
        jti_digest = b64url(hashlib.sha256(_utf8(jti)).digest()[:16])
        try:
            self._replay.check_and_remember(jkt, jti_digest, until=now + self._replay_window,
                                            now=now, owner=holder)
        except NonceReplayed as exc:
            seen = exc.message == NonceReplayed.default_message  # otherwise: the cache is full
            message = "DPoP proof replayed" if seen else "DPoP replay cache full; retry later"
            raise PopReplayed(message) from exc
        return DpopProof(jkt=jkt, jti=jti, iat=iat, htm=htm, htu=proof_htu)
