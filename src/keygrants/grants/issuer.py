"""Issuer keys: the keys that sign grant tokens, and their staged rollover.

Each issuer key is an Ed25519 key pair whose private half is sealed under the root key (like
every key version) and stored with its schedule:

- ``created_at``: published in the JWKS from this moment;
- ``activate_at``: tokens are signed with it from this moment (the newest activated key signs);
- ``retire_at``: dropped from the JWKS, and refused, from this moment (``None`` until a
  successor is planned).

A rotation at time ``T`` publishes a new key at ``T`` that activates at ``T + refresh`` (one
JWKS refresh interval, so every verifier that follows the ``Cache-Control`` hint has it before
the first token it signs), and schedules every older key's retirement for
``T + refresh + max_token_lifetime + leeway``: after the last token it signed has expired.
The very first key is active at once (nothing can hold an older JWKS).

Pure: times are passed in; the store and the root key are the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

from keygrants.auth.credentials import jwk_thumbprint
from keygrants.crypto.signing import SigningKey, VerifyingKey
from keygrants.grants.token import IssuerPublicKey

__all__ = [
    "ISSUER_ALG",
    "IssuerKey",
    "IssuerKeyring",
    "issuer_secret_name",
    "new_issuer_key",
]

ISSUER_ALG: Final = "EdDSA"


class IssuerKey(msgspec.Struct, frozen=True, kw_only=True):
    """One stored issuer key (the private half sealed)."""

    kid: str
    alg: str
    public_raw: bytes
    sealed: bytes
    seq: int
    created_at: int
    activate_at: int
    retire_at: int | None = None

    def live(self, now: int) -> bool:
        """Published and not yet retired at ``now``."""
        return self.created_at <= now and (self.retire_at is None or now < self.retire_at)


def issuer_secret_name(kid: str) -> str:
    """The name an issuer key's private half is sealed under (binds the blob to its kid)."""
    return f"issuer-key:{kid}"


def new_issuer_key(seq: int, now: int, activate_at: int) -> tuple[IssuerKey, SigningKey]:
    """A fresh Ed25519 issuer key (unsealed: the caller seals ``sealed``; see the service).

    The ``kid`` is the RFC 7638 thumbprint of the public key, so it is derived from the key and
    matches :data:`~keygrants.grants.token.KID_PATTERN`.
    """
    signing = SigningKey.generate("ed25519")
    public = signing.public_key()
    kid = jwk_thumbprint(public.jwk())
    key = IssuerKey(kid=kid, alg=ISSUER_ALG, public_raw=public.public_raw(), sealed=b"", seq=seq,
                    created_at=now, activate_at=activate_at)
    return key, signing


class IssuerKeyring:
    """The issuer keys known to this process, with the unsealed signers of the live ones."""

    def __init__(self, keys: Iterable[IssuerKey], signers: dict[str, SigningKey]) -> None:
        self.keys: tuple[IssuerKey, ...] = tuple(sorted(keys, key=lambda k: k.seq))
        self._signers = signers
        self._public: dict[str, IssuerPublicKey] = {
            k.kid: IssuerPublicKey(k.kid, k.alg, VerifyingKey.from_raw("ed25519", k.public_raw))
            for k in self.keys
        }
        self._views: tuple[int, dict[str, IssuerPublicKey]] = (-1, {})

    @property
    def seq(self) -> int:
        """The JWKS sequence number: the newest key's ``seq`` (0 when there is none)."""
        return self.keys[-1].seq if self.keys else 0

    def signer(self, now: int) -> tuple[IssuerKey, SigningKey] | None:
        """The key that signs at ``now``: the newest activated live one."""
        for key in reversed(self.keys):
            if key.activate_at <= now and key.live(now) and key.kid in self._signers:
                return key, self._signers[key.kid]
        return None

    def verification_keys(self, now: int) -> dict[str, IssuerPublicKey]:
        """``kid`` → public key for every key that may verify a token at ``now``."""
        cached_at, view = self._views
        if cached_at == now:
            return view
        view = {k.kid: self._public[k.kid] for k in self.keys if k.live(now)}
        self._views = (now, view)
        return view

    def jwks(self, now: int) -> dict[str, object]:
        """The published JWKS document: every live key, and the sequence number."""
        keys = []
        for k in self.keys:
            if k.live(now):
                jwk = dict(self._public[k.kid].key.jwk(kid=k.kid))
                jwk.update(use="sig", alg=k.alg)
                keys.append(jwk)
        return {"keys": keys, "seq": self.seq}

    def pending(self, now: int) -> IssuerKey | None:
        """A published key that has not started signing yet (a rotation in progress)."""
        for key in self.keys:
            if key.activate_at > now and key.live(now):
                return key
        return None

    def rotation_due(self, now: int, period: int) -> bool:
        """Whether a scheduled rotation should start: no key, or the signer has signed for
        ``period`` seconds and no successor is already staged."""
        current = self.signer(now)
        if current is None:
            return self.pending(now) is None
        return self.pending(now) is None and current[0].activate_at + period <= now

    def plan_retirements(self, now: int, activate_at: int, max_lifetime: int,
                         leeway: int) -> Sequence[tuple[str, int]]:
        """``(kid, retire_at)`` for every live key once a successor activates at
        ``activate_at``: after the last token they can have signed has expired."""
        retire_at = activate_at + max_lifetime + leeway
        return [(k.kid, min(retire_at, k.retire_at) if k.retire_at is not None else retire_at)
                for k in self.keys if k.live(now)]
