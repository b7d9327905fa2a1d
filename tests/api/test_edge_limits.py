"""What an unauthenticated or slow client can make the server hold: request heads are bounded
in size and time by the HTTP protocol, bodies are read only for an authenticated caller (or a
signature naming a known key) and within a time limit, and a client that leaves before its
body never runs the request."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import keygrants.api.app as app_module
import keygrants.api.tls as tls_module
from keygrants.api.tls import protocol_class

from .conftest import World
from .test_authn_http import _self_signed_der

pytestmark = pytest.mark.anyio


def _scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8650),
            "headers": [(b"host", b"127.0.0.1:8650")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


async def _call(world: World, method: str, path: str, request_headers: dict[str, str],
                receive: Callable[[], Awaitable[dict[str, Any]]],
                **scope: Any) -> tuple[int, dict[str, bytes], bytes]:
    """One request through the app; ``scope`` entries replace the built scope's."""
    start: dict[str, Any] = {}
    body = b""

    async def send(message: dict[str, Any]) -> None:
        nonlocal body
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            body += message.get("body", b"")

    await world.app(_scope(method, path, request_headers) | scope, receive, send)
    return start["status"], {k.decode(): v for k, v in start["headers"]}, body


async def _never() -> dict[str, Any]:
    raise AssertionError("the body was read")


async def test_an_unauthenticated_request_is_refused_before_its_body_is_read(world) -> None:
    for headers in ({"content-length": str(16 * 1024 * 1024)},
                    {"content-length": "100", "authorization": "Bearer kg_ak_0123456789abcdef_x"},
                    {"content-length": "100", "authorization": f"Bearer {world.token}x"}):
        status, _, body = await _call(world, "POST", "/v1/keys/enc/encrypt-batch", headers,
                                      _never)
        assert status == 401, (headers, body)


async def test_a_signature_naming_an_unknown_key_is_refused_before_the_body(world) -> None:
    headers = {"content-length": "1000",
               "signature-input": 'sig1=("@method");created=1;keyid="nobody/abc";nonce="n"',
               "signature": "sig1=:AAAA:"}
    status, _, body = await _call(world, "POST", "/v1/keys/enc/encrypt", headers, _never)
    assert status == 401 and b"unknown_key" in body
    no_keyid = dict(headers, **{"signature-input": 'sig1=("@method");created=1'})
    status, _, body = await _call(world, "POST", "/v1/keys/enc/encrypt", no_keyid, _never)
    assert status == 401 and b"signature_invalid" in body


async def test_a_client_that_leaves_before_its_body_runs_nothing(world) -> None:
    """An empty body means all defaults: a client gone before sending it used to have the
    request run with them (schedule-deletion with the 30-day default, audited as done)."""
    before = world.snapshot()

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    status, _, body = await _call(world, "POST", "/v1/keys/enc/schedule-deletion",
                                  {"authorization": f"Bearer {world.token}",
                                   "content-length": "20"}, gone)
    assert status == 400 and b"disconnected" in body
    assert world.snapshot() == before


async def test_a_body_that_does_not_arrive_in_time_is_408_and_closes(world, monkeypatch) -> None:
    monkeypatch.setattr(app_module, "BODY_TIMEOUT", 0.05)

    async def stalled() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    status, headers, body = await asyncio.wait_for(_call(
        world, "POST", "/v1/keys/enc/encrypt",
        {"authorization": f"Bearer {world.token}", "content-length": "20"}, stalled), 30)
    assert status == 408 and b"request_timeout" in body
    assert headers["connection"] == b"close"


async def test_a_body_sent_slowly_in_time_is_read_and_nothing_is_left_behind(
        world, monkeypatch) -> None:
    """Deadline checks that run while a body is still arriving, in time, leave it alone."""
    monkeypatch.setattr(app_module, "BODY_TIMEOUT", 5.0)
    monkeypatch.setattr(app_module, "_DEADLINE_TICK", 0.02)
    deadlines = world.app._body_deadlines
    checks: list[int] = []
    check = app_module._BodyDeadlines._check

    def counted(self: Any, loop: Any) -> None:
        checks.append(1)
        check(self, loop)

    monkeypatch.setattr(app_module._BodyDeadlines, "_check", counted)
    body = b'{"plaintext":"aGVsbG8="}'
    parts = [body[:7], body[7:15], body[15:]]

    async def slow() -> dict[str, Any]:
        await asyncio.sleep(0.1)
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    status, _, answer = await _call(world, "POST", "/v1/keys/enc/encrypt",
                                    {"authorization": f"Bearer {world.token}",
                                     "content-length": str(len(body))}, slow)
    assert status == 200, answer
    assert checks, "no deadline check ran while the body arrived"
    assert not any(deadlines._due.values()) and not deadlines._late
    seen = len(checks)
    for _ in range(500):  # a check after the request ended cancels nothing
        if len(checks) > seen:
            break
        await asyncio.sleep(0.02)
    assert len(checks) > seen, "no deadline check ran after the request"
    assert not any(deadlines._due.values()) and not deadlines._late


@pytest.mark.parametrize("late", [False, True])
async def test_a_request_cancelled_by_the_server_while_reading_is_not_a_408(world,
                                                                          late: bool) -> None:
    """Shutting down cancels requests in progress: that stays a cancellation, also when the
    body's deadline is found passed in the same moment."""
    reading = asyncio.Event()

    async def stalled() -> dict[str, Any]:
        reading.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(_call(world, "POST", "/v1/keys/enc/encrypt",
                                       {"authorization": f"Bearer {world.token}",
                                        "content-length": "20"}, stalled))
    await reading.wait()
    deadlines = world.app._body_deadlines
    loop = asyncio.get_running_loop()
    task.cancel()
    if late:  # the deadline check cancels it too, before it runs again
        (reader,) = deadlines._due[loop]
        deadlines._due[loop][reader] = 0.0
        deadlines._check(loop)
        assert reader in deadlines._late
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadlines._late and not deadlines._due.get(loop)


# -- the request head, over a real socket -------------------------------------------------------

async def _serve() -> AsyncIterator[tuple[int, list[int]]]:
    import uvicorn

    calls: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        calls.append(1)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=protocol_class(tls=False), lifespan="off",
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start within 10 s"
        yield port, calls
    finally:
        server.should_exit = True
        await serving


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 30)  # until the server closes


async def test_a_request_head_over_the_limit_is_431_and_closes() -> None:
    async for port, calls in _serve():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\nx-long: ")
        chunk = b"a" * 8192
        for _ in range(tls_module.MAX_HEAD_BYTES // len(chunk) + 2):
            writer.write(chunk)
            await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 ") and b'"code":"header_too_large"' in answer
        assert calls == []
        # a head over the limit that arrives whole, in one read (it was parsed before its
        # bytes were counted: heads up to twice the limit were served)
        warnings: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            for size in (tls_module.MAX_HEAD_BYTES + 100, 120_000):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nhost: t\r\nx-long: " + b"a" * size
                             + b"\r\n\r\n")
                answer = await _read_all(reader)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:200])
                assert answer.count(b"HTTP/1.1") == 1  # one answer, not also the parser's 400
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
        assert warnings == []  # nor its "Invalid HTTP request received." in the log
        # a chunked body's trailer is not head: its request is already with the app, which
        # answers it once (a 431 written as well made two answers to one request)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"1\r\na\r\n0\r\nx-trailer: " + b"c" * 70_000 + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 "), head
        writer.close()
        calls.clear()
        # so are many headers that add up to over it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        many = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(80))
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n" + many + b"\r\n")
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert calls == []
        # a head within the limit is served
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\nx-long: " + b"a" * 30_000 + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")


async def test_a_head_sent_too_slowly_is_408_and_a_silent_connection_closes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_module, "HEAD_TIMEOUT", 0.2)
    async for port, calls in _serve():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n")  # and never the end of the head
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        assert await _read_all(silent_reader) == b""  # closed without a word
        silent.close()
        # a keep-alive connection whose next request is on time is served every time
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.wait_for(reader.readexactly(2), 30)
        # and a later head on it that stops halfway is timed from its own first byte
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n")
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer
        assert calls == [1, 1, 1]


# -- findings of the HTTP edge review -----------------------------------------------------------

def _admin(world: World) -> dict[str, str]:
    return {"authorization": f"Bearer {world.token}"}


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_an_over_long_id_in_the_path_is_its_404_and_audited(world) -> None:
    """A principal or policy id over 512 characters made the audit event invalid: 503
    audit_unavailable, and no trace of the attempt."""
    long_id = "a" * 1100
    for path, code in ((f"/v1/policies/{long_id}", b"policy_not_found"),
                       (f"/v1/principals/{long_id}", b"principal_not_found")):
        status, headers, body = await _call(world, "GET", path, _admin(world), _no_body)
        assert status == 404 and code in body, body
        event = world.audit.log.event_data(int(headers["x-audit-index"]))
        assert event is not None and b"chars)" in event and len(event) < 2000


async def test_an_encoded_slash_stays_inside_its_path_segment(world) -> None:
    """/v1/keys/enc%2Frotate used to rotate "enc" (routed on the decoded path): a proxy rule on
    .../rotate could be bypassed."""
    before = world.store.get_key(world.ids["enc"])
    # uvicorn puts the decoded path in "path", the path as sent in "raw_path"
    status, _, out = await _call(world, "POST", "/v1/keys/enc/rotate", _admin(world), _no_body,
                                 raw_path=b"/v1/keys/enc%2Frotate")
    assert status == 405 and b"method_not_allowed" in out  # GET-only describe of "enc/rotate"
    assert world.store.get_key(world.ids["enc"]) == before


async def test_a_signed_request_with_a_host_no_uri_can_be_built_on_is_audited(world) -> None:
    headers = {"signature-input": 'sig1=("@method");created=1;keyid="a/b"',
               "signature": "sig1=:AAAA:"}
    failures = sum(world.app.auth_failures.values())
    status, response_headers, _ = await _call(
        world, "POST", "/v1/random", headers, _no_body,
        headers=[(b"host", b"a/b")] + [(k.encode(), v.encode()) for k, v in headers.items()])
    assert status in (400, 401)
    assert sum(world.app.auth_failures.values()) == failures + 1
    assert "x-audit-index" in response_headers


async def test_policy_test_keeps_the_encryption_context_limits(world) -> None:
    import json

    body = json.dumps({"principal": "svc", "action": "encrypt", "key": "enc",
                       "context": {f"k{i}": "v" for i in range(65)}}).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    status, _, out = await _call(world, "POST", "/v1/policy-test",
                                 _admin(world) | {"content-length": str(len(body))}, receive)
    assert status == 400 and b"more than 64 entries" in out


async def test_a_client_certificate_is_not_accepted_on_a_request_made_by_a_web_page(
        world, monkeypatch) -> None:
    """A browser attaches the operator's client certificate to a cross-site form post: without
    this check any web page could rotate or schedule the deletion of keys as that operator."""
    from keygrants.auth.authenticator import AuthSettings
    from keygrants.models import AddCertificateRequest, CreatePrincipalRequest

    from .conftest import ADMIN

    monkeypatch.setattr(world.access.authenticator, "settings",
                        AuthSettings(methods=frozenset({"mtls", "admin_token"})))
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="operator"))
    world.access.service.add_certificate(ADMIN, "operator",
                                         AddCertificateRequest(match="subject:CN=operator"))
    pem = ssl.DER_cert_to_PEM_cert(_self_signed_der("operator"))

    async def call(method: str, path: str, extra: dict[str, str]) -> tuple[int, bytes]:
        status, _, out = await _call(world, method, path, extra, _no_body,
                                     extensions={"tls": {"client_cert_chain": [pem]}})
        return status, out

    assert (await call("GET", "/v1/whoami", {}))[0] == 200
    for browser in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"},
                    {"origin": "null"}):
        status, out = await call("POST", "/v1/keys/enc/rotate", browser)
        assert status == 401 and b"web page" in out, (browser, out)
    assert (await call("GET", "/v1/whoami", {"sec-fetch-site": "cross-site"}))[0] == 200


async def test_an_error_does_not_echo_a_huge_value_back(world) -> None:
    import json

    body = json.dumps({"name": "x", "spec": "b" * 100_000}).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    status, _, out = await _call(world, "POST", "/v1/keys",
                                 _admin(world) | {"content-length": str(len(body))}, receive)
    assert status == 400 and b"unknown key spec" in out and len(out) < 2500


async def test_a_body_still_arriving_after_an_early_answer_is_not_taken_for_a_head() -> None:
    """The server may answer (401, 413, ...) before a request's body is in; the rest of that
    body must not count against the next request's head limit."""
    async for port, calls in _serve():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = tls_module.MAX_HEAD_BYTES * 3
        writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % size)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # answered early
        assert head.startswith(b"HTTP/1.1 200 ")
        await asyncio.wait_for(reader.readexactly(2), 30)
        for _ in range(3):
            writer.write(b"x" * (size // 3))
            await writer.drain()
        writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert calls == [1, 1]
