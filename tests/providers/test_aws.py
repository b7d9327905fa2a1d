"""``aws-kms:`` specifics, against moto's server (the contract suite covers the rest)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from keygrants import KeyManager
from keygrants.errors import KeyNotFoundError, KMSError, ProviderConnectionError
from keygrants.providers import open_provider
from keygrants.providers.aws import AwsKmsProvider
from keygrants.providers.models import KeyReference

if TYPE_CHECKING:
    from conftest import MotoKms, ProviderCase

pytestmark = pytest.mark.anyio

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "moto-secret-access-key-5d1f"}


def test_uri_forms() -> None:
    arn = "arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    p = AwsKmsProvider.from_uri(f"aws-kms://{arn}", **CREDS)
    assert p.default_key_id == arn and p.uri == f"aws-kms://{arn}?region=eu-west-3"
    p = AwsKmsProvider.from_uri("aws-kms://alias/payments?region=us-east-2&timeout=2.5")
    assert p.default_key_id == "alias/payments" and p._timeout == 2.5
    assert AwsKmsProvider.from_uri("aws-kms://?region=us-east-1").default_key_id is None
    assert "moto-secret" not in repr(AwsKmsProvider.from_uri("aws-kms://k?region=us-east-1",
                                                             **CREDS))


@pytest.mark.parametrize(("uri", "message"), [
    ("aws-kms://k?region=us-east-1&aws_secret_access_key=x", "must not appear in the URI"),
    ("aws-kms://k?region=us-east-1&aws-session-token=x", "must not appear in the URI"),
    ("aws-kms://k?region=us-east-1&colour=blue", "unknown URI option"),
    ("aws-kms://k?region=us-east-1&region=us-east-2", "given twice"),
    ("aws-kms://k?region=us-east-1&timeout=0", "timeout"),
    ("aws-kms://k?region=us-east-1&max_attempts=50", "max_attempts"),
    ("aws-kms://k?region=us-east-1&profile=no-such-profile-kg", "no AWS profile"),
])
def test_bad_configuration_fails_at_construction(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_provider(uri)


@pytest.mark.parametrize("given", [{"aws_access_key_id": "AKIA-only-the-id"},
                                   {"aws_secret_access_key": "only-the-secret-5d1f"},
                                   {"aws_session_token": "only-the-token-5d1f"}])
def test_half_an_explicit_credential_pair_fails_at_construction(given: dict[str, str]) -> None:
    # Missing credentials show at first use (a role may supply them then); half a pair given
    # as options is known to be unusable now (it used to escape as a TypeError at first use).
    with pytest.raises(ValueError, match="aws_access_key_id and aws_secret_access_key") as info:
        open_provider("aws-kms://k?region=us-east-1", **given)
    assert "5d1f" not in str(info.value)


def test_holds_key_tells_regions_and_accounts_apart() -> None:
    arn = "arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

    def ref(key_id: str, alias: str | None = None) -> KeyReference:
        return KeyReference(provider="aws-kms", key_id=key_id, key_alias=alias)

    by_arn = AwsKmsProvider.from_uri(f"aws-kms://{arn}", **CREDS)
    assert by_arn.holds_key(ref(arn)) is True
    assert by_arn.holds_key(ref(arn.replace("eu-west-3", "eu-west-1"))) is False
    assert by_arn.holds_key(ref(arn.replace("111122223333", "444455556666"))) is False
    assert by_arn.holds_key(ref(arn[:-4] + "ffff")) is None  # a key named per call
    assert by_arn.holds_key(KeyReference(provider="vault", key_id=arn)) is False
    by_id = AwsKmsProvider.from_uri("aws-kms://1234abcd-12ab-34cd-56ef-1234567890ab"
                                    "?region=eu-west-3", **CREDS)
    assert by_id.holds_key(ref(arn)) is True
    by_alias = AwsKmsProvider.from_uri("aws-kms://alias/app?region=eu-west-3", **CREDS)
    assert by_alias.holds_key(ref(arn, "alias/app")) is True
    assert by_alias.holds_key(ref(arn.replace("eu-west-3", "us-east-1"), "alias/app")) is False
    assert by_alias.holds_key(ref(arn, "alias/other")) is None


def test_no_region_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/kg-aws-config")
    with pytest.raises(ValueError, match="no region"):
        open_provider("aws-kms://k")


async def test_an_alias_is_resolved_to_the_arn_so_repointing_it_orphans_nothing(
        moto_kms: MotoKms) -> None:
    kms = moto_kms.client
    kms.create_alias(AliasName="alias/kg-moving", TargetKeyId=moto_kms.keys["enc"])
    p = open_provider(f"aws-kms://alias/kg-moving?region=us-east-1&endpoint={moto_kms.endpoint}",
                      **CREDS)
    before = await p.encrypt(b"secret", context={"a": "b"})
    assert before.key_reference.key_id == moto_kms.keys["enc"]
    assert before.key_reference.key_alias == "alias/kg-moving"
    kms.update_alias(AliasName="alias/kg-moving", TargetKeyId=moto_kms.keys["other"])
    after = await p.encrypt(b"secret", context={"a": "b"})
    assert after.key_reference.key_id == moto_kms.keys["other"]
    assert await p.decrypt(before) == b"secret" == await p.decrypt(after)
    await p.close()


async def test_the_context_is_the_native_encryption_context(aws_case: ProviderCase,
                                                           moto_kms: MotoKms) -> None:
    p = aws_case.open()
    enc = await p.encrypt(b"secret", context={"tenant": "42"})
    out = moto_kms.client.decrypt(CiphertextBlob=enc.ciphertext,
                                  EncryptionContext={"tenant": "42"})
    assert out["Plaintext"] == b"secret" and enc.algorithm == "SYMMETRIC_DEFAULT"
    await p.close()


async def test_a_disabled_key_fails_initialize_with_a_kms_error(moto_kms: MotoKms) -> None:
    meta = moto_kms.client.create_key()["KeyMetadata"]
    arn = meta["Arn"]
    moto_kms.client.disable_key(KeyId=meta["KeyId"])
    p = open_provider(f"aws-kms://{arn}?endpoint={moto_kms.endpoint}", **CREDS)
    with pytest.raises(KMSError, match="Disabled") as info:
        await p.initialize()
    assert type(info.value) is KMSError
    await p.close()


async def test_rotation_policy(moto_kms: MotoKms) -> None:
    arn = moto_kms.client.create_key()["KeyMetadata"]["Arn"]
    p = open_provider(f"aws-kms://{arn}?endpoint={moto_kms.endpoint}", **CREDS)
    assert not (await p.get_rotation_policy()).enabled
    moto_kms.client.enable_key_rotation(KeyId=arn, RotationPeriodInDays=90)
    policy = await p.get_rotation_policy()
    assert policy.enabled  # moto does not report RotationPeriodInDays back
    await p.close()


async def test_rotation_policy_of_a_key_opened_by_alias(moto_kms: MotoKms) -> None:
    arn = moto_kms.client.create_key()["KeyMetadata"]["Arn"]
    alias = f"alias/kg-rotating-{uuid.uuid4().hex[:8]}"
    moto_kms.client.create_alias(AliasName=alias, TargetKeyId=arn)
    moto_kms.client.enable_key_rotation(KeyId=arn, RotationPeriodInDays=90)
    # GetKeyRotationStatus takes no alias (in AWS as in moto): the provider resolves it
    km = KeyManager.from_uri(f"aws-kms://{alias}?region=us-east-1&endpoint={moto_kms.endpoint}",
                             provider_options=CREDS)
    assert (await km.get_provider_rotation_policy()).enabled
    await km.close()


async def test_a_key_manager_over_two_regions_opened_by_alias_decrypts_its_own_records(
        moto_kms: MotoKms) -> None:
    import boto3

    alias = f"alias/kg-app-{uuid.uuid4().hex[:8]}"  # one alias name, a key in each region
    arns = {}
    for region in ("us-east-1", "eu-west-1"):
        kms = boto3.client("kms", region_name=region, endpoint_url=moto_kms.endpoint, **CREDS)
        arns[region] = kms.create_key()["KeyMetadata"]["Arn"]
        kms.create_alias(AliasName=alias, TargetKeyId=arns[region])

    def regional(region: str) -> AwsKmsProvider:
        p = open_provider(f"aws-kms://{alias}?region={region}&endpoint={moto_kms.endpoint}",
                          **CREDS)
        assert isinstance(p, AwsKmsProvider)
        return p

    km = KeyManager({"us": regional("us-east-1"), "eu": regional("eu-west-1")}, "us")
    await km.initialize()
    enc = await km.encrypt(b"eu data", provider="eu", context={"t": "1"})
    assert (enc.key_reference.key_id, enc.key_reference.key_alias) == (arns["eu-west-1"], alias)
    assert await km.decrypt(enc) == b"eu data"
    us_enc = await km.encrypt(b"us data")
    field = await km.encrypt_field("eu field", provider="eu")
    assert await km.decrypt_field(field) == "eu field"
    # another process, whose providers have made no call yet
    other = KeyManager({"us": regional("us-east-1"), "eu": regional("eu-west-1")}, "us")
    other.import_data_keys(km.export_data_keys())
    assert await other.decrypt(enc) == b"eu data" and await other.decrypt(us_enc) == b"us data"
    assert await other.decrypt_field(field) == "eu field"
    # without a eu-west-1 provider the manager says so, rather than ask us-east-1
    alone = KeyManager({"us": regional("us-east-1")})
    with pytest.raises(KeyNotFoundError, match="no provider in this KeyManager holds"):
        await alone.decrypt(enc)
    for m in (km, other, alone):
        await m.close()


async def test_credentials_are_never_in_errors(moto_kms: MotoKms, closed_port: int) -> None:
    p = open_provider(f"aws-kms://k?region=us-east-1&endpoint=http://127.0.0.1:{closed_port}"
                      "&timeout=2&max_attempts=1", **CREDS)
    with pytest.raises(ProviderConnectionError) as info:
        await p.encrypt(b"x")
    assert CREDS["aws_secret_access_key"] not in str(info.value)
    await p.close()


class _FlakyFront:
    """A loopback HTTP front of moto that answers the first ``throttle`` requests with KMS's
    throttling error (HTTP 400, ``ThrottlingException``) and forwards the rest, recording
    each request's ``X-Amz-Target`` and whether it carried a SigV4 Authorization header."""

    def __init__(self, upstream: str, throttle: int) -> None:
        import http.server
        import threading

        import httpx

        front = self
        self.seen: list[tuple[str, bool]] = []
        self.throttle = throttle

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                auth = self.headers.get("Authorization", "")
                front.seen.append((self.headers.get("X-Amz-Target", ""),
                                   auth.startswith("AWS4-HMAC-SHA256 ")))
                if len(front.seen) <= front.throttle:
                    status, out = 400, b'{"__type":"ThrottlingException","message":"slow down"}'
                else:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "content-length")}
                    r = httpx.post(upstream + "/", content=body, headers=headers, timeout=10,
                                   trust_env=False)
                    status, out = r.status_code, r.content
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_per_request_calls_are_signed_and_a_throttled_one_is_retried_by_boto3(
        moto_kms: MotoKms) -> None:
    front = _FlakyFront(moto_kms.endpoint, throttle=1)
    try:
        p = open_provider(f"aws-kms://{moto_kms.keys['enc']}?region=us-east-1"
                          f"&endpoint={front.url}", **CREDS)
        enc = await p.encrypt(b"secret", context={"t": "1"})  # throttled once, then boto3
        assert front.seen[:2] == [("TrentService.Encrypt", True)] * 2
        assert len(front.seen) == 2
        assert await p.decrypt(enc) == b"secret"  # the direct path, first time lucky
        assert front.seen[2] == ("TrentService.Decrypt", True) and len(front.seen) == 3
        pair = await p.generate_data_key(context={"t": "1"})
        assert await p.decrypt(pair.encrypted_key) == pair.plaintext_key
        assert [t for t, _ in front.seen[3:]] == ["TrentService.GenerateDataKey",
                                                  "TrentService.Decrypt"]
        await p.close()
    finally:
        front.close()


async def test_a_refused_direct_call_is_not_retried(moto_kms: MotoKms) -> None:
    import uuid

    from keygrants.errors import KeyNotFoundError

    front = _FlakyFront(moto_kms.endpoint, throttle=0)
    try:
        p = open_provider(f"aws-kms://{uuid.uuid4()}?region=us-east-1&endpoint={front.url}",
                          **CREDS)
        with pytest.raises(KeyNotFoundError):
            await p.encrypt(b"secret")
        assert len(front.seen) == 1  # a NotFoundException is an answer, not a retry
        await p.close()
    finally:
        front.close()


async def test_the_direct_path_uses_the_proxy_of_the_environment(
        moto_kms: MotoKms, monkeypatch: pytest.MonkeyPatch) -> None:
    front = _FlakyFront(moto_kms.endpoint, throttle=0)  # plain HTTP: it forwards any request
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", front.url)
    try:
        p = open_provider(f"aws-kms://{moto_kms.keys['enc']}?region=us-east-1"
                          f"&endpoint={moto_kms.endpoint}", **CREDS)
        assert await p.decrypt(await p.encrypt(b"secret")) == b"secret"
        assert [t for t, _ in front.seen] == ["TrentService.Encrypt", "TrentService.Decrypt"]
        await p.close()
    finally:
        front.close()
