"""``aws-kms:`` — AWS KMS (or anything speaking its API): boto3 for the credential chain, key
metadata and retries, and a direct path for the per-request calls (``Encrypt``, ``Decrypt``,
``GenerateDataKey``, ``Sign``): the request is signed by botocore's SigV4 signer with the
same credentials and sent by aiohttp on the event loop, so it never waits for a worker thread.
A first attempt that fails in a way worth retrying (no connection, a timeout, a 5xx,
throttling) is retried through boto3 with its standard retry mode, within the call's bound.

URI forms (the key part is optional; without it every call names its key)::

    aws-kms://1234abcd-12ab-34cd-56ef-1234567890ab?region=eu-west-1
    aws-kms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...      (region from the ARN)
    aws-kms://alias/payments?region=eu-west-1
    aws-kms://alias/payments?region=us-east-1&endpoint=http://127.0.0.1:5000

Options (URI query or keyword): ``region``, ``endpoint`` (a custom endpoint URL: moto, a VPC
endpoint, LocalStack), ``profile`` (a named profile of the shared config files), ``timeout``
(seconds a call may take, retries included, default 10; each attempt's connect and read
timeouts get ``timeout / max_attempts``), ``max_attempts`` (botocore's retry budget, standard
mode, default 3), ``ca`` (a CA bundle for the endpoint's TLS certificate; verification
is always on), ``signing_algorithm`` (override the choice :meth:`AwsKmsProvider.sign` makes).
Credentials come from the standard AWS chain (environment, shared files, SSO, container and
instance roles), or from the keyword-only options ``aws_access_key_id``,
``aws_secret_access_key`` and ``aws_session_token``, which are refused in the URI.

Mapping: the encryption context is passed natively as KMS ``EncryptionContext`` (KMS binds
it as AAD and logs it in CloudTrail, so it must not hold secrets); data keys come from
``GenerateDataKey``; signing uses ``Sign`` on an asymmetric ``SIGN_VERIFY`` key. Every
:class:`~keygrants.providers.models.KeyReference` this provider makes names the key by its
ARN (the alias used, if any, is kept in ``key_alias``), and decryption passes that ARN as
``KeyId``: a ciphertext presented as another key's fails, and re-pointing an alias does not
orphan data encrypted before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote, urlencode

import aiohttp
import boto3  # type: ignore[import-untyped]  # no stubs ship with boto3
import botocore.exceptions as bexc  # type: ignore[import-untyped]
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KMSError,
    ProviderConnectionError,
    UnsupportedOperation,
)
from keygrants.keys.context import canonical_context
from keygrants.providers._aio import LoopSessions, tls_context
from keygrants.providers._options import (
    DEFAULT_TIMEOUT,
    as_timeout,
    check_plaintext,
    collect_options,
    decrypt_context,
    run_blocking,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy

__all__ = ["AwsKmsProvider"]

T = TypeVar("T")

SCHEME: Final = "aws-kms"
_OPTIONS: Final = ("region", "endpoint", "profile", "timeout", "max_attempts", "ca",
                   "signing_algorithm")
_SECRETS: Final = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
_DATA_KEY_SPECS: Final = frozenset({"AES_256", "AES_128"})
_MAX_RAW_MESSAGE: Final = 4096
_DEFAULT_SIGNING: Final = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
}
_HASHES: Final = {"SHA_256": "sha256", "SHA_384": "sha384", "SHA_512": "sha512"}
_DECRYPT_FAILURES: Final = frozenset({
    "InvalidCiphertextException", "IncorrectKeyException", "InvalidKeyUsageException",
    # KMS answers AccessDenied for a ciphertext naming a key the caller cannot use, and a
    # ciphertext is attacker-controlled input: keep the failure opaque.
    "AccessDeniedException",
})
_KEY_STATE: Final = frozenset({"DisabledException", "KMSInvalidStateException",
                               "KeyUnavailableException"})
_BLOB_FIELDS: Final = ("CiphertextBlob", "Plaintext", "Signature", "Message")
# answers of the direct path that boto3's standard retry mode would retry: hand them over
_RETRYABLE_CODES: Final = frozenset({
    "ThrottlingException", "Throttling", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "LimitExceededException",
    "KMSInternalException", "DependencyTimeoutException", "ServiceUnavailableException",
    "InternalError", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "TransactionInProgressException", "IDPCommunicationError", "EC2ThrottledException",
    "ProvisionedThroughputExceededException", "SlowDown", "BandwidthLimitExceeded",
})
_UNREACHABLE: Final = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError,
                       bexc.ReadTimeoutError, bexc.ConnectionClosedError,
                       bexc.ProxyConnectionError, bexc.SSLError)


def _parse_key(rest: str) -> str | None:
    key = unquote(rest.strip("/")) if rest.strip("/") else None
    return key


def _arn_parts(key: str | None) -> tuple[str, str, str] | None:
    """``(region, account, resource)`` of a KMS ARN (``key/ID`` or ``alias/NAME``), else None."""
    if key and key.startswith("arn:"):
        parts = key.split(":", 5)
        if len(parts) == 6 and parts[2] == "kms" and parts[3]:
            return parts[3], parts[4], parts[5]
    return None


def _region_of_arn(key: str | None) -> str | None:
    parts = _arn_parts(key)
    return parts[0] if parts else None


class AwsKmsProvider(KeyProvider):
    """Key provider backed by AWS KMS.

    Args:
        key_id: default key: key id, key ARN, alias name (``alias/x``) or alias ARN.
        region: AWS region (default: from the key ARN, then the standard AWS configuration).
        endpoint: endpoint URL, for moto, LocalStack or a VPC endpoint.
        profile: a named profile from the shared AWS config files.
        timeout: seconds a call may take, retries included (each attempt gets its share).
        max_attempts: attempts per call, first one included (botocore standard retries).
        ca: CA bundle path for the endpoint's TLS certificate.
        signing_algorithm: KMS signing algorithm for :meth:`sign` (default: by key spec).
        aws_access_key_id: explicit credentials (default: the standard credential chain).
        aws_secret_access_key: explicit credentials.
        aws_session_token: explicit credentials.

    Raises:
        ValueError: for a bad option, an unknown profile, no region at all, or half of an
            explicit credential pair. Missing credentials are found at first use
            (:class:`~keygrants.errors.ProviderConnectionError`): the standard chain may
            resolve them only then (a container or instance role).
    """

    name = SCHEME

    def __init__(self, key_id: str | None = None, *, region: str | None = None,
                 endpoint: str | None = None, profile: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_attempts: int = 3, ca: str | None = None,
                 signing_algorithm: str | None = None, aws_access_key_id: str | None = None,
                 aws_secret_access_key: str | None = None,
                 aws_session_token: str | None = None) -> None:
        # Credentials may legitimately come from the chain at first use (a role, instance
        # metadata), so their absence is only known then; half an explicit pair is known now.
        if bool(aws_access_key_id) != bool(aws_secret_access_key):
            raise ValueError("aws-kms: aws_access_key_id and aws_secret_access_key go together")
        if aws_session_token and not aws_access_key_id:
            raise ValueError("aws-kms: aws_session_token needs aws_access_key_id and "
                             "aws_secret_access_key")
        self.default_key_id = key_id or None
        self._timeout = as_timeout(timeout)
        if not 1 <= int(max_attempts) <= 10:
            raise ValueError("aws-kms: max_attempts must be 1..10")
        self._endpoint = endpoint
        self._region = region or _region_of_arn(key_id)
        self._profile = profile
        self._signing_algorithm = signing_algorithm
        self._key_meta: dict[str, dict[str, Any]] = {}
        self._meta_lock = threading.Lock()
        # Each attempt gets its share of the call's bound, so retries end within it too.
        attempt_timeout = max(self._timeout / int(max_attempts), 0.1)
        config = Config(connect_timeout=attempt_timeout, read_timeout=attempt_timeout,
                        retries={"max_attempts": int(max_attempts), "mode": "standard"},
                        user_agent_extra="keygrants")
        try:
            session = boto3.session.Session(
                profile_name=profile, aws_access_key_id=aws_access_key_id,
                aws_secret_access_key=aws_secret_access_key, aws_session_token=aws_session_token)
            self._kms = session.client("kms", region_name=self._region, endpoint_url=endpoint,
                                       verify=ca if ca else True, config=config)
        except bexc.ProfileNotFound:
            raise ValueError(f"aws-kms: no AWS profile named {profile!r}") from None
        except bexc.NoRegionError:
            raise ValueError("aws-kms: no region: pass region=..., use a key ARN, or set "
                             "AWS_REGION") from None
        except ValueError as exc:  # a malformed endpoint URL
            raise ValueError(f"aws-kms: {exc}") from None
        self._region = self._kms.meta.region_name
        self._session = session
        self._url = str(self._kms.meta.endpoint_url).rstrip("/") + "/"
        self._attempt_timeout = attempt_timeout
        tls: ssl.SSLContext | bool = (tls_context(ca) if self._url.startswith("https:")
                                      else False)
        self._http = LoopSessions(self._url, timeout=attempt_timeout, tls=tls)
        self._credentials: Any = None  # resolved once, in a worker thread
        query = {k: v for k, v in (("region", self._region), ("endpoint", endpoint),
                                   ("profile", profile)) if v}
        self.uri = (f"{SCHEME}://{quote(key_id or '', safe=':/')}"
                    + (f"?{urlencode(query)}" if query else ""))

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> AwsKmsProvider:
        """Open ``aws-kms://KEY?options`` (see the module docstring).

        Raises:
            ValueError: for a malformed URI or a bad option.
        """
        if not uri.startswith(f"{SCHEME}:"):
            raise ValueError(f"not an {SCHEME}: URI")
        rest = uri[len(SCHEME) + 1:]
        rest = rest[2:] if rest.startswith("//") else rest
        key_part, _, query = rest.partition("?")
        opts = collect_options(SCHEME, query, options, allowed=_OPTIONS, secrets=_SECRETS)
        if "timeout" in opts:
            opts["timeout"] = as_timeout(opts["timeout"])
        if "max_attempts" in opts:
            try:
                opts["max_attempts"] = int(opts["max_attempts"])
            except ValueError:
                raise ValueError("aws-kms: max_attempts must be an integer") from None
        return cls(_parse_key(key_part), **opts)

    def __repr__(self) -> str:
        return f"AwsKmsProvider({self.uri!r})"

    # -- plumbing ------------------------------------------------------------------------
    def _translate(self, exc: Exception, op: str) -> KMSError:
        """Map a botocore error to the KMSError tree (without AWS's message text)."""
        where = self._endpoint or f"AWS KMS in {self._region}"
        if isinstance(exc, bexc.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "")) or "unknown"
            if code == "NotFoundException":
                return KeyNotFoundError(f"aws-kms: key not found ({op})")
            if op == "decrypt" and code in _DECRYPT_FAILURES:
                return DecryptionError()
            if code in _KEY_STATE:
                return KMSError(f"aws-kms: the key is not usable in its current state ({code})")
            if code == "InvalidKeyUsageException":
                return UnsupportedOperation(f"aws-kms: the key's usage does not allow {op}")
            if code in ("AccessDeniedException", "UnrecognizedClientException",
                        "InvalidSignatureException", "ExpiredTokenException",
                        "IncompleteSignature"):
                return KMSError(f"aws-kms: {op} denied by AWS ({code})")
            if code in ("KMSInternalException", "DependencyTimeoutException",
                        "ServiceUnavailableException"):
                return ProviderConnectionError(f"aws-kms: {where} is unavailable ({code})")
            if op == "decrypt":
                return DecryptionError()
            if op in ("encrypt", "generate_data_key"):
                return EncryptionError(f"aws-kms: {op} failed ({code})")
            return KMSError(f"aws-kms: {op} failed ({code})")
        if isinstance(exc, _UNREACHABLE):
            return ProviderConnectionError(f"aws-kms: cannot reach {where} "
                                           f"({type(exc).__name__})")
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError,
                            bexc.CredentialRetrievalError)):
            return ProviderConnectionError("aws-kms: no usable AWS credentials (set the "
                                           "standard AWS environment, profile or role)")
        if isinstance(exc, bexc.ParamValidationError):
            return KMSError(f"aws-kms: invalid {op} request")
        return KMSError(f"aws-kms: {op} failed ({type(exc).__name__})")

    async def _call(self, op: str, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return await run_blocking(fn, timeout=self._timeout, what=f"aws-kms {op}", **kwargs)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise self._translate(exc, op) from exc

    async def _fast(self, op: str, action: str, fn: Callable[..., dict[str, Any]],
                    **kwargs: Any) -> dict[str, Any]:
        """Call ``action`` (``Encrypt``, …) directly on the loop and answer as boto3 would
        (blobs as bytes); a first attempt worth retrying is retried through ``fn`` (boto3,
        standard retries) within what is left of the call's bound."""
        started = time.monotonic()
        try:
            return await self._direct(action, kwargs)
        except _Retry:
            left = self._timeout - (time.monotonic() - started)
            if left <= 0.1:
                raise ProviderConnectionError(
                    f"aws-kms {op}: no answer within {self._timeout:g} s") from None
            try:
                return await run_blocking(fn, timeout=left, what=f"aws-kms {op}", **kwargs)
            except (bexc.BotoCoreError, bexc.ClientError) as exc:
                raise self._translate(exc, op) from exc
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise self._translate(exc, op) from exc

    async def _direct(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One attempt of a KMS JSON call, SigV4-signed by botocore, sent by aiohttp.

        Raises:
            _Retry: when the attempt failed in a way boto3 would retry.
            botocore.exceptions.ClientError: for KMS's other error answers.
            botocore.exceptions.NoCredentialsError: without credentials.
        """
        creds = self._credentials
        if creds is None:
            # the credential chain may probe the network (instance metadata): off the loop
            creds = await run_blocking(self._session.get_credentials, timeout=self._timeout,
                                       what="aws-kms credentials")
            if creds is None:
                raise bexc.NoCredentialsError()
            self._credentials = creds
        refresh_needed = getattr(creds, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            raise _Retry()  # a refresh is a blocking network call: boto3 does it in a thread
        body = json.dumps({k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
                           for k, v in params.items()}, separators=(",", ":")).encode()
        request = AWSRequest(method="POST", url=self._url, data=body, headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{action}"})
        SigV4Auth(creds.get_frozen_credentials(), "kms", self._region).add_auth(request)
        try:
            async with self._http.get().post(self._url, data=body,
                                             headers=dict(request.headers.items()),
                                             allow_redirects=False) as resp:
                status = resp.status
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            raise _Retry() from None
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise _Retry()  # not a KMS answer (a proxy's error page): let boto3 decide
        if status != 200:
            code = str(answer.get("__type") or answer.get("code") or "").rsplit("#", 1)[-1]
            if status >= 500 or status == 429 or code in _RETRYABLE_CODES:
                raise _Retry()
            raise bexc.ClientError({"Error": {"Code": code or "unknown", "Message": ""},
                                    "ResponseMetadata": {"HTTPStatusCode": status}}, action)
        try:
            for name in _BLOB_FIELDS:
                if name in answer:
                    answer[name] = base64.b64decode(answer[name], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise _Retry() from None
        return answer

    def _ref(self, requested: str, arn: str) -> KeyReference:
        if requested == self.default_key_id and arn.startswith("arn:"):
            self._resolved_key_id = arn  # what the URI's key (an alias) names now
        return KeyReference(provider=self.name, key_id=arn,
                            key_alias=requested if requested != arn else None)

    def holds_key(self, ref: KeyReference) -> bool | None:
        """Whether ``ref`` names this provider's key (see :meth:`KeyProvider.holds_key`).

        KMS keys are regional: an ARN of another region, or of another account than the URI's
        key, is never this provider's (its ``Decrypt`` would not find it). A bare key id in
        the URI matches the ARN that ends in ``key/ID``.
        """
        arn = _arn_parts(ref.key_id)
        if ref.provider == self.name and arn is not None:
            if arn[0] != self._region:
                return False
            mine = _arn_parts(self._resolved_key_id or self.default_key_id)
            if mine is not None and mine[1] and arn[1] != mine[1]:
                return False
            if self.default_key_id is not None and arn[2] == f"key/{self.default_key_id}":
                return True
        return super().holds_key(ref)

    async def _describe(self, key: str, *, refresh: bool = False) -> dict[str, Any]:
        with self._meta_lock:
            cached = None if refresh else self._key_meta.get(key)
        if cached is not None:
            return cached
        resp = await self._call("describe_key", self._kms.describe_key, KeyId=key)
        meta: dict[str, Any] = resp["KeyMetadata"]
        with self._meta_lock:
            self._key_meta[key] = meta
        return meta

    # -- KeyProvider ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Check that the URI's key exists and is enabled.

        Raises:
            KeyNotFoundError: when it does not exist.
            KMSError: when it is disabled or pending deletion.
            ProviderConnectionError: when KMS cannot be reached.
        """
        if self.default_key_id is None:
            return
        meta = await self._describe(self.default_key_id, refresh=True)
        if isinstance(meta.get("Arn"), str):
            self._resolved_key_id = meta["Arn"]
        if meta.get("KeyState") != "Enabled":
            raise KMSError(f"aws-kms: the key is {meta.get('KeyState', 'not enabled')}")

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """Encrypt with KMS ``Encrypt``; ``context`` becomes the ``EncryptionContext``.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when KMS cannot be reached in time.
            EncryptionError: for other failures.
        """
        check_plaintext(plaintext)
        canonical_context(context)  # same limits as every provider
        key = self.reference(key_id).key_id
        ctx = dict(context or {})
        kwargs: dict[str, Any] = {"KeyId": key, "Plaintext": bytes(plaintext)}
        if ctx:
            kwargs["EncryptionContext"] = ctx
        resp = await self._fast("encrypt", "Encrypt", self._kms.encrypt, **kwargs)
        algorithm = str(resp.get("EncryptionAlgorithm") or "SYMMETRIC_DEFAULT")
        return EncryptedData(ciphertext=resp["CiphertextBlob"],
                             key_reference=self._ref(key, str(resp["KeyId"])),
                             algorithm=algorithm, context=ctx)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt with KMS ``Decrypt``, pinned to the key that encrypted.

        Raises:
            DecryptionError: for every cryptographic failure (opaque).
            KeyNotFoundError: when the referenced key does not exist.
            ProviderConnectionError: when KMS cannot be reached in time.
        """
        ref = encrypted.key_reference
        if ref.provider != self.name:
            raise DecryptionError()
        ctx, _ = decrypt_context(encrypted.context, context)
        kwargs: dict[str, Any] = {"CiphertextBlob": encrypted.ciphertext, "KeyId": ref.key_id}
        if ctx:
            kwargs["EncryptionContext"] = ctx
        resp = await self._fast("decrypt", "Decrypt", self._kms.decrypt, **kwargs)
        if ref.key_id.startswith("arn:") and resp.get("KeyId") != ref.key_id:
            raise DecryptionError()  # the service must have used the key we pinned
        return bytes(resp["Plaintext"])

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        """A data key from KMS ``GenerateDataKey`` (``AES_256`` or ``AES_128``).

        Raises:
            ValueError: for another key spec.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when KMS cannot be reached in time.
            EncryptionError: for other failures.
        """
        if key_spec not in _DATA_KEY_SPECS:
            raise ValueError(f"aws-kms: key_spec must be one of {sorted(_DATA_KEY_SPECS)}")
        canonical_context(context)
        key = self.reference(key_id).key_id
        ctx = dict(context or {})
        kwargs: dict[str, Any] = {"KeyId": key, "KeySpec": key_spec}
        if ctx:
            kwargs["EncryptionContext"] = ctx
        resp = await self._fast("generate_data_key", "GenerateDataKey", self._kms.generate_data_key, **kwargs)
        ref = self._ref(key, str(resp["KeyId"]))
        encrypted = EncryptedData(ciphertext=resp["CiphertextBlob"], key_reference=ref,
                                  algorithm="SYMMETRIC_DEFAULT", context=ctx)
        return DataKeyPair(plaintext_key=bytes(resp["Plaintext"]), encrypted_key=encrypted,
                           key_reference=ref)

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """Sign with KMS ``Sign`` on an asymmetric ``SIGN_VERIFY`` key.

        The algorithm is ``signing_algorithm`` if set, else ECDSA with the curve's hash for EC
        keys and ``RSASSA_PSS_SHA_256`` for RSA keys. Messages over 4 KiB are hashed here and
        sent as a digest. ECDSA signatures are DER-encoded, as KMS returns them.

        Raises:
            UnsupportedOperation: when the key is not a signing key.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when KMS cannot be reached in time.
        """
        key = self.reference(key_id).key_id
        meta = await self._describe(key)
        if meta.get("KeyUsage") != "SIGN_VERIFY":
            raise UnsupportedOperation("aws-kms: the key is not a SIGN_VERIFY key")
        algorithm = self._signing_algorithm or _DEFAULT_SIGNING.get(
            str(meta.get("KeySpec")), "RSASSA_PSS_SHA_256")
        kwargs: dict[str, Any] = {"KeyId": key, "SigningAlgorithm": algorithm,
                                  "Message": bytes(message), "MessageType": "RAW"}
        if len(message) > _MAX_RAW_MESSAGE:
            hash_name = next((h for suffix, h in _HASHES.items() if algorithm.endswith(suffix)),
                             None)
            if hash_name is None:
                raise ValueError(f"aws-kms: {algorithm} cannot sign a message over "
                                 f"{_MAX_RAW_MESSAGE} bytes")
            kwargs["Message"] = hashlib.new(hash_name, message).digest()
            kwargs["MessageType"] = "DIGEST"
        resp = await self._fast("sign", "Sign", self._kms.sign, **kwargs)
        return bytes(resp["Signature"])

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        """The key's automatic rotation (``GetKeyRotationStatus``).

        That call takes no alias, so an alias is first resolved to its key's ARN with
        ``DescribeKey`` (cached, as for :meth:`sign`).

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when KMS cannot be reached in time.
        """
        key = self.reference(key_id).key_id
        if key.startswith("alias/") or ":alias/" in key:
            # GetKeyRotationStatus takes a key id or key ARN only, never an alias
            key = str((await self._describe(key))["Arn"])
        resp = await self._call("get_rotation_policy", self._kms.get_key_rotation_status,
                                KeyId=key)
        enabled = bool(resp.get("KeyRotationEnabled"))
        period = resp.get("RotationPeriodInDays")
        return RotationPolicy(enabled=enabled,
                              rotation_period_days=int(period) if enabled and period else None,
                              next_rotation=resp.get("NextRotationDate") if enabled else None)

    async def release_loop(self) -> None:
        """Close the running event loop's HTTP session (before that loop ends)."""
        await self._http.release()

    async def close(self) -> None:
        """Close the HTTP connections (the running loop's session and boto3's)."""
        await self._http.release()
        self._kms.close()


class _Retry(Exception):
    """The direct attempt failed in a way boto3's retries handle: hand the call to boto3."""
