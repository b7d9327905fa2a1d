"""Request signing for the SDK: an ``httpx.Auth`` that adds RFC 9421 signatures.

Every request gets, when its body is not empty, a ``Content-Digest`` (sha-256, RFC 9530), then
a signature labelled ``sig1`` over ``@method``, ``@target-uri`` and ``content-digest`` (when
present) with ``created``, ``expires = created + lifetime``, ``keyid`` and a fresh 128-bit
``nonce``. The server's :class:`keygrants.auth.httpsig.RequestVerifier` checks it.

``@target-uri`` is the request URL exactly as a server rebuilds it from the request line and
``Host`` with :func:`keygrants.auth.httpsig.build_target_uri`: scheme and host lower-cased, the
default port omitted, path and query percent-encoded as sent. That is ``str(request.url)``,
except that an empty path is signed as ``/`` and an empty query without its ``?``, as they
arrive on the wire.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Generator
from typing import Final

import httpx

from keygrants._files import exposed_mode
from keygrants.auth.httpsig import ALGORITHMS, Message, build_target_uri, content_digest, sign_message
from keygrants.crypto.random import nonce_bytes
from keygrants.crypto.signing import SigningKey, b64url

__all__ = [
    "MAX_KEY_FILE",
    "NONCE_BYTES",
    "SignatureAuth",
    "exposed_mode",
    "load_signing_key",
    "private_file_problem",
    "target_uri",
    "warn_if_exposed",
]

NONCE_BYTES: Final = 16
MAX_KEY_FILE: Final = 64 * 1024  # bytes: a PEM private key or shared secret file is far smaller
_SIGNATURE_HEADERS: Final = ("Signature-Input", "Signature", "Content-Digest")


def private_file_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with the mode of a private key or secret file (see :func:`exposed_mode`),
    naming the file and the ``chmod`` that fixes it; ``None`` when nothing is.

    The SDK warns with this text (:func:`warn_if_exposed`); the CLI refuses the file.
    """
    mode = exposed_mode(path)
    if mode is None:
        return None
    name = os.fspath(path)
    return (f"private key file {name} is accessible by group or others "
            f"(mode {mode:o}); run: chmod 600 {name}")


def warn_if_exposed(path: str | os.PathLike[str]) -> None:
    """Warn (``UserWarning``) when :func:`private_file_problem` finds a problem with ``path``."""
    problem = private_file_problem(path)
    if problem is not None:
        warnings.warn(problem, UserWarning, stacklevel=3)


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a PEM private key file (PKCS#8 Ed25519 or ECDSA P-256), with a ``UserWarning``
    when group or others may access it (:func:`private_file_problem`).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not an unencrypted Ed25519 or P-256 private key.
    """
    with open(path, "rb") as f:
        pem = f.read(MAX_KEY_FILE + 1)
    if len(pem) > MAX_KEY_FILE:
        raise ValueError(f"{path} is larger than {MAX_KEY_FILE} bytes: not a private key file")
    try:
        key = SigningKey.from_pem(pem)
    except (ValueError, TypeError):  # pyca's words ("Are you sure this is a private key?")
        raise ValueError(f"{path} is not an unencrypted Ed25519 or ECDSA P-256 private key "
                         "(PEM)") from None
    if key.algorithm not in ALGORITHMS:
        raise ValueError(f"{key.algorithm} keys cannot sign requests; use Ed25519 or ECDSA P-256")
    warn_if_exposed(path)
    return key


def target_uri(request: httpx.Request) -> str:
    """The ``@target-uri`` of ``request`` as the server will see it (the request line and ``Host``)."""
    url = request.url
    path, _, query = url.raw_path.decode("ascii").partition("?")
    authority = request.headers.get("host") or url.netloc.decode("ascii")
    return build_target_uri(url.scheme, authority, path, query)


class SignatureAuth(httpx.Auth):
    """Signs every request with an HTTP message signature.

    Args:
        keyid: the ``keyid`` the server knows the key by.
        key: a :class:`SigningKey` (``ed25519``, ``ecdsa-p256-sha256``) or a shared secret
            (bytes, ``hmac-sha256``).
        alg: the algorithm; by default the key's own (``hmac-sha256`` for bytes).
        lifetime: seconds from ``created`` to ``expires``; keep it within the server's
            ``max_signature_lifetime``.
        clock: Unix time (injected in tests).

    Raises:
        ValueError: an unsupported algorithm, or one that does not match the key.
    """

    requires_request_body = True

    def __init__(self, keyid: str, key: SigningKey | bytes, *, alg: str | None = None,
                 lifetime: int = 60, clock: Callable[[], float] = time.time) -> None:
        if isinstance(key, SigningKey):
            alg = alg or key.algorithm
            if alg != key.algorithm:
                raise ValueError(f"alg {alg!r} does not match the {key.algorithm} key")
        else:
            alg = alg or "hmac-sha256"
            if alg != "hmac-sha256":
                raise ValueError("a shared secret (bytes) signs with hmac-sha256 only")
        if alg not in ALGORITHMS:
            raise ValueError(f"{alg} cannot sign requests; expected one of {', '.join(ALGORITHMS)}")
        if lifetime < 1:
            raise ValueError("lifetime must be at least one second")
        self.keyid = keyid
        self.alg = alg
        self.lifetime = lifetime
        self._key = key
        self._clock = clock

    def __repr__(self) -> str:
        return f"SignatureAuth(keyid={self.keyid!r}, alg={self.alg!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Sign ``request`` and send it once."""
        self.sign(request)
        yield request

    def sign(self, request: httpx.Request) -> None:
        """Add ``Content-Digest`` (for a body), ``Signature-Input`` and ``Signature`` to ``request``.

        The body must have been read (``requires_request_body`` makes httpx do so).
        """
        for name in _SIGNATURE_HEADERS:
            request.headers.pop(name, None)  # never let stale values ride along unsigned
        body = request.content
        components = ["@method", "@target-uri"]
        headers: dict[str, str] = {}
        if body:
            headers["content-digest"] = request.headers["Content-Digest"] = content_digest(body)
            components.append("content-digest")
        created = int(self._clock())
        message = Message(method=request.method, target_uri=target_uri(request), headers=headers)
        signature_input, signature = sign_message(
            message, key=self._key, alg=self.alg, keyid=self.keyid, created=created,
            expires=created + self.lifetime, nonce=b64url(nonce_bytes(NONCE_BYTES)),
            components=components)
        request.headers["Signature-Input"] = signature_input
        request.headers["Signature"] = signature
