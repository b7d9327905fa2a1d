"""The keygrants error tree.

Every error the library raises on purpose derives from :class:`KeygrantsError` and carries a
machine-readable ``code`` (a class attribute) and the HTTP ``status`` the edge maps it to.
The same codes travel over the wire in the one JSON error shape
``{"error": {"code": ..., "message": ..., "request_id": ...}}`` and are turned back into the
same classes by the SDK (:func:`error_from_code`).

::

    KeygrantsError                      internal_error       500
    ├── InvalidRequest                  invalid_request      400
    │   ├── MalformedBody               malformed_body       400
    │   ├── PayloadTooLarge             payload_too_large    413
    │   ├── InvalidKeyUsage             invalid_key_usage    400
    │   ├── PolicyInvalid               policy_invalid       400
    │   ├── RequestTimeout              request_timeout      408  (the connection closes)
    │   └── HeaderTooLarge              header_too_large     431
    ├── InvalidCiphertext               invalid_ciphertext   400  (opaque, always)
    ├── Unauthenticated                 unauthenticated      401  (+ WWW-Authenticate)
    │   ├── SignatureInvalid            signature_invalid    401
    │   ├── SignatureExpired            signature_expired    401
    │   ├── NonceReplayed               nonce_replayed       401
    │   ├── UnknownCredential           unknown_key          401
    │   ├── CredentialRevoked           credential_revoked   401
    │   ├── CredentialExpired           credential_expired   401
    │   ├── DigestMismatch              digest_mismatch      401
    │   └── PrincipalDisabled           principal_disabled   401
    ├── Forbidden                       forbidden            403
    │   ├── GrantDenied                 grant_denied         403  (grant token refused)
    │   │   ├── GrantMalformed          grant_malformed      403
    │   │   ├── GrantAlgorithmRejected  grant_algorithm_rejected 403
    │   │   ├── GrantHeaderRejected     grant_header_rejected 403
    │   │   ├── GrantTypeInvalid        grant_type_invalid   403
    │   │   ├── GrantUnknownKey         grant_unknown_kid    403
    │   │   ├── GrantSignatureInvalid   grant_signature_invalid 403
    │   │   ├── GrantClaimsInvalid      grant_claims_invalid 403
    │   │   ├── IssuerMismatch          issuer_mismatch      403
    │   │   ├── AudienceMismatch        audience_mismatch    403
    │   │   ├── GrantExpired            grant_expired        403
    │   │   ├── GrantNotYetValid        grant_not_yet_valid  403
    │   │   ├── GrantRevoked            grant_revoked        403
    │   │   ├── GrantRetired            grant_retired        403
    │   │   ├── GrantExhausted          grant_exhausted      403
    │   │   ├── GrantPending            grant_pending        403
    │   │   ├── WrongGrantee            wrong_grantee        403
    │   │   ├── KeyNotGranted           key_not_granted      403
    │   │   ├── OperationNotGranted     operation_not_granted 403
    │   │   ├── ContextMismatch         context_mismatch     403
    │   │   ├── PopRequired             pop_required         403
    │   │   └── PopInvalid              pop_invalid          403
    │   │       ├── PopReplayed         pop_replayed         403
    │   │       └── UseDpopNonce        use_dpop_nonce       401  (+ DPoP-Nonce)
    │   ├── AttenuationViolated         attenuation_violated 403  (sub-grant exceeds parent)
    │   └── SelfApproval                self_approval        403  (two-person rule)
    ├── NotFound                        not_found            404
    │   ├── KeyNotFound                 key_not_found        404
    │   ├── AliasNotFound               alias_not_found      404
    │   ├── PrincipalNotFound           principal_not_found  404
    │   ├── CredentialNotFound          credential_not_found 404
    │   ├── GrantNotFound               grant_not_found      404
    │   └── PolicyNotFound              policy_not_found     404
    ├── MethodNotAllowed                method_not_allowed   405
    ├── Conflict                        conflict             409
    │   ├── AlreadyExists               already_exists       409
    │   └── GrantStateError             grant_state          409
    ├── KeyStateError                   key_state            409
    │   ├── KeyDisabled                 key_disabled         409
    │   ├── KeyPendingDeletion          key_pending_deletion 409
    │   └── KeyDestroyed                key_destroyed        409
    ├── KeyVersionError                 key_version          409
    ├── RateLimited                     rate_limited         429  (+ Retry-After)
    ├── SealError                       seal_error           503
    │   └── UnsealFailed                unseal_failed        503
    ├── StoreError                      store_unavailable    503
    ├── AuditUnavailable                audit_unavailable    503  (fail-closed)
    ├── KMSError                        kms_error            502  (key providers, KeyManager)
    │   ├── EncryptionError             encryption_failed    502
    │   ├── DecryptionError             decryption_failed    400  (also an InvalidCiphertext)
    │   ├── KeyNotFoundError            provider_key_not_found 404 (also a KeyNotFound)
    │   ├── KeyRotationError            key_rotation_failed  502
    │   ├── ProviderConnectionError     provider_unavailable 503
    │   └── UnsupportedOperation        unsupported_operation 400
    ├── ServerUnreachable               server_unreachable   503  (client side only)
    │   └── NoResponse                  no_response          503  (sent, but no answer)
    ├── VerifierUnavailable             verifier_unavailable 503  (local Verifier, fail-closed)
    └── BusError                        bus_unavailable      503  (keygrants.bus)

Cryptographic failures are opaque on purpose: a wrong key, version, context, a flipped bit or
a truncated ciphertext all raise the same :class:`InvalidCiphertext` with the same message.
Caller misuse inside the library (wrong Python types) raises ``TypeError``/``ValueError``.
"""

from __future__ import annotations

from typing import ClassVar, Final

__all__ = [
    "AliasNotFound",
    "AlreadyExists",
    "AttenuationViolated",
    "AudienceMismatch",
    "AuditUnavailable",
    "Conflict",
    "ContextMismatch",
    "CredentialExpired",
    "CredentialNotFound",
    "CredentialRevoked",
    "DecryptionError",
    "DigestMismatch",
    "EncryptionError",
    "Forbidden",
    "GrantAlgorithmRejected",
    "GrantClaimsInvalid",
    "GrantDenied",
    "GrantExhausted",
    "GrantExpired",
    "GrantHeaderRejected",
    "GrantMalformed",
    "GrantNotFound",
    "GrantNotYetValid",
    "GrantPending",
    "GrantRetired",
    "GrantRevoked",
    "GrantSignatureInvalid",
    "GrantStateError",
    "GrantTypeInvalid",
    "GrantUnknownKey",
    "HeaderTooLarge",
    "InvalidCiphertext",
    "InvalidKeyUsage",
    "InvalidRequest",
    "IssuerMismatch",
    "KMSError",
    "KeyDestroyed",
    "KeyDisabled",
    "KeyNotFound",
    "KeyNotFoundError",
    "KeyNotGranted",
    "KeyPendingDeletion",
    "KeyRotationError",
    "KeyStateError",
    "KeyVersionError",
    "KeygrantsError",
    "MalformedBody",
    "MethodNotAllowed",
    "NoResponse",
    "NonceReplayed",
    "NotFound",
    "OperationNotGranted",
    "PayloadTooLarge",
    "PolicyInvalid",
    "PolicyNotFound",
    "PopInvalid",
    "PopReplayed",
    "PopRequired",
    "PrincipalDisabled",
    "PrincipalNotFound",
    "ProviderConnectionError",
    "RateLimited",
    "RequestTimeout",
    "SealError",
    "SelfApproval",
    "ServerUnreachable",
    "SignatureExpired",
    "SignatureInvalid",
    "StoreError",
    "Unauthenticated",
    "UnknownCredential",
    "UnsealFailed",
    "UnsupportedOperation",
    "UseDpopNonce",
    "VerifierUnavailable",
    "WrongGrantee",
    "error_from_code",
]


MAX_ERROR_MESSAGE: Final = 2000
"""The longest error message a response carries (longer ones are cut)."""


class KeygrantsError(Exception):
    """Root of every error keygrants raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, request_id: str | None = None) -> None:
        self.message = message or self.default_message
        self.request_id = request_id
        super().__init__(self.message)

    def to_dict(self) -> dict[str, object]:
        """The body of the one JSON error shape. The message is cut at
        :data:`MAX_ERROR_MESSAGE` characters: many quote the caller's input, which must not be
        echoed back whole (an error about a 100 KB value was 100 KB)."""
        message = self.message
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE - 3] + "..."
        return {"error": {"code": self.code, "message": message, "request_id": self.request_id}}


class InvalidRequest(KeygrantsError):
    """Raised when a request is well-formed but its values are not acceptable."""

    code = "invalid_request"
    status = 400
    default_message = "invalid request"


class MalformedBody(InvalidRequest):
    """Raised when a request body is not valid JSON of the expected shape."""

    code = "malformed_body"
    default_message = "malformed request body"


class PayloadTooLarge(InvalidRequest):
    """Raised when a request body, plaintext or batch exceeds its configured limit."""

    code = "payload_too_large"
    status = 413
    default_message = "payload too large"


class InvalidKeyUsage(InvalidRequest):
    """Raised when an operation does not match the key's purpose (e.g. sign with an AES key)."""

    code = "invalid_key_usage"
    default_message = "operation not allowed for this key's purpose"


class PolicyInvalid(InvalidRequest):
    """Raised when a policy does not parse or does not match the schema (the old one stays)."""

    code = "policy_invalid"
    default_message = "invalid policy"


class RequestTimeout(InvalidRequest):
    """Raised when a request's head or body does not arrive in time (the connection closes)."""

    code = "request_timeout"
    status = 408
    default_message = "request not received in time"


class HeaderTooLarge(InvalidRequest):
    """Raised when an authentication header is longer than its limit."""

    code = "header_too_large"
    status = 431
    default_message = "request header too large"


class InvalidCiphertext(KeygrantsError):
    """Raised for every failed decryption, whatever the cause (opaque by design)."""

    code = "invalid_ciphertext"
    status = 400
    default_message = "invalid ciphertext"


class Unauthenticated(KeygrantsError):
    """Raised when a request carries no valid credentials."""

    code = "unauthenticated"
    status = 401
    default_message = "authentication required"


class SignatureInvalid(Unauthenticated):
    """Raised when an HTTP message signature is malformed, incomplete or does not verify."""

    code = "signature_invalid"
    default_message = "invalid signature"


class SignatureExpired(Unauthenticated):
    """Raised when a signature's ``created``/``expires`` lies outside the allowed clock skew."""

    code = "signature_expired"
    default_message = "signature expired or not yet valid"


class NonceReplayed(Unauthenticated):
    """Raised when a signature's nonce was already seen within its validity window."""

    code = "nonce_replayed"
    default_message = "nonce already used"


class UnknownCredential(Unauthenticated):
    """Raised when a key id or API key names no credential."""

    code = "unknown_key"
    default_message = "unknown credential"


class CredentialRevoked(Unauthenticated):
    """Raised when the presented credential has been revoked."""

    code = "credential_revoked"
    default_message = "credential revoked"


class CredentialExpired(Unauthenticated):
    """Raised when the presented credential is expired or not yet valid."""

    code = "credential_expired"
    default_message = "credential expired or not yet valid"


class DigestMismatch(Unauthenticated):
    """Raised when the Content-Digest is missing for a body or does not match it."""

    code = "digest_mismatch"
    default_message = "content digest mismatch"


class PrincipalDisabled(Unauthenticated):
    """Raised when the credential's principal is disabled."""

    code = "principal_disabled"
    default_message = "principal disabled"


class Forbidden(KeygrantsError):
    """Raised when an authenticated principal may not perform the action."""

    code = "forbidden"
    status = 403
    default_message = "forbidden"


class GrantDenied(Forbidden):
    """Raised when a presented grant token does not authorize the request (base of every grant
    denial code)."""

    code = "grant_denied"
    default_message = "a grant token was refused"
    # for the audit event of the refusal: the grant, once the token's signature verified, and
    # the token's keyed digest where the refusal's own event would not otherwise carry it
    grant_id: str | None = None
    audit_detail: dict[str, str] | None = None


class GrantMalformed(GrantDenied):
    """Raised when a grant token is not a well-formed compact JWS with JSON header and claims."""

    code = "grant_malformed"
    default_message = "malformed grant token"


class GrantAlgorithmRejected(GrantDenied):
    """Raised for ``alg`` ``none``, HMAC algorithms or any algorithm other than the issuer key's."""

    code = "grant_algorithm_rejected"
    default_message = "grant token algorithm rejected"


class GrantHeaderRejected(GrantDenied):
    """Raised for ``jku``/``x5u``/``jwk``/``x5c`` headers, ``crit`` or any unexpected header."""

    code = "grant_header_rejected"
    default_message = "grant token header rejected"


class GrantTypeInvalid(GrantDenied):
    """Raised when the token's ``typ`` is not ``kg+jwt``."""

    code = "grant_type_invalid"
    default_message = "grant token has the wrong type"


class GrantUnknownKey(GrantDenied):
    """Raised when ``kid`` names no live issuer key (unknown, retired or malformed)."""

    code = "grant_unknown_kid"
    default_message = "grant token signed by an unknown key"


class GrantSignatureInvalid(GrantDenied):
    """Raised when a grant token's signature does not verify."""

    code = "grant_signature_invalid"
    default_message = "grant token signature invalid"


class GrantClaimsInvalid(GrantDenied):
    """Raised when a required claim is missing or has the wrong type."""

    code = "grant_claims_invalid"
    default_message = "grant token claims invalid"


class IssuerMismatch(GrantDenied):
    """Raised when ``iss`` is not exactly this service's issuer."""

    code = "issuer_mismatch"
    default_message = "grant token issuer mismatch"


class AudienceMismatch(GrantDenied):
    """Raised when the token's ``aud`` does not include the expected audience."""

    code = "audience_mismatch"
    default_message = "grant token audience mismatch"


class GrantExpired(GrantDenied):
    """Raised when the grant's ``exp`` (plus leeway) has passed."""

    code = "grant_expired"
    default_message = "grant expired"


class GrantNotYetValid(GrantDenied):
    """Raised when the grant's ``nbf`` (minus leeway) is still ahead."""

    code = "grant_not_yet_valid"
    default_message = "grant not yet valid"


class GrantRevoked(GrantDenied):
    """Raised when the grant, its parent, its grantee or its key was revoked."""

    code = "grant_revoked"
    default_message = "grant revoked"


class GrantRetired(GrantDenied):
    """Raised when the grant was retired by its grantee or retiring principal."""

    code = "grant_retired"
    default_message = "grant retired"


class GrantExhausted(GrantDenied):
    """Raised when a limited-use grant has no uses left."""

    code = "grant_exhausted"
    default_message = "grant exhausted"


class GrantPending(GrantDenied):
    """Raised when a break-glass grant has not been approved (or was rejected)."""

    code = "grant_pending"
    default_message = "grant pending approval"


class WrongGrantee(GrantDenied):
    """Raised when the presenting principal is not the grant's grantee."""

    code = "wrong_grantee"
    default_message = "grant belongs to another principal"


class KeyNotGranted(GrantDenied):
    """Raised when the operation's key is not the grant's key."""

    code = "key_not_granted"
    default_message = "grant is for another key"


class OperationNotGranted(GrantDenied):
    """Raised when the grant does not include the requested operation."""

    code = "operation_not_granted"
    default_message = "operation not granted"


class ContextMismatch(GrantDenied):
    """Raised when the encryption context does not satisfy the grant's constraints."""

    code = "context_mismatch"
    default_message = "encryption context does not satisfy the grant"


class PopRequired(GrantDenied):
    """Raised when a bound grant is presented without a DPoP proof or the bound certificate."""

    code = "pop_required"
    default_message = "proof of possession required"


class PopInvalid(GrantDenied):
    """Raised when a DPoP proof or certificate binding does not check out."""

    code = "pop_invalid"
    default_message = "invalid proof of possession"


class PopReplayed(PopInvalid):
    """Raised when a DPoP proof's ``jti`` was seen before."""

    code = "pop_replayed"
    default_message = "proof of possession replayed"


class AttenuationViolated(Forbidden):
    """Raised when a delegated or exchanged grant would exceed its parent grant."""

    code = "attenuation_violated"
    default_message = "a sub-grant must narrow its parent"


class SelfApproval(Forbidden):
    """Raised when a principal approves or rejects a grant it requested (two-person rule)."""

    code = "self_approval"
    default_message = "the requester cannot approve their own grant"


class UseDpopNonce(PopInvalid):
    """Raised when the server requires a DPoP nonce the proof lacks (RFC 9449 §8); the edge
    answers 401 with a fresh ``DPoP-Nonce``."""

    code = "use_dpop_nonce"
    status = 401
    default_message = "a DPoP nonce is required"

    def __init__(self, message: str | None = None, *, nonce: str = "",
                 request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.nonce = nonce


class NotFound(KeygrantsError):
    """Raised when a resource or route does not exist."""

    code = "not_found"
    status = 404
    default_message = "not found"


class KeyNotFound(NotFound):
    """Raised when a key id, name or alias does not resolve to a key."""

    code = "key_not_found"
    default_message = "key not found"


class AliasNotFound(NotFound):
    """Raised when an alias to delete does not exist."""

    code = "alias_not_found"
    default_message = "alias not found"


class PrincipalNotFound(NotFound):
    """Raised when a principal id names no principal."""

    code = "principal_not_found"
    default_message = "principal not found"


class CredentialNotFound(NotFound):
    """Raised when a credential id names no credential of the principal."""

    code = "credential_not_found"
    default_message = "credential not found"


class PolicyNotFound(NotFound):
    """Raised when a policy name names no policy."""

    code = "policy_not_found"
    default_message = "policy not found"


class GrantNotFound(NotFound):
    """Raised when a grant id names no grant (or one the caller may not see)."""

    code = "grant_not_found"
    default_message = "grant not found"


class MethodNotAllowed(KeygrantsError):
    """Raised when a route exists but not for the request's HTTP method."""

    code = "method_not_allowed"
    status = 405
    default_message = "method not allowed"


class Conflict(KeygrantsError):
    """Raised when a request conflicts with the current state of a resource."""

    code = "conflict"
    status = 409
    default_message = "conflict"


class AlreadyExists(Conflict):
    """Raised when creating a key or alias whose name is already taken."""

    code = "already_exists"
    default_message = "name already in use"


class GrantStateError(Conflict):
    """Raised when a grant's state does not allow the change (approve an active grant, ...)."""

    code = "grant_state"
    default_message = "the grant's state does not allow this"


class KeyStateError(KeygrantsError):
    """Raised when an operation meets a key in a state that does not allow it."""

    code = "key_state"
    status = 409
    default_message = "the key's state does not allow this operation"


class KeyDisabled(KeyStateError):
    """Raised when a disabled key is used for a cryptographic operation."""

    code = "key_disabled"
    default_message = "key is disabled"


class KeyPendingDeletion(KeyStateError):
    """Raised when a key scheduled for deletion is used."""

    code = "key_pending_deletion"
    default_message = "key is pending deletion"


class KeyDestroyed(KeyStateError):
    """Raised when a key whose material has been destroyed is used or changed."""

    code = "key_destroyed"
    default_message = "key material has been destroyed"


class KeyVersionError(KeygrantsError):
    """Raised when a requested key version does not exist or cannot be used."""

    code = "key_version"
    status = 409
    default_message = "key version not usable"


class RateLimited(KeygrantsError):
    """Raised when a principal exceeds its request rate; ``retry_after`` is in seconds."""

    code = "rate_limited"
    status = 429
    default_message = "too many requests"

    def __init__(self, message: str | None = None, *, request_id: str | None = None,
                 retry_after: float = 1.0, principal: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after = retry_after
        self.principal = principal
        self.credential: str | None = None  # the authenticated credential, for the audit event


class SealError(KeygrantsError):
    """Raised when the root key provider cannot seal or unseal."""

    code = "seal_error"
    status = 503
    default_message = "root key provider unavailable"


class UnsealFailed(SealError):
    """Raised when the root key cannot be unsealed (wrong passphrase or key file)."""

    code = "unseal_failed"
    default_message = "could not unseal the root key"


class StoreError(KeygrantsError):
    """Raised when the store cannot complete a read or a durable write."""

    code = "store_unavailable"
    status = 503
    default_message = "storage unavailable"


class AuditUnavailable(KeygrantsError):
    """Raised when an operation's audit event cannot be made durable (the operation fails)."""

    code = "audit_unavailable"
    status = 503
    default_message = "the audit log is unavailable; the operation was not performed"


class KMSError(KeygrantsError):
    """Raised when a key provider or the KeyManager fails."""

    code = "kms_error"
    status = 502
    default_message = "key provider error"


class EncryptionError(KMSError):
    """Raised when a provider or the KeyManager cannot encrypt."""

    code = "encryption_failed"
    default_message = "encryption failed"


class DecryptionError(KMSError, InvalidCiphertext):
    """Raised for every failed KeyManager or provider decryption (opaque, like InvalidCiphertext)."""

    code = "decryption_failed"
    status = 400
    default_message = "decryption failed"


class KeyNotFoundError(KMSError, KeyNotFound):
    """Raised when a provider does not know the requested key."""

    code = "provider_key_not_found"
    status = 404
    default_message = "key not found at the provider"


class KeyRotationError(KMSError):
    """Raised when a data key or provider key cannot be rotated."""

    code = "key_rotation_failed"
    default_message = "key rotation failed"


class ProviderConnectionError(KMSError):
    """Raised when a provider cannot be reached or initialized in time."""

    code = "provider_unavailable"
    status = 503
    default_message = "key provider unavailable"


class UnsupportedOperation(KMSError):
    """Raised when a provider cannot perform an operation (e.g. sign on a Transit-less backend)."""

    code = "unsupported_operation"
    status = 400
    default_message = "operation not supported by this provider"


class VerifierUnavailable(KeygrantsError):
    """Raised by a local :class:`~keygrants.client.verifier.Verifier` that cannot vouch for
    any token: it has no issuer keys yet, or its view of the revocation feed is older than its
    bound (it fails closed rather than accept a token that may have been revoked)."""

    code = "verifier_unavailable"
    status = 503
    default_message = "the grant verifier is not up to date"


class ServerUnreachable(KeygrantsError):
    """Raised by the SDK when the server cannot be reached."""

    code = "server_unreachable"
    status = 503
    default_message = "keygrants server unreachable"


class NoResponse(ServerUnreachable):
    """Raised by the SDK when a request was sent but no answer came (a read timeout, a dropped
    connection): the server may have carried it out, so check before retrying."""

    code = "no_response"
    status = 503
    default_message = "the request was sent but no answer came; it may have taken effect"


def _all_subclasses(cls: type[KeygrantsError]) -> list[type[KeygrantsError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(
    code: str, message: str, *, request_id: str | None = None, status: int | None = None
) -> KeygrantsError:
    """Rebuild the typed error for a wire ``code``.

    Unknown codes (from a newer server) map to the closest class by HTTP status, so callers
    can still catch by family.
    """
    classes = {c.code: c for c in _all_subclasses(KeygrantsError)}
    cls = classes.get(code)
    if cls is None:
        by_status = {400: InvalidRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound,
                     405: MethodNotAllowed, 409: Conflict, 413: PayloadTooLarge,
                     429: RateLimited, 431: HeaderTooLarge}
        cls = by_status.get(status or 500, KeygrantsError)
        err = cls(message, request_id=request_id)
        err.code = code  # type: ignore[misc]  # keep the server's precise code
        return err
    return cls(message, request_id=request_id)
