"""Seal migration (``keygrants operator reseal``) and external seals for ``keygrants server``.

Unit tests of :func:`~keygrants.seal.reseal_root_key` on an in-memory store, then real server
processes: ``--seal aws-kms://`` (moto), ``vault://`` (OpenBao) and ``pkcs11:`` (SoftHSM2),
and a reseal chain local → aws-kms → vault → local that runs while the server serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from keygrants.client import Client
from keygrants.errors import ProviderConnectionError, SealError, UnsealFailed
from keygrants.providers.local import KeyFileProvider
from keygrants.seal import ROOT_KEY_META, open_root_key, reseal_root_key, sealed_with
from keygrants.store.memory import MemoryStore
from keygrants.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from conftest import MotoKms, OpenBao, SoftHsm

START_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0


# -- reseal_root_key ----------------------------------------------------------------------------

class _Seal:
    """A key-file seal whose wrap/unwrap can be made to misbehave."""

    def __init__(self, path: Path, *, wrap_error: Exception | None = None,
                 garble: bool = False, other_root: bool = False, on_wrap: object = None) -> None:
        self._inner = KeyFileProvider(path)
        self.wrap_error = wrap_error
        self.garble = garble
        self.other_root = other_root
        self.on_wrap = on_wrap

    @property
    def uri(self) -> str:
        return self._inner.uri

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        if self.wrap_error is not None:
            raise self.wrap_error
        if callable(self.on_wrap):
            self.on_wrap()
        blob = self._inner.wrap(plaintext, aad=aad)
        return blob[:-1] + bytes([blob[-1] ^ 1]) if self.garble else blob

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        out = self._inner.unwrap(blob, aad=aad)
        return bytes(32) if self.other_root else out


def test_reseal_moves_the_root_key_and_keeps_it(tmp_path: Path) -> None:
    store = MemoryStore()
    old, new = KeyFileProvider(tmp_path / "old.key"), KeyFileProvider(tmp_path / "new.key")
    root, created = open_root_key(store, old)
    assert created
    assert reseal_root_key(store, old, new) == old.uri
    assert sealed_with(store) == new.uri
    assert open_root_key(store, new) == (root, False)
    with pytest.raises(UnsealFailed):
        open_root_key(store, old)


@pytest.mark.parametrize("fault", ["wrap_error", "garble", "other_root", "record_changed"])
def test_a_failed_reseal_changes_nothing(tmp_path: Path, fault: str) -> None:
    store = MemoryStore()
    old = KeyFileProvider(tmp_path / "old.key")
    root, _ = open_root_key(store, old)
    before = store.get_meta(ROOT_KEY_META)
    kwargs: dict[str, object] = {
        "wrap_error": {"wrap_error": ProviderConnectionError("unreachable")},
        "garble": {"garble": True},
        "other_root": {"other_root": True},
        "record_changed": {"on_wrap": lambda: store.set_meta(ROOT_KEY_META, before + b" ")},
    }[fault]
    new = _Seal(tmp_path / "new.key", **kwargs)  # type: ignore[arg-type]
    expected = ProviderConnectionError if fault == "wrap_error" else SealError
    with pytest.raises(expected):
        reseal_root_key(store, old, new)
    if fault == "record_changed":
        store.set_meta(ROOT_KEY_META, before)  # undo the simulated concurrent writer
    assert store.get_meta(ROOT_KEY_META) == before
    assert open_root_key(store, old) == (root, False)


def test_reseal_needs_the_current_seal_and_a_root_key(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = KeyFileProvider(tmp_path / "a.key"), KeyFileProvider(tmp_path / "b.key")
    with pytest.raises(SealError, match="no root key"):
        reseal_root_key(store, a, b)
    open_root_key(store, a)
    before = store.get_meta(ROOT_KEY_META)
    with pytest.raises(UnsealFailed):
        reseal_root_key(store, b, b)
    assert store.get_meta(ROOT_KEY_META) == before


# -- real server processes ----------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    addr: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class Harness:
    """Starts ``keygrants server`` processes and runs CLI commands with a shared environment;
    every process it started is stopped at teardown."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.servers: list[Server] = []

    def start(self, data_dir: Path, *args: str) -> Server:
        port = _free_port()
        log = self.tmp / f"server-{len(self.servers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{port}",
                 "--data-dir", str(data_dir), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        self.servers.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.addr}/readyz", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"server not ready after {START_TIMEOUT}s:\n{server.output()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "keygrants", *args], capture_output=True,
                              text=True, env=self.env, timeout=CLI_TIMEOUT, check=False)

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def harness(tmp_path: Path, moto_kms: MotoKms, openbao: OpenBao,
            softhsm: SoftHsm) -> Iterator[Harness]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYGRANTS_", "AWS_", "VAULT_", "BAO_"))}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-secret-access-key-5d1f",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "VAULT_TOKEN": "kg-root-token-7c0a4e",
        "SOFTHSM2_CONF": str(softhsm.conf), "KEYGRANTS_PKCS11_PIN": "kg-user-pin-4417",
    })
    h = Harness(tmp_path, env)
    try:
        yield h
    finally:
        h.stop_all()


def _token(data_dir: Path) -> str:
    return (data_dir / "admin.token").read_text().strip()


def _recorded_seal(data_dir: Path) -> str | None:
    store = SQLiteStore(data_dir / "keygrants.db")
    try:
        return sealed_with(store)
    finally:
        store.close()


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


@pytest.mark.e2e
def test_reseal_chain_while_serving_then_restart(harness: Harness, tmp_path: Path,
                                                 moto_kms: MotoKms, openbao: OpenBao) -> None:
    data = tmp_path / "data"
    aws = f"aws-kms://{moto_kms.keys['enc']}?region=us-east-1&endpoint={moto_kms.endpoint}"
    vault = f"vault://127.0.0.1:{openbao.port}/enc?ca={openbao.ca}"
    local = f"local://{data / 'seal.key'}"  # back to the data dir's own key file

    server = harness.start(data)  # first start: the local key-file seal in the data dir
    first_seal = _recorded_seal(data)
    assert first_seal is not None and first_seal.startswith("local://")
    written: list[tuple[bytes, bytes]] = []
    with Client(server.addr, token=_token(data)) as c:
        c.create_key("payments")
        written.append((c.encrypt("payments", b"before any reseal").ciphertext,
                        b"before any reseal"))

    previous = None
    for target in (aws, vault, local):
        if previous is not None:  # a provider other than local is never taken from the store
            refused = harness.cli("operator", "reseal", "--to", target, "--data-dir", str(data))
            assert refused.returncode == 1 and "--seal" in refused.stderr + refused.stdout
        from_seal = ("--from", previous) if previous is not None else ()
        out = _ok(harness.cli("operator", "reseal", "--to", target, "--data-dir", str(data),
                              *from_seal))
        assert "Root key resealed" in out
        recorded = _recorded_seal(data)
        assert recorded is not None and recorded.split(":")[0] == target.split(":")[0]
        assert "kg-root-token" not in recorded and "moto-secret" not in recorded
        with Client(server.addr, token=_token(data)) as c:  # the running server kept going
            for ciphertext, plaintext in written:
                assert c.decrypt(ciphertext).plaintext == plaintext
            message = f"after resealing to {target.split(':')[0]}".encode()
            written.append((c.encrypt("payments", message).ciphertext, message))
        server.stop()
        # A local seal is found again in the data directory; another provider must be named
        # at every start (the URI recorded in the store would let whoever writes the store
        # choose where the server sends its credentials).
        if target != local:
            refused = harness.cli("server", "--listen", f"127.0.0.1:{_free_port()}",
                                  "--data-dir", str(data))
            assert refused.returncode != 0 and "--seal" in refused.stderr, refused.stderr
        server = harness.start(data) if target == local else harness.start(data, "--seal", target)
        with Client(server.addr, token=_token(data)) as c:
            for ciphertext, plaintext in written:
                assert c.decrypt(ciphertext).plaintext == plaintext
        previous = None if target == local else target
    server.stop()


@pytest.mark.e2e
def test_a_failed_reseal_leaves_the_old_seal_intact(harness: Harness, tmp_path: Path,
                                                    moto_kms: MotoKms, closed_port: int) -> None:
    data = tmp_path / "data"
    server = harness.start(data)
    with Client(server.addr, token=_token(data)) as c:
        c.create_key("k")
        ciphertext = c.encrypt("k", b"kept").ciphertext
    before = _recorded_seal(data)
    unknown = (f"aws-kms://arn:aws:kms:us-east-1:123456789012:key/"
               f"00000000-0000-4000-8000-000000000000?endpoint={moto_kms.endpoint}")
    for bad in (f"vault://127.0.0.1:{closed_port}/enc?tls=false&timeout=2",
                unknown, "no-such-scheme://x"):
        result = harness.cli("operator", "reseal", "--to", bad, "--data-dir", str(data))
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Error:" in result.stderr and "Traceback" not in result.stderr
        assert _recorded_seal(data) == before
    server.stop()
    server = harness.start(data)
    with Client(server.addr, token=_token(data)) as c:
        assert c.decrypt(ciphertext).plaintext == b"kept"
    server.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("seal", ["vault", "pkcs11"])
def test_server_with_an_external_seal(harness: Harness, tmp_path: Path, openbao: OpenBao,
                                      softhsm: SoftHsm, seal: str) -> None:
    uri = (f"vault://127.0.0.1:{openbao.port}/enc?ca={openbao.ca}" if seal == "vault"
           else softhsm.uri())
    data = tmp_path / "data"
    server = harness.start(data, "--seal", uri)
    assert not (data / "seal.key").exists()
    with Client(server.addr, token=_token(data)) as c:
        c.create_key("k")
        ciphertext = c.encrypt("k", b"sealed by " + seal.encode()).ciphertext
    server.stop()
    recorded = _recorded_seal(data)
    assert recorded is not None and recorded.split(":")[0] == seal
    assert "kg-user-pin" not in recorded and "kg-root-token" not in recorded
    refused = harness.cli("server", "--listen", f"127.0.0.1:{_free_port()}", "--data-dir",
                          str(data))  # the recorded URI is not followed
    assert refused.returncode != 0 and "--seal" in refused.stderr, refused.stderr
    server = harness.start(data, "--seal", uri)
    with Client(server.addr, token=_token(data)) as c:
        assert c.decrypt(ciphertext).plaintext == b"sealed by " + seal.encode()
    server.stop()
    # the wrong seal is refused, naming the one to use
    log = tmp_path / "wrong.log"
    result = harness.cli("server", "--listen", f"127.0.0.1:{_free_port()}", "--data-dir",
                         str(data), "--seal", f"local://{tmp_path / 'wrong.key'}")
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 1 and recorded in result.stderr


def test_a_seal_uri_recorded_in_the_store_is_not_followed(tmp_path: Path) -> None:
    """Whoever can write the store could record ``keygrants://attacker?...&token_env=
    KEYGRANTS_PASSPHRASE`` (or ``vault://attacker?tls=false``): a restart without --seal sent
    the passphrase (or VAULT_TOKEN) there. Only local seals are taken from the data dir."""
    from keygrants.errors import SealError
    from keygrants.server import _choose_seal

    keyfile = f"local://{(tmp_path / 'seal.key').resolve()}"
    assert _choose_seal(None, "local:///elsewhere/seal.key", tmp_path) == keyfile
    assert _choose_seal(None, "local:passphrase", tmp_path) == "local:passphrase"
    assert _choose_seal("vault://kms/k", "vault://attacker/k?tls=false", tmp_path) == "vault://kms/k"
    for recorded in ("keygrants://attacker:1/k?tls=false&token_env=KEYGRANTS_PASSPHRASE",
                     "vault://attacker/k?tls=false", "pkcs11:module-path=/tmp/evil.so"):
        with pytest.raises(SealError, match="--seal"):
            _choose_seal(None, recorded, tmp_path)


def test_a_start_after_a_reseal_to_a_key_file_elsewhere_names_the_seal_to_give(
        tmp_path: Path) -> None:
    # Without --seal a server looks for its key file in the data directory. After a reseal to a
    # key file elsewhere it said only "seal.key is missing: restore it from your backup", or,
    # with a stale seal.key left by an earlier seal, "does not open the root key".
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    h = Harness(tmp_path, env)
    data, elsewhere = tmp_path / "data", tmp_path / "kept" / "other.key"
    elsewhere.parent.mkdir()
    try:
        h.start(data).stop()
        said = _ok(h.cli("operator", "reseal", "--data-dir", str(data), "--to",
                         f"local://{elsewhere}"))
        wanted = f"--seal local://{elsewhere}"
        # one advice, not "the next start uses it" and then "start it with --seal"
        assert wanted in said and "the next start uses it" not in said, said
        for case in ("stale seal.key", "no seal.key"):
            if case == "no seal.key":
                (data / "seal.key").unlink()
            started = subprocess.run(
                [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{_free_port()}",
                 "--data-dir", str(data)], capture_output=True, text=True, env=env,
                timeout=CLI_TIMEOUT, check=False)
            assert started.returncode != 0 and wanted in started.stderr, (case, started.stderr)
        assert h.start(data, "--seal", f"local://{elsewhere}")
    finally:
        h.stop_all()


def test_a_local_seal_uri_with_a_query_is_refused_not_taken_as_the_file_name(
        tmp_path: Path) -> None:
    # "seal.key?timeout=5" became the name of a new key file holding a new root key
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    h = Harness(tmp_path, env)
    data, odd = tmp_path / "data", tmp_path / "seal.key?timeout=5"
    started = subprocess.run(
        [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{_free_port()}",
         "--data-dir", str(data), "--seal", f"local://{tmp_path}/seal.key?timeout=5"],
        capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT, check=False)
    assert started.returncode != 0 and "cannot hold ? or #" in started.stderr, started.stderr
    assert not odd.exists() and not (data / "keygrants.db").exists()
    try:
        h.start(data).stop()
        moved = h.cli("operator", "reseal", "--data-dir", str(data), "--to",
                      f"local://{tmp_path}/other.key#x")
        assert moved.returncode != 0 and "cannot hold ? or #" in moved.stderr, moved.stderr
        assert _recorded_seal(data) == f"local://{(data / 'seal.key').resolve()}"
    finally:
        h.stop_all()
