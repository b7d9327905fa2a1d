"""Encryption context: a small string-to-string map bound to ciphertext as AAD.

The context is canonicalized with RFC 8785 (JSON Canonicalization Scheme), so two callers who
build the same map in a different order get the same bytes. The empty map is the empty string,
so ciphertext made without a context has AAD = header only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import rfc8785

from keygrants.errors import InvalidRequest

__all__ = [
    "MAX_CONTEXT_BYTES",
    "MAX_CONTEXT_ENTRIES",
    "MAX_CONTEXT_KEY_LENGTH",
    "MAX_CONTEXT_VALUE_LENGTH",
    "canonical_context",
]

MAX_CONTEXT_ENTRIES: Final = 64
MAX_CONTEXT_KEY_LENGTH: Final = 256
MAX_CONTEXT_VALUE_LENGTH: Final = 1024
MAX_CONTEXT_BYTES: Final = 8192


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """Return the canonical bytes of an encryption context.

    Raises:
        InvalidRequest: when the context is not a string-to-string map within the limits.
    """
    if not context:
        return b""
    if not isinstance(context, Mapping):
        raise InvalidRequest("context must be an object of string keys and string values")
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidRequest(f"context has more than {MAX_CONTEXT_ENTRIES} entries")
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidRequest("context keys and values must be strings")
        if not k or len(k) > MAX_CONTEXT_KEY_LENGTH:
            raise InvalidRequest(f"context keys must be 1..{MAX_CONTEXT_KEY_LENGTH} characters")
        if len(v) > MAX_CONTEXT_VALUE_LENGTH:
            raise InvalidRequest(
                f"context values must be at most {MAX_CONTEXT_VALUE_LENGTH} characters"
            )
    try:
        data = rfc8785.dumps(dict(context))
    except (rfc8785.CanonicalizationError, ValueError) as exc:
        raise InvalidRequest("context cannot be canonicalized") from exc
    if len(data) > MAX_CONTEXT_BYTES:
        raise InvalidRequest(f"context is larger than {MAX_CONTEXT_BYTES} bytes")
    return data
