"""Running the server: prepare the data directory, unseal, build the app, serve, stop cleanly.

Data directory layout (mode 0700)::

    keygrants.db        SQLite database (WAL), mode 0600 (absent with --store postgresql://)
    audit.db            the audit Merkle log (WAL), mode 0600 (with --store postgresql:// the
                        log is in that database, schema keygrants_audit, shared by every node)
    seal.key            local key-file seal (absent when sealed by passphrase), mode 0600
    admin.token         the admin token, written on first start, mode 0600
    .lock               held (flock) by the one server using the directory; holds its pid
                        (not with --store postgresql://: nodes share that store by design)

A data directory that shows an earlier deployment (seal.key, admin.token or a non-empty
audit.db) is never taken for a first start: a missing or empty keygrants.db, or a store
without a root key, is refused with nothing created, and so is a missing seal.key at restart.
A refused start removes what it created itself and changes nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keygrants._files import exposed_mode, write_private_file
from keygrants._version import __version__
from keygrants.access import open_access, reload_access
from keygrants.api.app import HttpLimits, KeygrantsApp, create_app
from keygrants.api.tls import protocol_class, server_ssl_options
from keygrants.audit.service import AuditService
from keygrants.audit.setup import AUDIT_DB_FILE, AuditSetup, is_postgres_url, open_audit
from keygrants.audit.sinks import JsonlFileSink, Shipper, open_sink
from keygrants.auth import RequestContext, ensure_admin_token, reset_admin_token
from keygrants.auth.authenticator import AuthSettings
from keygrants.auth.directory import Directory
from keygrants.auth.ratelimit import RateLimiter
from keygrants.bus import open_bus
from keygrants.errors import KeygrantsError, SealError, StoreError
from keygrants.grant_service import GrantAuthorizer, GrantService, GrantSettings
from keygrants.grants.push import CHANGES_SUBJECT, SUBJECT, RevocationPublisher, decode_message
from keygrants.providers import RootKeyProvider, open_root_provider
from keygrants.providers.local import PASSPHRASE_ENV
from keygrants.seal import open_root_key, sealed_with
from keygrants.service import KMS, Limits
from keygrants.store import open_store

__all__ = [
    "ADMIN_TOKEN_FILE",
    "DEFAULT_DATA_DIR",
    "DEFAULT_LISTEN",
    "ServerConfig",
    "build_server",
    "parse_listen",
    "serve",
]

log = logging.getLogger("keygrants.server")

DEFAULT_LISTEN: Final = "127.0.0.1:8650"
DEFAULT_DATA_DIR: Final = "./keygrants-data"
ADMIN_TOKEN_FILE: Final = "admin.token"
DB_FILE: Final = "keygrants.db"
SEAL_KEY_FILE: Final = "seal.key"
LOCK_FILE: Final = ".lock"
STARTUP_FAILURE: Final = 3  # the exit status uvicorn gives a start its app refused
_SIDECARS: Final = ("", "-wal", "-shm")


@dataclass(slots=True)
class ServerConfig:
    """Everything ``keygrants server`` can be told."""

    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    listen: str = DEFAULT_LISTEN
    seal: str | None = None
    store: str | None = None
    max_plaintext: int = 64 * 1024
    scheduler_interval: float = 30.0
    reset_admin_token: bool = False
    access_log: bool = False
    node_id: str = field(default_factory=socket.gethostname)
    checkpoint_interval: float = 1.0
    audit_sinks: list[str] = field(default_factory=list)
    auth: AuthSettings = field(default_factory=AuthSettings)
    rate_limit: float = 1000.0
    rate_burst: int = 2000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    usage_flush_interval: float = 30.0
    grants: GrantSettings = field(default_factory=GrantSettings)
    bus: str | None = None
    bus_heartbeat: float = 1.0
    public_url: str | None = None
    max_connections: int = 1024


@dataclass(slots=True)
class BuiltServer:
    """The unsealed service and its app, plus what first start created."""

    kms: KMS
    app: KeygrantsApp
    audit: AuditSetup
    admin_token_path: Path
    created_root_key: bool
    wrote_admin_token: bool


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → ``(host, port)``.

    Raises:
        ValueError: for anything else.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _write_secret_file(path: Path, text: str) -> None:
    write_private_file(path, (text + "\n").encode())


def refuse_uri_query(uri: str) -> str:
    """Return a seal URI given by the user, refusing a ``local:`` key file URI with a query or
    a fragment: the file name would take it (``seal.key?timeout=5``, a new root key made in a
    file of that name) rather than it being an option.

    Raises:
        SealError: for such a URI.
    """
    if uri.startswith("local:") and uri != "local:passphrase" and ("?" in uri or "#" in uri):
        raise SealError("a local: seal takes no options: a key file URI cannot hold ? or # "
                        "(local:///path/seal.key, or local:passphrase)")
    return uri


def _choose_seal(given: str | None, stored: str | None, data_dir: Path) -> str:
    """``--seal`` if given; else the seal the data directory was made with when it is a local
    one (its key file is always looked for in the data directory, so a moved directory still
    opens); on first start the passphrase when ``KEYGRANTS_PASSPHRASE`` is set, else a key
    file.

    Raises:
        SealError: the store was sealed by another provider and no ``--seal`` was given. The
            URI recorded in the store is not followed: whoever can write the store would
            choose the host the server sends its credentials to (``token_env``, ``tls=false``,
            a PKCS#11 module path...).
    """
    if given:
        return refuse_uri_query(given)
    keyfile = f"local://{(data_dir / SEAL_KEY_FILE).resolve()}"
    if stored is None:
        return "local:passphrase" if os.environ.get(PASSPHRASE_ENV) else keyfile
    if stored == "local:passphrase":
        return stored
    if stored.startswith("local:"):
        return keyfile
    scheme = stored.split(":", 1)[0][:32]
    raise SealError(f"this store's root key is sealed by a {scheme!r} provider: give its URI "
                    "with --seal (or KEYGRANTS_SEAL); the URI recorded in the store is not used "
                    "to choose where credentials go")


def per_node_file_sinks(sinks: list[Any], node_id: str) -> None:
    """Name each file sink (without a ``name=`` of its own) after this node as well: on a
    PostgreSQL store the nodes share one log and its sink cursors, and a file is this node's
    own, so a shared cursor would let a node that was down resume from where another node's
    file got to, leaving a gap in its own file."""
    for sink in sinks:
        if isinstance(sink, JsonlFileSink) and sink.name == f"file://{sink.path}":
            sink.name = f"file://{node_id}{sink.path}"


def build_server(config: ServerConfig) -> BuiltServer:
    """Prepare the data directory, unseal the root key and build the ASGI app.

    Unless the store is PostgreSQL, the data directory is locked first (``.lock``, for the
    life of the server): a second server on it is refused. A refused start removes the files
    it created and leaves the others as they were.

    Raises:
        KeygrantsError: when the data directory is in use or shows an earlier deployment
            whose store or seal key is missing, when the store or audit log cannot be opened
            (or the log is shorter than the store records), or the root key does not unseal.
        ValueError: for a malformed audit sink URI.
    """
    sinks = [open_sink(uri) for uri in config.audit_sinks]  # a bad URI fails before any I/O
    shared = is_postgres_url(config.store)
    if shared:
        per_node_file_sinks(sinks, config.node_id)
    bus = open_bus(config.bus) if config.bus else None
    data_dir = config.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_dir.chmod(0o700)
    except OSError as exc:
        raise StoreError(f"cannot use the data directory {data_dir}: {exc.strerror or exc}") from exc
    sqlite_store = config.store is None or config.store.startswith("sqlite:")
    earlier = _earlier_deployment(data_dir) if sqlite_store else []
    if config.store is None:
        _refuse_lost_store(data_dir, earlier)  # before anything is created, even the lock
    lock = None if shared else _DataDirLock.take(data_dir)
    existed = {name for name in _OWN_FILES if (data_dir / name).exists()}
    provider: RootKeyProvider | None = None
    store: Any = None
    audit: AuditSetup | None = None
    try:
        if config.store is None and not (data_dir / DB_FILE).exists():
            # First start on the default SQLite store: a seal that cannot be opened (no or
            # too short a passphrase, an unknown provider) is refused before the database is
            # made.
            provider = open_root_provider(_choose_seal(config.seal, None, data_dir))
        if (config.store or "").startswith("memory:") and _nonempty(data_dir / AUDIT_DB_FILE):
            # the memory store makes a new root key, and so a new audit key, at every start:
            # the earlier start's log was reported as badly signed (as if tampered with)
            raise StoreError(f"a memory: store keeps nothing, the audit key included, so the "
                             f"audit log {data_dir / AUDIT_DB_FILE} of an earlier start cannot "
                             "be continued: give each memory: start an empty --data-dir")
        store = open_store(config.store or f"sqlite://{(data_dir / DB_FILE).resolve()}")
        stored_seal = sealed_with(store)
        if stored_seal is None and earlier:
            raise StoreError(f"the store holds no root key, but the data directory {data_dir} "
                             f"shows an earlier deployment ({', '.join(earlier)}): restore the "
                             "store from your backup; a new root key is not made (to start a "
                             "new service, move those files out of the directory first)")
        if provider is None:
            uri = _choose_seal(config.seal, stored_seal, data_dir)
            # at a restart a missing seal key file is an error, not a new key
            options = {"create": False} if stored_seal is not None and uri.startswith("local:") else {}
            try:
                provider = open_root_provider(uri, **options)
            except SealError as exc:
                if stored_seal is None or _exposed_key_file(uri) or (
                        _same_kind_of_seal(stored_seal, uri)
                        and not _moved_key_file(stored_seal, uri)):
                    raise
                raise SealError(f"{exc.message}; this data directory was sealed with "
                                f"{stored_seal}{_seal_advice(stored_seal, config.seal)}") from exc
        try:
            root_key, created = open_root_key(store, provider)
        except SealError as exc:
            if stored_seal is None or not _moved_key_file(stored_seal, provider.uri):
                raise
            # a reseal to a key file elsewhere, and a stale seal.key left in the directory
            raise type(exc)(f"{exc.message}; this data directory was sealed with "
                            f"{stored_seal}{_seal_advice(stored_seal, config.seal)}") from exc
        audit = open_audit(store, root_key, path=data_dir / AUDIT_DB_FILE, node=config.node_id,
                           checkpoint_interval=config.checkpoint_interval, store_url=config.store)
        return _assemble(config, store, audit, root_key, created, sinks, bus,
                         seal=provider.uri.split(":", 1)[0], lock=lock)
    except BaseException:  # a refused start leaves nothing open (and the data dir as it was)
        try:
            if audit is not None:
                audit.log.close()
        finally:
            try:
                if store is not None:
                    store.close()
            finally:
                _remove_created(data_dir, existed)
                if lock is not None:
                    lock.release()
        raise


def _moved_key_file(stored: str, used: str) -> bool:
    """The store names a key file other than the one used (``operator reseal --to
    local:///elsewhere``): without ``--seal`` a server looks in its data directory."""
    return (stored.startswith("local://") and used.startswith("local://")
            and Path(stored[len("local://"):]).resolve() != Path(used[len("local://"):]).resolve())


def _exposed_key_file(uri: str) -> bool:
    """The key file is refused for its mode: the chmod the error gives is all it takes (in a
    moved data directory the recorded seal names the old directory's key file, which is not
    the one to use)."""
    return uri.startswith("local://") and exposed_mode(uri[len("local://"):]) is not None


def _seal_advice(stored: str, given: str | None) -> str:
    return f": start with --seal {stored}" if given is None and stored.startswith("local://") else ""


def _same_kind_of_seal(a: str, b: str) -> bool:
    """Whether two seal URIs are the same provider (a key file and a passphrase differ)."""
    return (a.split(":", 1)[0] == b.split(":", 1)[0]
            and (a == "local:passphrase") == (b == "local:passphrase"))


# What a start may create in the data directory; a refused start removes those it created
# (a database's -wal and -shm only with the database itself: they may hold its commits).
_OWN_FILES: Final = (DB_FILE, AUDIT_DB_FILE, SEAL_KEY_FILE, ADMIN_TOKEN_FILE)


def _remove_created(data_dir: Path, existed: set[str]) -> None:
    for name in _OWN_FILES:
        if name in existed:
            continue
        suffixes = _SIDECARS if name in (DB_FILE, AUDIT_DB_FILE) else ("",)
        for suffix in suffixes:
            try:
                (data_dir / (name + suffix)).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s after a refused start: %s", name + suffix,
                            exc.strerror or exc)


def _nonempty(path: Path) -> bool:
    """Whether a SQLite file holds anything (itself, or committed frames in its WAL)."""
    for suffix in ("", "-wal"):
        try:
            if Path(f"{path}{suffix}").stat().st_size > 0:
                return True
        except FileNotFoundError:
            continue
    return False


def _earlier_deployment(data_dir: Path) -> list[str]:
    """What in the data directory shows that a server was started on it before."""
    found = [name for name in (SEAL_KEY_FILE, ADMIN_TOKEN_FILE) if (data_dir / name).exists()]
    if _nonempty(data_dir / AUDIT_DB_FILE):
        found.append(f"a non-empty {AUDIT_DB_FILE}")
    return found


def _refuse_lost_store(data_dir: Path, earlier: list[str]) -> None:
    """A missing or empty ``keygrants.db`` in a data directory used before is a lost store,
    not a first start: making a new one would mean a new root key, an empty keyring and a
    new admin token over the old one.

    Raises:
        StoreError: naming what is missing and what is present; nothing was changed.
    """
    db = data_dir / DB_FILE
    if not earlier or _nonempty(db):
        return
    state = "is empty" if db.exists() else "is missing"
    raise StoreError(f"{db} {state}, but the data directory shows an earlier deployment "
                     f"({', '.join(earlier)}): restore {DB_FILE} from your backup; nothing was "
                     "changed (to start a new service instead, move those files out of the "
                     "directory first)")


class _DataDirLock:
    """An exclusive ``flock`` on ``DATA_DIR/.lock``, held while one server uses the
    directory; the file holds that server's pid for the message another start shows. The
    kernel drops the lock when the process ends, however it ends."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def take(cls, data_dir: Path) -> _DataDirLock:
        """Lock ``data_dir`` without waiting.

        Raises:
            StoreError: the directory is in use by another server (its pid when known), or
                cannot be locked.
        """
        path = data_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreError(f"data directory {data_dir} is in use by another keygrants "
                             f"server{pid}: stop it first (two servers on one data directory "
                             "break each other's audit log)") from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock the data directory {data_dir}: "
                             f"{exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):  # the pid is for the message only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a server built but never run does not keep the directory
        self.release()


def _assemble(config: ServerConfig, store: Any, audit: AuditSetup, root_key: bytes,
              created: bool, sinks: list[Any], bus: Any, *, seal: str,
              lock: _DataDirLock | None) -> BuiltServer:
    """The services and the app over an opened store and audit log (the lock is released
    when the app's lifespan ends)."""
    data_dir = config.data_dir
    token_path = data_dir / ADMIN_TOKEN_FILE
    token = reset_admin_token(store) if config.reset_admin_token else ensure_admin_token(store)
    if token is not None:
        try:
            _write_secret_file(token_path, token)
        except OSError as exc:
            raise StoreError(f"cannot write the admin token to {token_path}: "
                             f"{exc.strerror or exc}") from exc
    access = open_access(store, root_key, audit=audit.recorder, settings=config.auth)
    limits = Limits(max_plaintext=config.max_plaintext, max_message=config.max_plaintext)
    kms = KMS(store, root_key, limits=limits, audit=audit.recorder, authorizer=access.authorizer)
    grants = GrantService(kms, access.authorizer, root_key=root_key, settings=config.grants,
                          audit=audit.recorder)
    kms.use_authorizer(GrantAuthorizer(access.authorizer, grants))
    audit_service = AuditService(audit, kms.authorizer)
    rate_limiter = (RateLimiter(config.rate_limit, config.rate_burst)
                    if config.rate_limit > 0 else None)

    interval = config.scheduler_interval

    started = {"version": __version__, "listen": config.listen,
               "store": (config.store or "sqlite:").split(":", 1)[0],
               "seal": seal, "node": config.node_id}
    if config.reset_admin_token:  # the most powerful credential replaced: in the log too
        started["admin_token"] = "reset"

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        system = RequestContext(principal="system", request_id="lifecycle")
        stop_scheduler = asyncio.Event()
        publisher: RevocationPublisher | None = None
        keys_changed: Callable[[], None] | None = None
        if bus is not None:
            publisher = RevocationPublisher(bus, store.latest_revocation_seq,
                                            interval=config.bus_heartbeat)
            try:  # a configured bus that cannot be reached stops the start, leaving nothing open
                await publisher.start()
                grants.on_revocations = publisher.publish_entries
                await bus.subscribe(SUBJECT, _peer_revocations(grants))
                origin = secrets.token_hex(8)  # this process (node ids can repeat on one host)
                await bus.subscribe(CHANGES_SUBJECT,
                                    _peer_changes(kms, access, store, grants, origin))
            except BaseException:
                grants.on_revocations = None
                try:
                    await publisher.stop()
                finally:
                    try:
                        await asyncio.to_thread(audit.log.close)
                    finally:
                        store.close()
                        if lock is not None:
                            lock.release()
                raise
            changes = publisher

            def changed(what: str) -> None:
                changes.publish_change(what, origin)

            app.on_change = changed
            keys_changed = functools.partial(changed, "keys")
            if config.reset_admin_token:  # the other nodes read the new digest, the old one
                changed("principals")     # stops working there too

        # recorded once nothing can stop the start any more (a bus that cannot be reached did,
        # leaving a server.start with no server.stop)
        await asyncio.to_thread(audit.recorder.record, system, "server.start", "ok",
                                operation="start", detail=started, wait=True)

        def resync_shared() -> None:
            kms.forget_cached()
            reload_access(access, store)

        # other nodes may share a PostgreSQL store: read what they changed on every run
        resync = resync_shared if is_postgres_url(config.store) else None

        task = asyncio.create_task(_scheduler(kms, grants, interval, stop_scheduler,
                                              keys_changed, resync))
        usage = asyncio.create_task(_flush_usage(access.directory, config.usage_flush_interval,
                                                 stop_scheduler))
        shippers = [Shipper(audit.log, sink).start() for sink in sinks]
        # Everything made at start lives as long as the server: out of the collector's
        # sight, a full collection under load paused requests for up to 20 ms (measured with
        # gc.callbacks during grant issuance), and under 3 ms once frozen.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # what this server made may be collected once it is gone
            stop_scheduler.set()
            await task
            await usage
            try:
                await asyncio.to_thread(audit.recorder.record, system, "server.stop", "ok",
                                        operation="stop", wait=True)
            except KeygrantsError as exc:
                log.error("could not record server.stop: %s", exc.message)
            await asyncio.gather(*(shipper.stop() for shipper in shippers))
            if publisher is not None:
                grants.on_revocations = None
                await publisher.stop()
            # bounded even if the store hangs: a commit under way gets 5 s, then is cut off
            await asyncio.to_thread(functools.partial(audit.log.close, timeout=5.0))
            store.close()
            if lock is not None:
                lock.release()

    app = create_app(kms, access.authenticator,
                     limits=HttpLimits.for_plaintext(config.max_plaintext), lifespan=lifespan,
                     audit=audit_service, access=access.service, rate_limiter=rate_limiter,
                     grants=grants, public_url=config.public_url)
    return BuiltServer(kms=kms, app=app, audit=audit, admin_token_path=token_path,
                       created_root_key=created, wrote_admin_token=token is not None)


class _Coalesced:
    """Runs a blocking refresh in a worker thread when bus messages ask for it: at most one at
    a time, and messages that arrive meanwhile cause one more run, not one each (a flood of
    messages, forged or not, costs at most back-to-back refreshes)."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        self._refresh = refresh
        self._running = False
        self._again = False

    async def trigger(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while True:
                self._again = False
                try:
                    await asyncio.to_thread(self._refresh)
                except Exception:  # the scheduler's periodic sync still runs
                    log.warning("refresh after a bus message failed", exc_info=True)
                if not self._again:
                    return
        finally:
            self._running = False


def _peer_changes(kms: KMS, access: Any, store: Any, grants: GrantService,
                  origin: str) -> Callable[[bytes], Awaitable[None]]:
    """Reload what another node changed in the shared store: keys (dropped from the cache,
    reloaded on next use), principals, credentials and policies, or issuer keys (read again
    from the store). A message only says *that* something changed; what is loaded comes from
    the store."""
    keys = _Coalesced(kms.forget_cached)
    principals = _Coalesced(lambda: reload_access(access, store))
    issuer = _Coalesced(grants.reload_issuer_keys)

    async def on_message(data: bytes) -> None:
        try:
            msg = json.loads(data) if len(data) <= 4096 else None
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("type") != "change" or msg.get("node") == origin:
            return
        what = msg.get("what")
        if what in ("keys", "aliases"):
            await keys.trigger()
        elif what in ("principals", "policies"):
            await principals.trigger()
        elif what == "issuer":
            await issuer.trigger()
    return on_message


def _peer_revocations(grants: GrantService) -> Callable[[bytes], Awaitable[None]]:
    """On any revocation message (another node's entry, or a heartbeat), pull the feed from
    the shared store: the store, never a message body, is what this node applies, so a forged
    message can at most cause a refresh."""
    sync = _Coalesced(grants.sync_revocations)

    async def on_message(data: bytes) -> None:
        try:
            msg = decode_message(data)
        except (ValueError, KeyError, TypeError, OverflowError):
            return
        if isinstance(msg, int) and msg <= grants.synced_seq:
            return  # a heartbeat: nothing new
        await sync.trigger()
    return on_message


async def _scheduler(kms: KMS, grants: GrantService | None, interval: float,
                     stop: asyncio.Event,
                     on_keys_changed: Callable[[], None] | None = None,
                     resync: Callable[[], None] | None = None) -> None:
    """Apply due rotations and deletions (keys, issuer keys, expired revocation entries) now
    and every ``interval`` seconds, until ``stop`` (a run in progress finishes first: it is
    never cut off mid-write). ``resync``, on a store other nodes share, reads what they may
    have changed (a bus message can be lost; the store is the truth)."""
    first = True
    while not stop.is_set():
        try:
            if resync is not None and not first:
                await asyncio.to_thread(resync)
            first = False
            rotated, destroyed = await asyncio.to_thread(kms.run_due)
            if rotated or destroyed:
                log.info("scheduler: rotated %d key(s), destroyed %d key(s)", rotated, destroyed)
                if on_keys_changed is not None:
                    on_keys_changed()
            if grants is not None:
                await asyncio.to_thread(grants.run_due)
        except KeygrantsError as exc:
            log.warning("scheduler: %s (%s); will retry", exc.message, exc.code)
        except Exception:
            log.exception("scheduler: unexpected error; will retry")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _flush_usage(directory: Directory, interval: float, stop: asyncio.Event) -> None:
    """Write last-seen/last-used times every ``interval`` seconds and once more at stop."""
    while True:
        stopping = False
        try:
            await asyncio.wait_for(stop.wait(), interval)
            stopping = True
        except TimeoutError:
            pass
        try:
            await asyncio.to_thread(directory.flush_usage)
        except KeygrantsError as exc:
            log.warning("could not record principal usage: %s", exc.message)
        except Exception:  # never let the loop die: usage times are a convenience
            log.exception("could not record principal usage")
        if stopping:
            return


def serve(config: ServerConfig, *, announce: Any = print) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish, then it exits."""
    import uvicorn

    _Server = _server_class()
    host, port = parse_listen(config.listen)
    started = time.monotonic()
    sock = _listen_socket(host, port)  # fail before touching the data directory
    try:
        _check_tls_files(config)  # so does a certificate that cannot be used
        built = build_server(config)
    except BaseException:
        sock.close()
        raise
    if built.created_root_key:
        announce(f"Initialized a new data directory at {config.data_dir.resolve()}")
    if built.wrote_admin_token:
        announce(f"Admin token written to {built.admin_token_path.resolve()} (mode 0600)")
    elif not built.admin_token_path.exists():
        if is_postgres_url(config.store):
            # one admin token for every node of the store: a reset would revoke theirs
            announce(f"Admin token file {built.admin_token_path} is missing: every node of this "
                     "store shares one admin token, so copy admin.token from the node that made "
                     "it (--reset-admin-token would issue a new one and revoke it on every node)")
        else:
            announce(f"Admin token file {built.admin_token_path} is missing; restart with "
                     "--reset-admin-token to issue a new one")
    else:
        announce(f"Admin token: {built.admin_token_path.resolve()}")
    mode = exposed_mode(built.admin_token_path)
    if mode is not None:  # refused for seal.key; the admin token is as powerful
        token = built.admin_token_path.resolve()
        announce(f"Warning: {token} is accessible by group or others (mode {mode:o}); run: "
                 f"chmod 600 {token}")
    where = ("the store's database (schema keygrants_audit)" if is_postgres_url(config.store)
             else str((config.data_dir / AUDIT_DB_FILE).resolve()))
    announce(f"Audit log: {where} (verifier key: {built.audit.vkey})")
    tls: dict[str, Any] = {}
    http: Any = protocol_class(tls=False)
    if config.tls_cert is not None:
        assert config.tls_key is not None
        tls = server_ssl_options(str(config.tls_cert), str(config.tls_key),
                                 str(config.client_ca) if config.client_ca else None)
        http = protocol_class()
    scheme = "https" if tls else "http"

    def listening() -> None:  # once the start can no longer fail (the bus is connected)
        announce(f"keygrants listening on {scheme}://{config.listen} "
                 f"(unsealed in {time.monotonic() - started:.2f}s)")
    uv_config = uvicorn.Config(
        built.app, host=host, port=port, loop="auto", http=http, lifespan="on",
        access_log=config.access_log, log_level="warning", server_header=False,
        proxy_headers=False, timeout_graceful_shutdown=10,
        # beyond this many open connections (or requests in progress) a request gets 503 at
        # once: connections are bounded like everything else a client can make the server hold
        limit_concurrency=config.max_connections, **tls,
    )
    if config.access_log:
        # uvicorn sets its access logger to log_level (warning): its INFO lines were dropped
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = _Server(uv_config, on_started=listening)
    server.run(sockets=[sock])
    if not server.started:  # a failed start: uvicorn before 0.50 returns instead of exiting
        sys.exit(STARTUP_FAILURE)
    announce("keygrants stopped")


def _check_tls_files(config: ServerConfig) -> None:
    """Load the TLS files as the listener will: a key that does not match its certificate or
    a client CA that holds no certificate was found only after a new data directory had been
    initialized, and reported as "cannot listen".

    Raises:
        ValueError: naming the option whose file cannot be used.
    """
    if config.tls_cert is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls-cert/--tls-key cannot be used: {exc.strerror or exc}") from None
    if config.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(config.client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"--client-ca cannot be used: {exc.strerror or exc}") from None


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a taken port is one clear error up front.

    Raises:
        OSError: when the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM is a clean stop (exit status 0): uvicorn
        re-raises the signal after its graceful shutdown, which turns a requested stop into
        a 'killed by signal' exit; and ``on_started`` runs once the app's start succeeded."""

        def __init__(self, config: uvicorn.Config, *,
                     on_started: Callable[[], None] | None = None) -> None:
            super().__init__(config)
            self._on_started = on_started

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            # a failed start exits here (uvicorn >= 0.50) or sets should_exit (before)
            await super().startup(sockets=sockets)
            if self._on_started is not None and not (self.should_exit
                                                     or self.lifespan.should_exit):
                self._on_started()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
