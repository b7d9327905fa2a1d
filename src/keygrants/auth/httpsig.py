"""HTTP Message Signatures (RFC 9421) and Content-Digest (RFC 9530), as pure functions.

Nothing here does I/O or reads a clock: the caller passes the message, the body and ``now``.
The structured fields (``Signature-Input``, ``Signature``, ``Content-Digest``) are parsed and
serialized with ``http_sfv`` (RFC 8941); the signatures themselves come from
:mod:`keygrants.crypto`.

Algorithms (:data:`ALGORITHMS`), named as in the RFC 9421 registry:

* ``ed25519`` -- :class:`~keygrants.crypto.signing.SigningKey` / ``VerifyingKey``.
* ``ecdsa-p256-sha256`` -- the same key classes; on the wire the signature is the 64-byte
  ``r || s`` form (RFC 9421 §3.3.4), converted to and from the DER the key classes use.
* ``hmac-sha256`` -- a shared secret of at least :data:`MIN_HMAC_KEY_LENGTH` bytes, checked in
  constant time.

The algorithm always comes from the key the verifier looked up, never from the message: an
``alg`` parameter, when present, must equal it.

Signing (the SDK, :class:`keygrants.client._signing.SignatureAuth`)::

    message = Message(method="POST", target_uri="http://127.0.0.1:8650/v1/keys/k/encrypt",
                      headers={"content-digest": content_digest(body)})
    sig_input, sig = sign_message(message, key=key, alg="ed25519", keyid="alice/Xy..",
                                  created=now, expires=now + 60, nonce=nonce,
                                  components=["@method", "@target-uri", "content-digest"])
    # send Signature-Input: sig_input and Signature: sig

Verifying (the server's authenticator), once per request::

    verifier = RequestVerifier(resolve_key=lookup, nonce_cache=NonceCache())
    message = Message(method=scope_method,
                      target_uri=build_target_uri(scheme, host_header, raw_path, query_string),
                      headers=lower_case_headers)
    parsed = verifier.verify(message, body, signature_input=..., signature=..., now=time.time())
    parsed.params.keyid  # who signed

``resolve_key(keyid)`` returns ``(alg, key)`` or raises an ``Unauthenticated`` subclass
(``UnknownCredential``, ``CredentialRevoked``...), which propagates unchanged.
:meth:`RequestVerifier.verify` checks, in order: header sizes (``HeaderTooLarge``), syntax and
limits (``SignatureInvalid``), the covered components it requires, ``created``/``expires``
against the clock (``SignatureExpired``), the ``Content-Digest`` against the body
(``DigestMismatch``), the signature (``SignatureInvalid``), and only then records the nonce
(``NonceReplayed`` on a replay), so that a forged request cannot burn a legitimate nonce.

Choices worth knowing:

* Only the **first** signature of ``Signature-Input`` is verified; further labels are parsed
  (and must be well formed) but ignored. keygrants clients send exactly one, ``sig1``.
* ``@signature-params`` is rebuilt by re-serializing the parsed inner list (RFC 8941 §4.1
  canonical form), which reproduces every canonically serialized value, including all the
  RFC 9421 examples. A signer that put extra whitespace inside the inner list will not verify;
  RFC 9421 §2.3 requires the canonical serialization.
* Every supported digest (``sha-256``, ``sha-512``) present in ``Content-Digest`` must match
  the body, not just one: otherwise an attacker could append a matching ``sha-256`` member next
  to a covered ``sha-512`` one.
* Covered components support the derived components of RFC 9421 §2.2 (``@method``,
  ``@target-uri``, ``@authority``, ``@scheme``, ``@request-target``, ``@path``, ``@query``,
  ``@query-param`` with ``name``, ``@status``) and header fields, plain, with ``sf`` (for the
  known Dictionary fields such as ``content-digest``) or with ``key``. The ``bs``, ``req`` and
  ``tr`` parameters and unknown signature parameters are refused. A query parameter that occurs
  more than once cannot be covered (§2.2.8). Component values must be visible ASCII.

Limits are the named ``MAX_*`` constants below; every error message is short and never
contains key material or signature bytes.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

from http_sfv.dictionary import Dictionary
from http_sfv.item import InnerList, Item

from keygrants.crypto.mac import hmac_sha256, verify_hmac_sha256
from keygrants.crypto.signing import (
    P256_RAW_SIGNATURE_SIZE,
    SigningKey,
    VerifyingKey,
    ecdsa_p256_der_to_raw,
    ecdsa_p256_raw_to_der,
)
from keygrants.errors import (
    DigestMismatch,
    HeaderTooLarge,
    NonceReplayed,
    SignatureExpired,
    SignatureInvalid,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_NONCE_CACHE_SIZE",
    "DIGEST_ALGORITHMS",
    "MAX_COMPONENTS",
    "MAX_CONTENT_DIGEST_LENGTH",
    "MAX_KEYID_LENGTH",
    "MAX_NONCE_LENGTH",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_BYTES",
    "MAX_SIGNATURE_INPUT_LENGTH",
    "MAX_SIGNATURE_LENGTH",
    "MAX_TAG_LENGTH",
    "MIN_HMAC_KEY_LENGTH",
    "Component",
    "Message",
    "NonceCache",
    "ParsedSignature",
    "RequestVerifier",
    "SignatureParams",
    "build_target_uri",
    "check_authority",
    "check_content_digest",
    "content_digest",
    "parse_signatures",
    "sign_message",
    "signature_base",
    "verify_signature",
]

ALGORITHMS: Final = ("ed25519", "ecdsa-p256-sha256", "hmac-sha256")
DIGEST_ALGORITHMS: Final = ("sha-256", "sha-512")

MAX_SIGNATURE_INPUT_LENGTH: Final = 4096
"""Longest ``Signature-Input`` header accepted, in characters (bytes, as ASGI decodes Latin-1)."""
MAX_SIGNATURE_LENGTH: Final = 4096
"""Longest ``Signature`` header accepted, in characters."""
MAX_CONTENT_DIGEST_LENGTH: Final = 1024
"""Longest ``Content-Digest`` header accepted (a sha-512 member is 98 characters)."""
MAX_SIGNATURES: Final = 4
"""Most labels in one ``Signature-Input`` (or ``Signature``) dictionary."""
MAX_COMPONENTS: Final = 32
"""Most covered components in one signature."""
MAX_SIGNATURE_BYTES: Final = 512
"""Longest decoded signature value (Ed25519 and P-256 use 64 bytes, HMAC-SHA256 32)."""
MAX_KEYID_LENGTH: Final = 256
MAX_NONCE_LENGTH: Final = 128
MAX_TAG_LENGTH: Final = 256
_MAX_ALG_LENGTH: Final = 64
MIN_HMAC_KEY_LENGTH: Final = 32
DEFAULT_NONCE_CACHE_SIZE: Final = 1_000_000

_DIGESTS: Final = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_DERIVED: Final = frozenset({"@method", "@target-uri", "@authority", "@scheme", "@request-target",
                             "@path", "@query", "@query-param", "@status"})
# Fields whose structured type we know, so that the ``sf`` parameter can re-serialize them.
_DICTIONARY_FIELDS: Final = frozenset({"content-digest", "repr-digest", "want-content-digest",
                                       "want-repr-digest"})
_FIELD_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_VISIBLE: Final = re.compile(r"[\t\x20-\x7e]*\Z")
_OBS_FOLD: Final = re.compile(r"\r\n[ \t]+")
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}
_SHOWN: Final = 64  # how much of a client-chosen name an error message repeats

ComponentParam = str | bool


def _show(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _visible(text: str) -> bool:
    return _VISIBLE.match(text) is not None


# -- messages and components ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """What a signature can cover: an HTTP request (or, with ``status``, a response).

    Attributes:
        method: the request method as sent (``"POST"``).
        target_uri: the absolute target URI as the server sees it, e.g.
            ``http://127.0.0.1:8650/v1/keys/k/encrypt?x=1`` (see :func:`build_target_uri`).
            For a response, pass the request's values or ``""`` if no request component is
            covered.
        headers: lower-case field names; repeated fields already joined with ``", "``.
        status: the response status code, for ``@status`` (response signatures only).
    """

    method: str
    target_uri: str
    headers: Mapping[str, str]
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Component:
    """A covered component identifier (RFC 9421 §2): a lower-case name and its parameters.

    ``Component("@method")``, ``Component("content-digest")``,
    ``Component("@query-param", (("name", "Pet"),))``.
    """

    name: str
    params: tuple[tuple[str, ComponentParam], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Component:
        """A bare name (``@method``) or a serialized identifier (``"@query-param";name="Pet"``).

        Raises:
            ValueError: for a malformed or unsupported identifier.
        """
        try:
            if text.startswith('"'):
                item = Item()
                item.parse(text.encode("ascii"))
                return _component_from_item(item)
            component = cls(text)
            _check_component(component)
        except SignatureInvalid as exc:
            raise ValueError(exc.message) from None
        except ValueError:
            raise ValueError(f"malformed component identifier {_show(text)!r}") from None
        return component

    def param(self, key: str) -> ComponentParam | None:
        """The value of parameter ``key``, or ``None``."""
        for k, v in self.params:
            if k == key:
                return v
        return None

    def identifier(self) -> str:
        """The serialized identifier, as it appears in the signature base: ``"@query-param";name="Pet"``."""
        if not self.params and _PLAIN_NAME.match(self.name):
            return f'"{self.name}"'  # what the sf serializer writes for a plain name, quicker
        return str(self._item())

    def _item(self) -> Item:
        item = Item(self.name)
        for k, v in self.params:
            item.params[k] = v
        return item


def _as_component(component: Component | str) -> Component:
    return component if isinstance(component, Component) else Component.parse(component)


def _check_component(component: Component) -> None:
    name, params = component.name, component.params
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise SignatureInvalid("repeated component parameter")
    for _, value in params:
        if isinstance(value, str) and (type(value) is not str or not _visible(value)):
            raise SignatureInvalid("component parameter is not a plain string")
    if name.startswith("@"):
        if name not in _DERIVED:
            raise SignatureInvalid(f"unsupported derived component {_show(name)}")
        if name == "@query-param":
            if keys != ["name"] or type(params[0][1]) is not str:
                raise SignatureInvalid("@query-param takes exactly a string name parameter")
        elif params:
            raise SignatureInvalid(f"unsupported parameter on {name}")
        return
    if not _FIELD_NAME.match(name):
        raise SignatureInvalid("invalid field name in covered components")
    for key, value in params:
        if not ((key == "sf" and value is True) or (key == "key" and type(value) is str)):
            raise SignatureInvalid(f"unsupported parameter on {_show(name)}")


def _component_from_item(item: Item) -> Component:
    # Tokens and display strings subclass str; an identifier must be an sf-string exactly.
    if type(item.value) is not str:
        raise SignatureInvalid("covered components must be strings")
    params: list[tuple[str, ComponentParam]] = []
    for key, value in item.params.items():
        if not isinstance(value, (str, bool)):
            raise SignatureInvalid("unsupported component parameter value")
        params.append((key, value))
    component = Component(item.value, tuple(params))
    _check_component(component)
    return component


# -- component values ----------------------------------------------------------------------------


def _target(message: Message) -> SplitResult:
    try:
        parts = urlsplit(message.target_uri)
    except ValueError:
        raise SignatureInvalid("invalid target URI") from None
    if not parts.scheme or not parts.netloc:
        raise SignatureInvalid("target URI is not absolute")
    return parts


def _authority(scheme: str, netloc: str) -> str:
    host = netloc.rpartition("@")[2].lower()  # userinfo is never part of the authority
    default = _DEFAULT_PORTS.get(scheme.lower())
    if default and host.endswith(default):
        host = host[: -len(default)]
    return host


def _form_encode(text: str) -> str:
    # RFC 9421 §2.2.8: the application/x-www-form-urlencoded percent-encode set, space as %20.
    return quote(text, safe="*-._", encoding="utf-8", errors="strict").replace("~", "%7E")


def _query_param(query: str, name: str) -> str:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
        values = [_form_encode(v) for k, v in pairs if _form_encode(k) == name]
    except ValueError:  # includes UnicodeError
        raise SignatureInvalid("malformed query string") from None
    if not values:
        raise SignatureInvalid(f"covered query parameter {_show(name)} is missing")
    if len(values) > 1:
        raise SignatureInvalid(f"query parameter {_show(name)} is repeated and cannot be covered")
    return values[0]


def _derived_value(message: Message, component: Component) -> str:
    name = component.name
    if name == "@method":
        if not message.method:
            raise SignatureInvalid("covered component @method is missing")
        return message.method
    if name == "@status":
        status = message.status
        if status is None or type(status) is not int or not 100 <= status <= 999:
            raise SignatureInvalid("covered component @status is missing")
        return str(status)
    if name == "@target-uri":
        if not message.target_uri.startswith(("http://", "https://")):
            _target(message)  # raises: not an absolute URI
        return message.target_uri
    parts = _target(message)
    if name == "@authority":
        return _authority(parts.scheme, parts.netloc)
    if name == "@scheme":
        return parts.scheme.lower()
    path = parts.path or "/"
    if name == "@path":
        return path
    if name == "@query":
        return "?" + parts.query
    if name == "@request-target":
        return path + ("?" + parts.query if parts.query else "")
    query_name = component.param("name")
    assert isinstance(query_name, str)  # _check_component guarantees it
    return _query_param(parts.query, query_name)


def _parse_dictionary(value: str) -> Dictionary:
    """Parse an RFC 8941 Dictionary; raises ``ValueError`` (``UnicodeError`` for non-ASCII)."""
    parsed = Dictionary()
    parsed.parse(value.encode("ascii"))
    return parsed


def _field_value(message: Message, component: Component) -> str:
    name = component.name
    raw = message.headers.get(name)
    if raw is None:
        raise SignatureInvalid(f"covered component {_show(name)} is missing")
    value = _OBS_FOLD.sub(" ", raw).strip(" \t")
    key = component.param("key")
    if key is None and component.param("sf") is None:
        return value
    if key is None and name not in _DICTIONARY_FIELDS:
        raise SignatureInvalid(f"{_show(name)} is not a known structured field")
    try:
        parsed = _parse_dictionary(value)
        if key is None:
            return str(parsed)
        if not isinstance(key, str) or key not in parsed:
            raise SignatureInvalid(f"covered dictionary member of {_show(name)} is missing")
        return str(parsed[key])
    except ValueError:  # includes UnicodeError
        raise SignatureInvalid(f"covered field {_show(name)} is not a structured field") from None


def _component_value(message: Message, component: Component) -> str:
    if component.name.startswith("@"):
        value = _derived_value(message, component)
    else:
        value = _field_value(message, component)
    # Visible ASCII only: a CR or LF would let a value forge extra lines of the signature base.
    if not _visible(value):
        raise SignatureInvalid(f"covered component {_show(component.name)} has a control or "
                               "non-ASCII character")
    return value


def signature_base(message: Message, components: Sequence[Component | str],
                   signature_params: str) -> bytes:
    """The signature base of RFC 9421 §2.5: the bytes that are signed.

    One line ``<component identifier>: <value>`` per covered component, then
    ``"@signature-params": <signature_params>``; lines are joined with ``\\n`` and there is no
    trailing newline.

    Args:
        message: the request (or response) as the verifier (or signer) sees it.
        components: the covered components, in order (strings are parsed with
            :meth:`Component.parse`).
        signature_params: the serialized inner list with its parameters, as in
            :attr:`ParsedSignature.signature_params` or :meth:`SignatureParams.serialize`.

    Raises:
        SignatureInvalid: a covered component is missing from the message, covered twice,
            unsupported, or its value is not visible ASCII.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for raw in components:
        component = raw if isinstance(raw, Component) else _component_from_string(raw)
        if _COMPONENTS.get(component.name) is not component:  # cached ones were checked
            _check_component(component)
        ident = component.identifier()
        if ident in seen:
            raise SignatureInvalid(f"component {_show(ident)} is covered twice")
        seen.add(ident)
        lines.append(f"{ident}: {_component_value(message, component)}")
    lines.append(f'"@signature-params": {signature_params}')
    try:
        return "\n".join(lines).encode("ascii")
    except UnicodeEncodeError:
        raise SignatureInvalid("signature parameters are not ASCII") from None


def _component_from_string(text: str) -> Component:
    try:
        return Component.parse(text)
    except ValueError as exc:
        raise SignatureInvalid(str(exc)) from None


def build_target_uri(scheme: str, authority: str, path: str, query: str = "") -> str:
    """The ``@target-uri`` a server reconstructs, in the form httpx's ``str(request.url)`` has.

    Args:
        scheme: ``http`` or ``https`` (the connection's, after any trusted proxy rewrite).
        authority: the ``Host`` header (HTTP/1.1) or ``:authority`` (HTTP/2) as received.
        path: the raw, still percent-encoded path (ASGI ``raw_path``).
        query: the raw query string without ``?`` (ASGI ``query_string``), or ``""``.

    The scheme and host are lower-cased and a default port (``:80``, ``:443``) dropped, as
    httpx does when it builds the URL it sends.

    Raises:
        ValueError: ``authority`` is not ``host[:port]`` (see :func:`check_authority`), or
            ``path`` does not start with ``/`` or holds ``?``/``#``, or ``query`` holds ``#``:
            such parts would move the path, query or host of the rebuilt URI.
    """
    check_authority(authority)
    if path and (path[0] != "/" or "?" in path or "#" in path):
        raise ValueError("malformed request path")
    if "#" in query:
        raise ValueError("malformed query string")
    scheme = scheme.lower()
    return f"{scheme}://{_authority(scheme, authority)}{path or '/'}" + (f"?{query}" if query else "")


# host[:port]: an IP literal, or a reg-name of unreserved, sub-delims and %-escapes (RFC 3986
# §3.2.2); no userinfo, and none of / ? # that would end the authority early.
_AUTHORITY: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)"
    r"(?::[0-9]{0,5})?")  # an IPv6 literal may name its zone (RFC 6874: [fe80::1%25eth0])


def check_authority(authority: str) -> str:
    """Return a ``Host`` header (or ``:authority``) that is ``host[:port]``, else raise.

    A value such as ``example.com/v1/keys/k/rotate#`` would otherwise become part of a URI
    rebuilt from it and move the real path out of ``@path`` (or of a DPoP ``htu``).

    Raises:
        ValueError: anything else (empty, userinfo, a path, query or fragment, spaces).
    """
    if not _AUTHORITY.fullmatch(authority):
        raise ValueError("malformed Host header")
    return authority


# -- Content-Digest (RFC 9530) -------------------------------------------------------------------


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """The ``Content-Digest`` header value for ``body``: ``sha-256=:X48E9q...=:``.

    Raises:
        ValueError: for an algorithm other than ``sha-256`` or ``sha-512``.
    """
    digest = _DIGESTS.get(algorithm)
    if digest is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    field = Dictionary()
    field[algorithm] = digest(body).digest()
    return str(field)


def check_content_digest(header: str | None, body: bytes, *, required: bool) -> None:
    """Check a ``Content-Digest`` header against the body.

    Every supported algorithm present (``sha-256``, ``sha-512``) must match and at least one
    must be present; unknown algorithms are ignored. An absent header is fine unless
    ``required``.

    Raises:
        DigestMismatch: the header is required and absent, malformed, has no supported
            algorithm, or a digest does not match.
        HeaderTooLarge: the header is longer than :data:`MAX_CONTENT_DIGEST_LENGTH`.
    """
    if header is None:
        if required:
            raise DigestMismatch("missing Content-Digest")
        return
    if len(header) > MAX_CONTENT_DIGEST_LENGTH:
        raise HeaderTooLarge("Content-Digest header too large")
    if not header.isascii():
        raise DigestMismatch("malformed Content-Digest")
    if header.startswith("sha-256=:") and len(header) == 54 and header[-1] == ":":
        # the usual single sha-256 member: compare the canonical encoding, no parser needed
        expected = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        if not hmac.compare_digest(header[9:53], expected):
            raise DigestMismatch()
        return
    try:
        field = _parse_dictionary(header)
    except ValueError:
        raise DigestMismatch("malformed Content-Digest") from None
    checked = False
    for algorithm, member in field.items():
        digest = _DIGESTS.get(algorithm)
        if digest is None:
            continue
        if not isinstance(member, Item) or type(member.value) is not bytes:
            raise DigestMismatch("malformed Content-Digest")
        if member.value != digest(body).digest():
            raise DigestMismatch()
        checked = True
    if not checked:
        raise DigestMismatch("Content-Digest has no sha-256 or sha-512 digest")


# -- Signature-Input / Signature -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignatureParams:
    """The covered components and signature parameters of one signature (RFC 9421 §2.3).

    Attributes:
        components: the covered components, in order.
        created: Unix seconds the signature was made.
        expires: Unix seconds after which it must not be accepted.
        keyid: which key made it (chosen by the application; keygrants uses
            ``<principal>/<key thumbprint>``).
        nonce: a value unique per key, for replay protection.
        alg: the algorithm the signer claims; verifiers compare it, never follow it.
        tag: an application-specific tag.
    """

    components: tuple[Component, ...]
    created: int | None = None
    expires: int | None = None
    keyid: str | None = None
    nonce: str | None = None
    alg: str | None = None
    tag: str | None = None

    def serialize(self) -> str:
        """The canonical serialized inner list, the ``@signature-params`` value.

        Components come first, then those of ``created``, ``expires``, ``keyid``, ``nonce``,
        ``alg`` and ``tag`` that are set, in that order:
        ``("@method" "@target-uri");created=1618884473;keyid="k"``.

        Raises:
            ValueError: a value cannot be serialized (a non-ASCII ``keyid``, say).
        """
        return str(self._inner_list())

    def _inner_list(self) -> InnerList:
        inner = InnerList()
        for component in self.components:
            inner.append(component._item())
        for key, value in (("created", self.created), ("expires", self.expires),
                           ("keyid", self.keyid), ("nonce", self.nonce), ("alg", self.alg),
                           ("tag", self.tag)):
            if value is not None:
                inner.params[key] = value
        return inner


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """One labelled signature read from ``Signature-Input`` and ``Signature``.

    ``signature_params`` is the member of ``Signature-Input`` re-serialized canonically: the
    value of ``@signature-params`` in the signature base.
    """

    label: str
    params: SignatureParams
    signature: bytes
    signature_params: str


_STRING_PARAMS: Final = {"keyid": MAX_KEYID_LENGTH, "nonce": MAX_NONCE_LENGTH,
                         "alg": _MAX_ALG_LENGTH, "tag": MAX_TAG_LENGTH}


def _parse_header(value: str, what: str) -> Dictionary:
    try:
        return _parse_dictionary(value)
    except ValueError:  # includes UnicodeError for non-ASCII input
        raise SignatureInvalid(f"malformed {what}") from None


def _signature_params(label: str, inner: InnerList) -> SignatureParams:
    if len(inner) > MAX_COMPONENTS:
        raise SignatureInvalid("too many covered components")
    components = tuple(_component_from_item(item) for item in inner)
    ints: dict[str, int] = {}
    strings: dict[str, str] = {}
    for key, value in inner.params.items():
        if key in ("created", "expires"):
            if type(value) is not int or value < 0:
                raise SignatureInvalid(f"{key} must be a non-negative integer")
            ints[key] = value
        elif key in _STRING_PARAMS:
            if type(value) is not str:
                raise SignatureInvalid(f"{key} must be a string")
            if not value or len(value) > _STRING_PARAMS[key]:
                raise SignatureInvalid(f"{key} is empty or too long")
            strings[key] = value
        else:
            raise SignatureInvalid(f"unknown signature parameter in {_show(label)}")
    return SignatureParams(components, created=ints.get("created"), expires=ints.get("expires"),
                           keyid=strings.get("keyid"), nonce=strings.get("nonce"),
                           alg=strings.get("alg"), tag=strings.get("tag"))


# The common case, one signature written canonically (what the SDK and most signers send), is
# read with two regular expressions instead of the structured-field parser (about 5x quicker).
# The pattern admits only text that the parser would read to the same values and that
# re-serializes to itself, so ``signature_params`` is the input and both paths agree; anything
# else (escapes, whitespace variants, repeated parameters, several signatures) takes the full
# parser.
_PLAIN_NAME: Final = re.compile(r"^@?[a-z0-9!#$%&'*+.^_`|~-]+$")
_FAST_INPUT: Final = re.compile(
    r'([a-z*][a-z0-9_.*-]{0,63})='
    r'(\((?:"@?[a-z0-9!#$%&\'*+.^_`|~-]+"(?: "@?[a-z0-9!#$%&\'*+.^_`|~-]+")*)?\))'
    r'((?:;(?:created|expires)=(?:0|[1-9][0-9]{0,14})'
    r'|;(?:keyid|nonce|alg|tag)="[\x20\x21\x23-\x5b\x5d-\x7e]*")*)')
_FAST_SIGNATURE: Final = re.compile(r"([a-z*][a-z0-9_.*-]{0,63})=:([A-Za-z0-9+/]+={0,2}):")
_FAST_PARAM: Final = re.compile(r';([a-z]+)=(?:"([^"]*)"|([0-9]+))')
_COMPONENTS: dict[str, Component] = {}  # parsed and checked covered components, by name


def _parse_fast(signature_input: str, signature: str) -> list[ParsedSignature] | None:
    m = _FAST_INPUT.fullmatch(signature_input)
    s = _FAST_SIGNATURE.fullmatch(signature)
    if m is None or s is None or m.group(1) != s.group(1):
        return None
    label, inner, param_text = m.group(1), m.group(2), m.group(3)
    names = inner[2:-2].split('" "') if len(inner) > 2 else []
    if len(names) > MAX_COMPONENTS:
        return None
    components: list[Component] = []
    for name in names:
        component = _COMPONENTS.get(name)
        if component is None:
            component = Component(name)
            _check_component(component)
            if len(_COMPONENTS) < 256:
                _COMPONENTS[name] = component
        components.append(component)
    values: dict[str, str] = {}
    for key, text, number in _FAST_PARAM.findall(param_text):
        if key in values:
            return None  # repeated parameter: the full parser decides
        values[key] = number if number else text
    for key, limit in _STRING_PARAMS.items():
        if key in values and not 0 < len(values[key]) <= limit:
            raise SignatureInvalid(f"{key} is empty or too long")
    raw = s.group(2)
    try:
        value = base64.b64decode(raw, validate=True)
    except ValueError:
        return None
    if base64.b64encode(value).decode("ascii") != raw:
        raise SignatureInvalid(f"Signature {_show(label)} is not canonical Base64")
    if not 0 < len(value) <= MAX_SIGNATURE_BYTES:
        raise SignatureInvalid(f"Signature {_show(label)} has a bad length")
    created, expires = values.get("created"), values.get("expires")
    params = SignatureParams(
        tuple(components), created=None if created is None else int(created),
        expires=None if expires is None else int(expires), keyid=values.get("keyid"),
        nonce=values.get("nonce"), alg=values.get("alg"), tag=values.get("tag"))
    return [ParsedSignature(label, params, value, inner + param_text)]


def parse_signatures(signature_input: str, signature: str) -> list[ParsedSignature]:
    """Read every labelled signature, in ``Signature-Input`` order.

    Raises:
        SignatureInvalid: anything malformed: a header that is not a dictionary or is too long,
            labels that differ between the two headers, a member that is not an inner list,
            components that are not strings or not supported, ``created``/``expires`` that are
            not integers, a signature that is not a byte sequence, values over the limits.
    """
    if len(signature_input) > MAX_SIGNATURE_INPUT_LENGTH or len(signature) > MAX_SIGNATURE_LENGTH:
        raise SignatureInvalid("signature header too long")
    fast = _parse_fast(signature_input, signature)
    if fast is not None:
        return fast
    inputs = _parse_header(signature_input, "Signature-Input")
    values = _parse_header(signature, "Signature")
    if len(inputs) > MAX_SIGNATURES or len(values) > MAX_SIGNATURES:
        raise SignatureInvalid("too many signatures")
    if set(inputs) != set(values):
        raise SignatureInvalid("Signature-Input and Signature labels differ")
    parsed: list[ParsedSignature] = []
    for label, member in inputs.items():
        if not isinstance(member, InnerList):
            raise SignatureInvalid(f"Signature-Input {_show(label)} is not an inner list")
        params = _signature_params(label, member)
        value = values[label]
        if (not isinstance(value, Item) or type(value.value) is not bytes
                or value.params):
            raise SignatureInvalid(f"Signature {_show(label)} is not a byte sequence")
        if not 0 < len(value.value) <= MAX_SIGNATURE_BYTES:
            raise SignatureInvalid(f"Signature {_show(label)} has a bad length")
        # The sf parser decodes Base64 leniently (text after the padding is dropped); accept
        # only the canonical encoding so that one signature has one spelling.
        if f":{base64.b64encode(value.value).decode('ascii')}:" not in signature:
            raise SignatureInvalid(f"Signature {_show(label)} is not canonical Base64")
        try:
            serialized = str(member)
        except ValueError:
            raise SignatureInvalid(f"malformed Signature-Input {_show(label)}") from None
        parsed.append(ParsedSignature(label, params, value.value, serialized))
    return parsed


# -- signing and verifying -----------------------------------------------------------------------


def _check_alg(alg: str) -> None:
    if alg not in ALGORITHMS:
        raise ValueError(f"unsupported algorithm {alg!r}; expected one of {', '.join(ALGORITHMS)}")


def _hmac_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_HMAC_KEY_LENGTH:
        raise ValueError(f"hmac-sha256 needs a shared secret of at least {MIN_HMAC_KEY_LENGTH} bytes")
    return key


def sign_message(message: Message, *, key: SigningKey | bytes, alg: str, keyid: str,
                 created: int, expires: int | None = None, nonce: str | None = None,
                 components: Sequence[Component | str], label: str = "sig1",
                 tag: str | None = None, include_alg: bool = False) -> tuple[str, str]:
    """Sign ``message`` and return the ``Signature-Input`` and ``Signature`` header values.

    Args:
        message: what is signed; every covered component must be present in it.
        key: a :class:`SigningKey` for ``ed25519``/``ecdsa-p256-sha256``, the shared secret
            (bytes) for ``hmac-sha256``.
        alg: one of :data:`ALGORITHMS`.
        keyid: the ``keyid`` parameter.
        created: Unix seconds.
        expires: Unix seconds, or ``None`` for no ``expires`` parameter.
        nonce: the ``nonce`` parameter (fresh per request for replay protection).
        components: covered components in order, e.g. ``["@method", "@target-uri"]``.
        label: the dictionary label.
        tag: the ``tag`` parameter.
        include_alg: also send ``alg`` (the verifier pins the algorithm from the key anyway).

    Raises:
        ValueError: an unsupported algorithm, a key that does not match it, a component that
            is missing from the message or unsupported, or a parameter that cannot be sent.
    """
    _check_alg(alg)
    for name, text, limit in (("keyid", keyid, MAX_KEYID_LENGTH), ("nonce", nonce, MAX_NONCE_LENGTH),
                              ("tag", tag, MAX_TAG_LENGTH)):
        if text is not None and not 0 < len(text) <= limit:
            raise ValueError(f"{name} must be 1..{limit} characters")
    for name, when in (("created", created), ("expires", expires)):
        if when is not None and (type(when) is not int or when < 0):
            raise ValueError(f"{name} must be a non-negative integer (Unix seconds)")
    if len(components) > MAX_COMPONENTS:
        raise ValueError(f"at most {MAX_COMPONENTS} covered components")
    covered = tuple(_as_component(c) for c in components)
    params = SignatureParams(covered, created=created, expires=expires, keyid=keyid, nonce=nonce,
                             alg=alg if include_alg else None, tag=tag)
    serialized = params.serialize()
    try:
        base = signature_base(message, covered, serialized)
    except SignatureInvalid as exc:
        raise ValueError(exc.message) from None
    if alg == "hmac-sha256":
        signature = hmac_sha256(_hmac_key(key), base)
    else:
        if not isinstance(key, SigningKey) or key.algorithm != alg:
            raise ValueError(f"{alg} needs a SigningKey of that algorithm")
        signature = key.sign(base)
        if alg == "ecdsa-p256-sha256":
            signature = ecdsa_p256_der_to_raw(signature)
    inputs = Dictionary()
    inputs[label] = params._inner_list()
    values = Dictionary()
    values[label] = signature
    return str(inputs), str(values)


def verify_signature(message: Message, parsed: ParsedSignature, *, key: VerifyingKey | bytes,
                     alg: str) -> None:
    """Check one parsed signature over ``message`` with the verifier's key.

    ``alg`` comes from the key's registration; a signature that names another ``alg`` is
    refused. HMAC tags are compared in constant time.

    Raises:
        SignatureInvalid: the signature does not verify, ``alg`` is unsupported or differs
            from the signature's ``alg`` parameter, or the signature base cannot be built.
        ValueError: ``key`` is not a key for ``alg`` (a configuration error).
    """
    if alg not in ALGORITHMS:
        raise SignatureInvalid("unsupported signature algorithm")
    if parsed.params.alg is not None and parsed.params.alg != alg:
        raise SignatureInvalid("alg parameter does not match the key")
    if alg != "hmac-sha256" and (not isinstance(key, VerifyingKey) or key.algorithm != alg):
        raise ValueError(f"{alg} needs a VerifyingKey of that algorithm")
    base = signature_base(message, parsed.params.components, parsed.signature_params)
    signature = parsed.signature
    if isinstance(key, VerifyingKey):
        if alg == "ecdsa-p256-sha256":
            ok = (len(signature) == P256_RAW_SIGNATURE_SIZE
                  and key.verify(base, ecdsa_p256_raw_to_der(signature)))
        else:
            ok = key.verify(base, signature)
    else:
        ok = verify_hmac_sha256(_hmac_key(key), base, signature)
    if not ok:
        raise SignatureInvalid()


# -- replay protection ---------------------------------------------------------------------------


class NonceCache:
    """Remembers ``(keyid, nonce)`` pairs until their signatures could no longer be accepted.

    Bounded in memory (``max_entries``) and in time: each pair is kept until the ``until`` its
    caller passes (rounded up to the second: the end of the signature's acceptance window), and
    expired pairs are purged lazily, oldest first, on every call. When the cache is full of
    unexpired pairs it fails closed: it refuses the new nonce rather than forget one that could
    then be replayed. One owner may hold at most ``max_per_key`` pairs (a quarter of the cache
    by default), so a single signer cannot fill the cache and lock every other signer out. The
    owner is the keyid unless the caller names another: the principal behind the key, since
    one principal may hold several keys (or mint proof keys at will).

    A pair is held as a 128-bit BLAKE2b digest of keyid and nonce, in a bucket per owner and
    second of expiry (about 110 bytes a pair, whatever the lengths of keyid and nonce), so the
    default million pairs take about 110 MB at most. Thread-safe.

    Args:
        max_entries: the most pairs remembered at once.
        max_per_key: the most pairs of one owner remembered at once.
    """

    def __init__(self, max_entries: int = DEFAULT_NONCE_CACHE_SIZE,
                 max_per_key: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max = max_entries
        self._max_per_key = max_per_key if max_per_key is not None else max(1, max_entries // 4)
        if self._max_per_key < 1:
            raise ValueError("max_per_key must be positive")
        self._lock = threading.Lock()
        self._until: dict[bytes, int] = {}  # pair digest -> the second it may be forgotten after
        self._buckets: dict[tuple[int, str], list[bytes]] = {}  # (until, owner) -> digests
        self._expiry: list[tuple[int, str]] = []  # heap of the buckets' keys
        self._per_key: dict[str, int] = {}  # pairs held, by owner

    def __len__(self) -> int:
        with self._lock:
            return len(self._until)

    @property
    def capacity(self) -> int:
        """The most pairs remembered at once (``max_entries``)."""
        return self._max

    @staticmethod
    def _pair(keyid: str, nonce: str) -> bytes:
        # length-prefixed: no two (keyid, nonce) pairs share an input
        return hashlib.blake2b(f"{len(keyid)}:{keyid}{nonce}".encode("utf-8", "surrogatepass"),
                               digest_size=16).digest()

    def _purge(self, now: float) -> None:
        expiry, until, buckets, held = self._expiry, self._until, self._buckets, self._per_key
        while expiry and expiry[0][0] < now:
            bucket = heapq.heappop(expiry)
            pairs = buckets.pop(bucket)
            for pair in pairs:
                del until[pair]
            owner = bucket[1]
            left = held[owner] - len(pairs)
            if left:
                held[owner] = left
            else:
                del held[owner]

    def seen(self, keyid: str, nonce: str, *, now: float) -> bool:
        """Whether the pair is remembered and unexpired (a replay), recording nothing."""
        pair = self._pair(keyid, nonce)
        with self._lock:
            until = self._until.get(pair)
            return until is not None and until >= now

    def check_and_remember(self, keyid: str, nonce: str, *, until: float, now: float,
                           owner: str | None = None) -> None:
        """Record a nonce, or refuse it if it was seen and has not expired.

        Args:
            keyid: the key the nonce was used with (nonces are unique per key).
            nonce: the signature's nonce.
            until: when the signature stops being acceptable; the pair is kept until then
                (rounded up to the second).
            now: the current time (same clock as ``until``).
            owner: whose share of the cache the pair counts against (default: ``keyid``).

        Raises:
            NonceReplayed: the pair was seen before and has not expired, or the cache (or this
                owner's share of it) is full of unexpired pairs.
        """
        pair = self._pair(keyid, nonce)
        owner = keyid if owner is None else owner
        second = math.ceil(until)
        with self._lock:
            self._purge(now)
            if pair in self._until:
                raise NonceReplayed()
            if len(self._until) >= self._max:
                raise NonceReplayed("replay cache full; request refused, retry later")
            held = self._per_key.get(owner, 0)
            if held >= self._max_per_key:
                raise NonceReplayed("too many signatures in flight for this signer; retry later")
            self._per_key[owner] = held + 1
            bucket = (second, owner)
            pairs = self._buckets.get(bucket)
            if pairs is None:
                pairs = self._buckets[bucket] = []
                heapq.heappush(self._expiry, bucket)
            else:
                second = self._until[pairs[0]]  # one int object per bucket, not one per pair
            pairs.append(pair)
            self._until[pair] = second


# -- the server-side check -----------------------------------------------------------------------


class RequestVerifier:
    """Verifies the HTTP message signature of one request; policy-free.

    Args:
        resolve_key: ``keyid -> (alg, key)``; raises ``UnknownCredential`` (or another
            ``Unauthenticated`` subclass, which propagates unchanged).
        nonce_cache: the replay cache shared by all requests.
        max_skew: seconds of clock difference tolerated in either direction.
        max_lifetime: the longest acceptable ``expires - created``, and how old ``created``
            may be (plus ``max_skew``).
        require_nonce: refuse signatures without a ``nonce`` parameter.
        nonce_owner: ``keyid -> owner`` whose share of the replay cache a nonce counts
            against (default: the keyid itself; the server names the principal).

    Raises:
        ValueError: for a negative skew or a non-positive lifetime.
    """

    def __init__(self, *, resolve_key: Callable[[str], tuple[str, VerifyingKey | bytes]],
                 nonce_cache: NonceCache, max_skew: int = 60, max_lifetime: int = 300,
                 require_nonce: bool = True,
                 nonce_owner: Callable[[str], str] | None = None) -> None:
        if max_skew < 0:
            raise ValueError("max_skew must not be negative")
        if max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        self._resolve_key = resolve_key
        self._nonces = nonce_cache
        self._max_skew = max_skew
        self._max_lifetime = max_lifetime
        self._require_nonce = require_nonce
        self._nonce_owner = nonce_owner

    def verify(self, message: Message, body: bytes, *, signature_input: str | None,
               signature: str | None, now: float,
               before_nonce: Callable[[str], None] | None = None) -> ParsedSignature:
        """Verify the request's first signature and record its nonce.

        The signature must cover ``@method``, and ``@target-uri`` or all of ``@authority``,
        ``@path`` and ``@query``, and ``content-digest`` when the body is not empty; it must
        carry ``created`` and ``keyid`` (and ``nonce`` if required).

        Args:
            message: the request as the server sees it.
            body: the complete request body.
            signature_input: the ``Signature-Input`` header, or ``None`` if absent.
            signature: the ``Signature`` header, or ``None`` if absent.
            now: the current Unix time.
            before_nonce: called with the keyid once the signature has verified and before its
                nonce is recorded (the caller's credential-state and rate-limit checks: what
                they refuse spends no nonce, and only a key's holder learns its state).

        Returns:
            The verified signature; ``params.keyid`` names the signer.

        Raises:
            SignatureInvalid: a header is absent ("missing Signature-Input"), malformed,
                incomplete, or the signature does not verify.
            HeaderTooLarge: a header is longer than its limit.
            SignatureExpired: ``created``/``expires`` outside the accepted window.
            DigestMismatch: the body does not match ``Content-Digest``.
            NonceReplayed: the nonce was already used with this key.
            Unauthenticated: whatever ``resolve_key`` raises.
        """
        if signature_input is None:
            raise SignatureInvalid("missing Signature-Input")
        if signature is None:
            raise SignatureInvalid("missing Signature")
        if len(signature_input) > MAX_SIGNATURE_INPUT_LENGTH:
            raise HeaderTooLarge("Signature-Input header too large")
        if len(signature) > MAX_SIGNATURE_LENGTH:
            raise HeaderTooLarge("Signature header too large")
        parsed = parse_signatures(signature_input, signature)[0]
        params = parsed.params
        digest_covered = self._check_coverage(params, body)
        created, keyid = params.created, params.keyid
        if created is None:
            raise SignatureInvalid("missing created parameter")
        if keyid is None:
            raise SignatureInvalid("missing keyid parameter")
        if self._require_nonce and params.nonce is None:
            raise SignatureInvalid("missing nonce parameter")
        until = self._check_time(created, params.expires, now)
        if body or digest_covered:
            check_content_digest(message.headers.get("content-digest"), body, required=bool(body))
        alg, key = self._resolve_key(keyid)
        verify_signature(message, parsed, key=key, alg=alg)
        nonce = params.nonce
        # A replay is refused before the caller's checks: replaying a captured request must not
        # spend the signer's rate limit.
        if nonce is not None and self._nonces.seen(keyid, nonce, now=now):
            raise NonceReplayed()
        if before_nonce is not None:
            before_nonce(keyid)
        # Only a verified signature may spend its nonce: a forgery must not burn a real one.
        if nonce is not None:
            owner = self._nonce_owner(keyid) if self._nonce_owner is not None else None
            self._nonces.check_and_remember(keyid, nonce, until=until, now=now, owner=owner)
        return parsed

    @staticmethod
    def _check_coverage(params: SignatureParams, body: bytes) -> bool:
        plain = {c.name for c in params.components if not c.params}
        if "@method" not in plain:
            raise SignatureInvalid("the signature must cover @method")
        if "@target-uri" not in plain and not {"@authority", "@path", "@query"} <= plain:
            raise SignatureInvalid("the signature must cover @target-uri")
        # A ``key`` parameter would cover one digest only; require the whole field.
        digest_covered = any(c.name == "content-digest" and c.params in ((), (("sf", True),))
                             for c in params.components)
        if body and not digest_covered:
            raise SignatureInvalid("the signature must cover content-digest")
        return digest_covered

    def _check_time(self, created: int, expires: int | None, now: float) -> float:
        skew, lifetime = self._max_skew, self._max_lifetime
        if created > now + skew:
            raise SignatureExpired("signature created in the future")
        if created < now - lifetime - skew:
            raise SignatureExpired("signature too old")
        until = float(created + lifetime + skew)
        if expires is not None:
            if expires < created:
                raise SignatureInvalid("expires precedes created")
            if expires - created > lifetime:
                raise SignatureExpired("signature lifetime too long")
            if expires + skew < now:
                raise SignatureExpired("signature expired")
            until = min(until, float(expires + skew))
        return until

