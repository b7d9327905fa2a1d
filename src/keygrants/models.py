"""Request and result types shared by the service, the HTTP edge and the SDK.

They are msgspec structs, so the same class is the service's return value, the JSON the
server sends (``bytes`` fields travel as standard base64, times as RFC 3339) and the typed
result the SDK hands back. Request structs forbid unknown fields: a misspelled option is an
error, not a silent default.

Fields carry the limits the service enforces (lengths, ranges, item counts, patterns) as
JSON-schema keywords for the OpenAPI document only (:func:`_doc`): msgspec does not check them
on decoding, so a value out of bounds is still refused by the service, with its own error code
and message, exactly as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypedDict

import msgspec

from keygrants.audit.events import AuditEvent

__all__ = [
    "GRANT_TOKEN_TYPE_URI",
    "TOKEN_EXCHANGE_GRANT_TYPE",
    "AliasInfo",
    "AuditCheckpoint",
    "AuditDigest",
    "AuditEventPage",
    "AuditHashRequest",
    "AuditKey",
    "BatchDecryptItem",
    "BatchDecryptRequest",
    "BatchEncryptItem",
    "BatchEncryptRequest",
    "BatchItemError",
    "BatchItemResult",
    "BatchResult",
    "ConsistencyProof",
    "CreateAliasRequest",
    "CreateGrantRequest",
    "CreateKeyRequest",
    "DataKey",
    "DataKeyRequest",
    "DecryptRequest",
    "DecryptResult",
    "DeriveRequest",
    "DerivedKey",
    "EncryptRequest",
    "EncryptResult",
    "GrantCreated",
    "GrantDecisionRequest",
    "GrantInfo",
    "GrantList",
    "Health",
    "InclusionProof",
    "IssuerKeyInfo",
    "JwkSet",
    "KeyInfo",
    "KeyList",
    "MacRequest",
    "MacResult",
    "MessageType",
    "PublicKey",
    "RandomRequest",
    "RandomResult",
    "ReEncryptRequest",
    "ReEncryptResult",
    "Readiness",
    "RevocationEntryInfo",
    "RevocationFeed",
    "RevokeAllRequest",
    "RevokeAllResult",
    "ScheduleDeletionRequest",
    "SignRequest",
    "SignResult",
    "TokenExchangeRequest",
    "TokenExchangeResult",
    "UpdateKeyRequest",
    "VerifyMacRequest",
    "VerifyRequest",
    "VerifyResult",
]



def _doc(**schema: Any) -> msgspec.Meta:
    """JSON-schema keywords for the OpenAPI document, not checks: msgspec enforces only a
    ``Meta``'s constraints, and ``extra_json_schema`` is none (the service enforces them)."""
    return msgspec.Meta(extra_json_schema=schema)


MessageType = Literal["raw", "digest"]
Context = Annotated[dict[str, Annotated[str, _doc(maxLength=1024)]], _doc(
    maxProperties=64, propertyNames={"minLength": 1, "maxLength": 256},
    description="Encryption context: at most 64 entries, 8,192 bytes in canonical form.")]
# the service's limits (keys.model, keys.tags, service, access, grant_service, audit.service):
# tests/api/test_openapi_complete.py pins each one to its constant
_KeyName = Annotated[str, _doc(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                               description="1-128 characters; not UUID-shaped")]
_PrincipalName = Annotated[str, _doc(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]
_Tags = Annotated[list[Annotated[str, _doc(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$")]],
                  _doc(maxItems=32)]
_Description = Annotated[str, _doc(maxLength=1024)]
_Label = Annotated[str, _doc(maxLength=128)]
_RotationPeriod = Annotated[int, _doc(minimum=60, maximum=316_224_000)]
_Note = Annotated[str, _doc(minLength=1, maxLength=1024)]


# grant tokens are bearer secrets until they expire: token (GrantCreated), access_token
# (TokenExchangeResult), subject_token (TokenExchangeRequest)
_SECRET_FIELDS: Final = frozenset({"plaintext", "derived", "random", "api_key", "shared_secret",
                                   "token", "access_token", "subject_token"})


def _redacted_repr(self: msgspec.Struct) -> str:
    """A repr that never shows secrets (plaintext, data keys, derived and random bytes, API
    keys, shared secrets, grant tokens): results end up in logs and tracebacks. Only the repr:
    encoding is untouched."""
    parts = []
    for name in self.__struct_fields__:
        value = getattr(self, name)
        shown = ("<redacted>" if name in _SECRET_FIELDS and value is not None else repr(value))
        parts.append(f"{name}={shown}")
    return f"{type(self).__name__}({', '.join(parts)})"


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    __repr__ = _redacted_repr


class _Result(msgspec.Struct, kw_only=True):
    __repr__ = _redacted_repr


# -- system ---------------------------------------------------------------------------------


class Health(TypedDict):
    """Liveness: the process answers."""

    status: Literal["ok"]


class Readiness(TypedDict):
    """Readiness: ``ready`` (200) when the store answers a read, else ``unavailable`` (503)."""

    status: Literal["ready", "unavailable"]


class JwkSet(TypedDict):
    """The issuer's JWK Set (RFC 7517): every key that may verify a live grant token, the
    feed sequence number ``seq``, and the ``issuer`` its tokens carry as ``iss``."""

    keys: list[dict[str, str]]
    seq: int
    issuer: str


# -- key management -------------------------------------------------------------------------


class CreateKeyRequest(_Request):
    """Create a key. ``rotation_period`` is in seconds."""

    name: _KeyName
    spec: str = "aes-256-gcm"
    description: _Description = ""
    rotation_period: _RotationPeriod | None = None
    derivable: bool = False
    tags: _Tags = []


class UpdateKeyRequest(_Request):
    """Change a key's settings; absent fields are left alone (``rotation_period: 0`` turns
    scheduled rotation off; ``tags`` replaces the whole set)."""

    description: _Description | None = None
    rotation_period: Annotated[int, _doc(
        minimum=0, maximum=316_224_000, description="0 (off) or 60..316224000 seconds")] | None = None
    min_decryption_version: Annotated[int, _doc(minimum=1)] | None = None
    tags: _Tags | None = None


class ScheduleDeletionRequest(_Request):
    """Schedule destruction of a key's material after a waiting period of 7 to 30 days."""

    days: Annotated[int, _doc(minimum=7, maximum=30)] = 30


class CreateAliasRequest(_Request):
    """Point an alias at a key."""

    alias: _KeyName
    key: str


class KeyInfo(_Result):
    """A key's metadata (never its material)."""

    id: str
    name: str
    spec: str
    purpose: str
    description: str
    state: str
    derivable: bool
    created_at: datetime
    updated_at: datetime
    latest_version: int
    min_decryption_version: int
    rotation_period: int | None = None
    next_rotation_at: datetime | None = None
    deletion_date: datetime | None = None
    tags: list[str] = []
    aliases: list[str] = []


class KeyList(_Result):
    """One page of keys; pass ``next`` as ``after`` for the next page."""

    keys: list[KeyInfo]
    next: str | None = None


class AliasInfo(_Result):
    """An alias and the key it names."""

    alias: str
    key_id: str


# -- encryption -----------------------------------------------------------------------------


class EncryptRequest(_Request):
    """Encrypt ``plaintext`` (base64 on the wire) under a key's latest version."""

    plaintext: bytes
    context: Context | None = None


class EncryptResult(_Result):
    """A native ciphertext and the key version that made it."""

    ciphertext: bytes
    key_id: str
    key_version: int


class DecryptRequest(_Request):
    """Decrypt a native ciphertext; the key is named inside it."""

    ciphertext: bytes
    context: Context | None = None


class DecryptResult(_Result):
    """Recovered plaintext and the key version that had made the ciphertext."""

    plaintext: bytes
    key_id: str
    key_version: int


class ReEncryptRequest(_Request):
    """Decrypt and encrypt again inside the server; the plaintext is never returned."""

    ciphertext: bytes
    context: Context | None = None
    destination_key: str | None = None
    destination_context: Context | None = None


class ReEncryptResult(_Result):
    """The new ciphertext, with where it came from and what made it."""

    ciphertext: bytes
    key_id: str
    key_version: int
    source_key_id: str
    source_key_version: int


class DataKeyRequest(_Request):
    """Generate a data key of 16, 32 or 64 bytes, encrypted under the key."""

    bytes: Annotated[int, _doc(enum=[16, 32, 64])] = 32
    context: Context | None = None
    include_plaintext: bool = True


class DataKey(_Result):
    """A data key: its encrypted form, and the plaintext unless asked not to."""

    ciphertext: bytes
    key_id: str
    key_version: int
    plaintext: bytes | None = None


class BatchEncryptItem(_Request):
    """One item of a batch encrypt."""

    plaintext: bytes
    context: Context | None = None


class BatchEncryptRequest(_Request):
    """Up to 1,000 items under one key."""

    items: Annotated[list[BatchEncryptItem], _doc(minItems=1, maxItems=1000)]


class BatchDecryptItem(_Request):
    """One item of a batch decrypt."""

    ciphertext: bytes
    context: Context | None = None


class BatchDecryptRequest(_Request):
    """Up to 1,000 ciphertexts, each naming its own key."""

    items: Annotated[list[BatchDecryptItem], _doc(minItems=1, maxItems=1000)]


class BatchItemError(_Result):
    """Why one batch item failed."""

    code: str
    message: str


class BatchItemResult(_Result, omit_defaults=True):
    """One batch item's outcome: ``ciphertext`` (encrypt) or ``plaintext`` (decrypt) with the
    key version, or ``error``."""

    ciphertext: bytes | None = None
    plaintext: bytes | None = None
    key_id: str | None = None
    key_version: int | None = None
    error: BatchItemError | None = None


class BatchResult(_Result):
    """Per-item results, in request order."""

    results: list[BatchItemResult]


# -- signing and MAC ------------------------------------------------------------------------


class SignRequest(_Request):
    """Sign a message, or a SHA-256 digest of one (``message_type: "digest"``)."""

    message: bytes
    message_type: MessageType = "raw"


class SignResult(_Result):
    """A signature and the key version that made it."""

    signature: bytes
    key_id: str
    key_version: int
    algorithm: str


class VerifyRequest(_Request):
    """Check a signature; without ``key_version`` every live version is tried, newest
    first."""

    message: bytes
    signature: bytes
    message_type: MessageType = "raw"
    key_version: int | None = None


class VerifyResult(_Result):
    """Whether the signature or tag is valid, and which version matched."""

    valid: bool
    key_id: str
    key_version: int | None = None


class MacRequest(_Request):
    """Compute an HMAC-SHA256 tag."""

    message: bytes


class MacResult(_Result):
    """A tag and the key version that made it."""

    mac: bytes
    key_id: str
    key_version: int


class VerifyMacRequest(_Request):
    """Check a tag; without ``key_version`` every live version is tried, newest first."""

    message: bytes
    mac: bytes
    key_version: int | None = None


class PublicKey(_Result):
    """A signing key version's public half."""

    key_id: str
    key_version: int
    algorithm: str
    pem: str
    jwk: dict[str, str]


# -- derive and random ----------------------------------------------------------------------


class DeriveRequest(_Request):
    """HKDF-SHA256 from a derivable key, bound to ``context`` (and optional ``salt``)."""

    context: Context
    length: Annotated[int, _doc(minimum=1, maximum=1024)] = 32
    salt: Annotated[bytes, _doc(description="at most 1,024 bytes")] | None = None
    key_version: int | None = None


class DerivedKey(_Result):
    """Derived bytes and the key version they came from."""

    derived: bytes
    key_id: str
    key_version: int


class RandomRequest(_Request):
    """Ask for random bytes from the server's CSPRNG."""

    bytes: Annotated[int, _doc(minimum=1, maximum=1024)] = 32


class RandomResult(_Result):
    """Random bytes."""

    random: bytes


# -- audit ----------------------------------------------------------------------------------


class AuditCheckpoint(_Result):
    """A signed checkpoint of the audit log (C2SP signed note text in ``note``)."""

    size: int
    time: int
    root: bytes
    note: str


class AuditEventPage(_Result):
    """Audit events (canonical JSON objects) in sequence order; pass ``next`` as ``after``."""

    events: list[AuditEvent]
    next: int | None = None


class InclusionProof(_Result):
    """RFC 6962 audit path of one event in the tree of ``size`` events."""

    index: int
    size: int
    leaf_hash: bytes
    proof: list[bytes]


class ConsistencyProof(_Result):
    """RFC 6962 consistency proof between two tree sizes."""

    old_size: int
    new_size: int
    proof: list[bytes]


class AuditHashRequest(_Request):
    """A sensitive value (a token, a key) to find in the log."""

    value: Annotated[str, _doc(maxLength=8192)]


class AuditDigest(_Result):
    """The keyed digest the log records in place of a value."""

    digest: str


class AuditKey(_Result):
    """The audit log's identity and checkpoint verifier key (pin it for ``audit verify``)."""

    origin: str
    vkey: str


# -- principals, credentials and policies -------------------------------------------------------


class CreatePrincipalRequest(_Request):
    """Create a principal (a service or a person); ``id`` is its name."""

    id: _PrincipalName
    display_name: Annotated[str, _doc(maxLength=256)] = ""
    tags: _Tags = []


class UpdatePrincipalRequest(_Request):
    """Change a principal; absent fields are left alone (``tags`` replaces the whole set)."""

    display_name: Annotated[str, _doc(maxLength=256)] | None = None
    tags: _Tags | None = None


class CredentialInfo(_Result):
    """A credential's public facts (never an API key or its hash)."""

    id: str
    principal: str
    kind: str
    label: str
    not_before: datetime
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    algorithm: str | None = None
    public_key_jwk: dict[str, str] | None = None
    keyid: str | None = None
    match: str | None = None
    state: str = "active"


class PrincipalInfo(_Result):
    """A principal and, when shown alone, its credentials."""

    id: str
    display_name: str
    tags: list[str]
    enabled: bool
    builtin: bool
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None = None
    credentials: list[CredentialInfo] | None = None


class PrincipalList(_Result):
    """One page of principals; ``next`` is the cursor for the following page."""

    principals: list[PrincipalInfo]
    next: str | None = None


class AddPublicKeyRequest(_Request):
    """Register a public key (PEM SubjectPublicKeyInfo or a JWK as JSON text).

    ``not_before``/``expires_at`` are Unix seconds; ``expires_in`` (seconds) is a shortcut."""

    public_key: str
    label: _Label = ""
    not_before: int | None = None
    expires_at: int | None = None
    expires_in: int | None = None


class CreateApiKeyRequest(_Request):
    """Issue an API key for a principal (it is shown once)."""

    label: _Label = ""
    not_before: int | None = None
    expires_at: int | None = None
    expires_in: int | None = None


class ApiKeyCreated(_Result):
    """A new API key; ``api_key`` is shown only in this response."""

    credential: CredentialInfo
    api_key: str


class SharedSecretCreated(_Result):
    """A new shared secret for ``hmac-sha256`` signatures; shown only in this response. Sign
    with the 256-bit key it encodes and ``keyid`` ``credential.keyid``."""

    credential: CredentialInfo
    shared_secret: str


class AddCertificateRequest(_Request):
    """Map client certificates to a principal: ``match`` is ``sha256:<hex>``,
    ``subject:<RFC 4514 name>``, ``san-dns:<name>``, ``san-uri:<uri>`` or
    ``san-email:<address>``; or give the PEM ``certificate`` to match its fingerprint."""

    match: str | None = None
    certificate: str | None = None
    label: _Label = ""
    not_before: int | None = None
    expires_at: int | None = None
    expires_in: int | None = None


class WhoAmI(_Result):
    """The authenticated caller."""

    principal: str
    credential: str | None
    auth_method: str | None
    tags: list[str] = []


class PutPolicyRequest(_Request):
    """Create or replace a named Cedar policy."""

    text: Annotated[str, _doc(description="Cedar policy text, at most 65,536 bytes (UTF-8)")]
    description: _Description = ""


class PolicyInfo(_Result):
    """A named policy."""

    name: str
    text: str
    description: str
    statements: int
    created_at: datetime
    updated_at: datetime


class GrantFactsRequest(_Request):
    """The grant a ``create_grant`` decision is about (for ``policy test``)."""

    ttl: int = 300
    uses: int = 0
    pop: bool = False
    operations: list[str] = []
    audiences: list[str] = []
    grantee: str = ""


class TestPolicyRequest(_Request):
    """Would ``principal`` be allowed ``action`` on ``key`` (or on principal ``target``, for the
    principal-scoped actions) with this context?"""

    principal: str
    action: str
    key: str | None = None
    target: str | None = None
    context: dict[str, str] | None = None
    source: str = "signature"
    grant: GrantFactsRequest | None = None
    time: int | None = None


class PolicyTestResult(_Result):
    """The decision and which statements made it."""

    allowed: bool
    reasons: list[str]
    errors: list[str]
    explanation: str


# -- grants ------------------------------------------------------------------------------------

class CreateGrantRequest(_Request):
    """Create a grant: ``key`` (id, name or alias; resolved now), ``grantee`` (a principal),
    ``operations``; the rest optional. ``ttl`` in seconds (default 5 minutes), ``max_uses``
    absent = unlimited, ``dpop_jkt``/``x5t_s256`` bind the grant to a proof-of-possession key
    or client certificate."""

    key: str
    grantee: str
    operations: list[str]
    context_equals: dict[str, str] | None = None
    context_subset: dict[str, str] | None = None
    ttl: Annotated[int, _doc(minimum=1, maximum=86400)] | None = None
    not_before: datetime | None = None
    max_uses: Annotated[int, _doc(minimum=1, maximum=1_000_000)] | None = None
    audiences: Annotated[list[Annotated[str, _doc(pattern=r"^[\x21-\x7e]{1,256}$")]],
                         _doc(maxItems=16)] = []
    dpop_jkt: Annotated[str, _doc(pattern=r"^[A-Za-z0-9_-]{43}$")] | None = None
    x5t_s256: Annotated[str, _doc(pattern=r"^[A-Za-z0-9_-]{43}$")] | None = None
    name: Annotated[str, _doc(minLength=1, maxLength=256)] | None = None
    retiring_principal: _PrincipalName | None = None
    justification: _Note | None = None


class GrantInfo(_Result):
    """A grant as its creator, grantee or a key administrator sees it (never its token)."""

    id: str
    key_id: str
    grantee: str
    operations: list[str]
    state: str
    issuer: str
    created_at: datetime
    not_before: datetime
    expires_at: datetime
    uses: int
    max_uses: int | None = None
    context_equals: dict[str, str] | None = None
    context_subset: dict[str, str] | None = None
    audiences: list[str] = []
    dpop_jkt: str | None = None
    x5t_s256: str | None = None
    name: str | None = None
    retiring_principal: str | None = None
    justification: str | None = None
    parent_id: str | None = None
    depth: int = 0
    requires_approval: bool = False
    decided_by: str | None = None
    decided_at: datetime | None = None
    ended_at: datetime | None = None
    ended_by: str | None = None


class GrantCreated(_Result):
    """A new (or re-issued) grant with its token; ``token`` is absent while the grant waits
    for approval."""

    grant: GrantInfo
    token: str | None = None


class GrantList(_Result):
    """One page of grants; ``next`` is the ``after`` of the next page."""

    grants: list[GrantInfo]
    next: str | None = None


class RevokeAllRequest(_Request):
    """Revoke every live grant of one principal or one key (exactly one is given)."""

    principal: str | None = None
    key: str | None = None


class RevokeAllResult(_Result):
    """How many grants were revoked, and the feed entry that covers them."""

    revoked: int
    seq: int


class GrantDecisionRequest(_Request):
    """Approve or reject a pending grant, with an optional note."""

    note: _Note | None = None


TOKEN_EXCHANGE_GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TOKEN_TYPE_URI: Final = "urn:keygrants:params:oauth:token-type:grant"


class TokenExchangeRequest(_Request):
    """RFC 8693-shaped exchange: trade ``subject_token`` (a grant token of the caller) for a
    narrower one. ``scope`` lists operations (space-separated, default: the same); the other
    fields narrow the grant further."""

    subject_token: str
    grant_type: str = TOKEN_EXCHANGE_GRANT_TYPE
    subject_token_type: str = GRANT_TOKEN_TYPE_URI
    requested_token_type: str = GRANT_TOKEN_TYPE_URI
    scope: str | None = None
    audience: list[str] | None = None
    context_equals: dict[str, str] | None = None
    context_subset: dict[str, str] | None = None
    ttl: int | None = None
    max_uses: int | None = None
    dpop_jkt: str | None = None


class TokenExchangeResult(_Result):
    """RFC 8693 §2.2.1 response members, plus the new grant's id."""

    access_token: str
    issued_token_type: str
    token_type: str
    expires_in: int
    scope: str
    grant_id: str


class RevocationEntryInfo(_Result):
    """One revocation feed entry."""

    seq: int
    kind: str
    id: str
    revoked_at: int
    expires_at: int
    reason: str


class RevocationFeed(_Result):
    """Entries after ``since``; ``latest`` is the feed's newest sequence number, ``more`` says
    another page follows, and ``next_since`` is the ``since`` to ask with next: past every
    entry this answer covered, including those already dropped because their tokens expired
    (so a reader whose newest entries expired does not ask for them again and again)."""

    entries: list[RevocationEntryInfo]
    latest: int
    more: bool = False
    next_since: int = 0


class IssuerKeyInfo(_Result):
    """An issuer key as a rotation reports it (times are Unix seconds)."""

    kid: str
    alg: str
    created_at: int
    activate_at: int
    seq: int
