"""The bare floor for the HTTP encrypt benchmark.

The least a Python HTTP service can do for "encrypt 1 KiB": one Starlette route that decodes
``{"plaintext": "<base64>"}`` with msgspec, seals it with AES-256-GCM under a fixed in-memory
key (random 12-byte nonce) and answers ``{"ciphertext": "<base64 of nonce || ct || tag>"}``.
No auth, no key lookup, no audit: whatever keygrants costs above this is its own overhead.

``raw_app`` is the same endpoint as a bare ASGI callable (no Starlette routing, Request or
Response objects): the floor for a service that, like keygrants, speaks ASGI directly. It is
the optional ``floor-asgi`` target of ``http_encrypt.py``.

Run by ``benchmarks/http_encrypt.py`` as::

    python -m uvicorn floor_app:app --app-dir benchmarks --host 127.0.0.1 --port PORT \
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_AEAD = AESGCM(os.urandom(32))


class EncryptRequest(msgspec.Struct, forbid_unknown_fields=True):
    plaintext: bytes  # msgspec decodes standard base64 into bytes


class EncryptResponse(msgspec.Struct):
    ciphertext: bytes  # msgspec encodes bytes as standard base64


_decode = msgspec.json.Decoder(EncryptRequest).decode
_encode = msgspec.json.Encoder().encode


async def encrypt(request: Request) -> Response:
    try:
        req = _decode(await request.body())
    except msgspec.DecodeError:  # ValidationError is a subclass
        return Response(b'{"error":"bad request"}', status_code=400,
                        media_type="application/json")
    nonce = os.urandom(12)
    ct = _AEAD.encrypt(nonce, req.plaintext, None)
    return Response(_encode(EncryptResponse(nonce + ct)), media_type="application/json")


async def readyz(request: Request) -> Response:
    return Response(b"ok", media_type="text/plain")


app = Starlette(routes=[
    Route("/encrypt", encrypt, methods=["POST"]),
    Route("/readyz", readyz, methods=["GET"]),
])


# -- the same endpoint as a bare ASGI app -------------------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/encrypt" and method == "POST":
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            req = _decode(b"".join(chunks))
        except msgspec.DecodeError:
            await _respond(send, 400, b'{"error":"bad request"}', _JSON_HEADERS)
            return
        nonce = os.urandom(12)
        ct = _AEAD.encrypt(nonce, req.plaintext, None)
        await _respond(send, 200, _encode(EncryptResponse(nonce + ct)), _JSON_HEADERS)
    elif path == "/readyz" and method == "GET":
        await _respond(send, 200, b"ok", [(b"content-type", b"text/plain")])
    else:
        await _respond(send, 404, b'{"error":"not found"}', _JSON_HEADERS)
