"""The bare floor for the HTTP encrypt benchmark.

The least a Python HTTP service can do for "encrypt 1 KiB": one Starlette route that decodes
``{"plaintext": "<base64>"}`` with msgspec, seals it with AES-256-GCM under a fixed in-memory
key (random 12-byte nonce) and answers ``{"ciphertext": "<base64 of nonce || ct || tag>"}``.
No auth, no key lookup, no audit: whatever keygrants costs above this is its own overhead.

Run by ``benchmarks/http_encrypt.py`` as::

    python -m uvicorn floor_app:app --app-dir benchmarks --host 127.0.0.1 --port PORT \
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import os

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
