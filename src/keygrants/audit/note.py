"""C2SP signed notes (c2sp.org/signed-note) and tlog checkpoints (c2sp.org/tlog-checkpoint).

A signed note is UTF-8 text ending in a newline, a blank line, then one or more signature
lines; only Ed25519 (signature type 0x01) is supported here::

    <text, ending in "\\n">
    "\\n"
    "— " <key name> " " base64(key ID (4) || Ed25519 signature (64)) "\\n"   (one per signer)

    key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4]

A verifier key ("vkey") is the text ``<name>+<hex(key ID)>+<base64(0x01 || public key)>``.

:func:`open_note` follows the spec: signatures from keys it does not know (another name or
key ID, e.g. a witness cosignature) are ignored; a signature from a known key that fails
makes the whole note invalid; a note with no valid signature from a known key is invalid.
Every failure raises the same opaque :class:`InvalidNote`.

Base64 is the standard alphabet with padding (RFC 4648 §4); only the canonical encoding is
accepted.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from keygrants.audit.merkle import HASH_SIZE, MAX_TREE_SIZE
from keygrants.crypto import SigningKey, VerifyingKey

__all__ = [
    "MAX_NOTE_SIZE",
    "Checkpoint",
    "InvalidNote",
    "NoteSigner",
    "NoteVerifier",
    "format_vkey",
    "open_note",
    "parse_vkey",
    "sign_note",
]

#: Largest note :func:`open_note` reads (and :func:`sign_note` writes), signatures included.
MAX_NOTE_SIZE: Final = 16 * 1024

_ALG_ED25519: Final = b"\x01"
_KEY_ID_SIZE: Final = 4
_ED25519_SIG_SIZE: Final = 64
_ED25519_KEY_SIZE: Final = 32
_SIG_PREFIX: Final = "\u2014 "  # em dash, space
_TIME_EXTENSION: Final = "time "
_MAX_UINT64: Final = MAX_TREE_SIZE

# Every ASCII control character except newline; the spec forbids them anywhere in a note.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")


class InvalidNote(ValueError):
    """Raised for every note or checkpoint that fails to open or parse, whatever the cause."""

    def __init__(self) -> None:
        super().__init__("invalid note")


def _is_key_name(name: object) -> bool:
    # signed-note: non-empty, no Unicode spaces, no "+"; control characters are banned
    # from the whole note anyway.
    return (isinstance(name, str) and name != "" and "+" not in name
            and not any(ch.isspace() for ch in name) and _CONTROL.search(name) is None)


def _b64decode(text: str) -> bytes | None:
    """Strict standard base64: canonical padding and trailing bits, or None."""
    if _BASE64.fullmatch(text) is None:
        return None
    data = base64.b64decode(text, validate=True)
    return data if base64.b64encode(data).decode("ascii") == text else None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_UINT64


def _parse_decimal(text: str, limit: int) -> int | None:
    if _DECIMAL.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= limit else None


def _key_id(name: str, public_raw: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ALG_ED25519 + public_raw).digest()[:_KEY_ID_SIZE]


def _check_text(text: bytes) -> str:
    """Decode note text or a note body; raise ValueError unless it is well-formed."""
    decoded = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if not decoded.endswith("\n") or _CONTROL.search(decoded) is not None:
        raise ValueError("note text must be UTF-8 without control characters and end in a newline")
    return decoded


class NoteVerifier:
    """An Ed25519 public key under a note key name, which checks note signatures.

    Raises:
        ValueError: (constructor) for an invalid key name or a key that is not Ed25519.
    """

    __slots__ = ("key_id", "name", "public_key")

    def __init__(self, name: str, public_key: VerifyingKey) -> None:
        if not _is_key_name(name):
            raise ValueError("a key name is non-empty, without spaces or '+'")
        if public_key.algorithm != "ed25519":
            raise ValueError("signed notes use Ed25519 keys")
        self.name = name
        self.public_key = public_key
        self.key_id = _key_id(name, public_key.public_raw())

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (without key ID) is this key's signature of ``text``."""
        return len(signature) == _ED25519_SIG_SIZE and self.public_key.verify(text, signature)

    def vkey(self) -> str:
        """This verifier as vkey text (see :func:`format_vkey`)."""
        return format_vkey(self.name, self.public_key)

    def __repr__(self) -> str:
        return f"NoteVerifier({self.name!r}, key_id={self.key_id.hex()})"


class NoteSigner:
    """An Ed25519 private key under a note key name, which signs notes.

    Raises:
        ValueError: (constructor) for an invalid key name or a key that is not Ed25519.
    """

    __slots__ = ("_key", "key_id", "name")

    def __init__(self, name: str, key: SigningKey) -> None:
        if not _is_key_name(name):
            raise ValueError("a key name is non-empty, without spaces or '+'")
        if key.algorithm != "ed25519":
            raise ValueError("signed notes use Ed25519 keys")
        self.name = name
        self._key = key
        self.key_id = _key_id(name, key.public_key().public_raw())

    def verifier(self) -> NoteVerifier:
        """The matching verifier."""
        return NoteVerifier(self.name, self._key.public_key())

    def _signature_line(self, text: bytes) -> str:
        blob = _b64encode(self.key_id + self._key.sign(text))
        return f"{_SIG_PREFIX}{self.name} {blob}\n"

    def __repr__(self) -> str:
        return f"NoteSigner({self.name!r}, key_id={self.key_id.hex()})"


def format_vkey(name: str, public_key: VerifyingKey) -> str:
    """The vkey text ``name+hex(key ID)+base64(0x01 || public key)`` for an Ed25519 key.

    Raises:
        ValueError: for an invalid key name or a key that is not Ed25519.
    """
    verifier = NoteVerifier(name, public_key)
    return f"{name}+{verifier.key_id.hex()}+{_b64encode(_ALG_ED25519 + public_key.public_raw())}"


def parse_vkey(vkey: str) -> NoteVerifier:
    """Load a verifier from vkey text, checking that its key ID matches the name and key.

    Raises:
        ValueError: if the text is malformed, the algorithm is not Ed25519 (0x01), the key is
            not 32 bytes, or the key ID does not match.
    """
    # At most two splits: the base64 key may itself contain "+".
    parts = vkey.split("+", 2) if isinstance(vkey, str) else []
    if len(parts) != 3 or _KEY_ID_HEX.fullmatch(parts[1]) is None:
        raise ValueError("a vkey is name+<8 lowercase hex digits>+<base64 key>")
    name, key_id_hex, key_b64 = parts
    key = _b64decode(key_b64)
    if key is None or len(key) != 1 + _ED25519_KEY_SIZE or key[:1] != _ALG_ED25519:
        raise ValueError("a vkey holds 0x01 and a 32-byte Ed25519 public key")
    if not _is_key_name(name):
        raise ValueError("a key name is non-empty, without spaces or '+'")
    if _key_id(name, key[1:]).hex() != key_id_hex:
        raise ValueError("the vkey's key ID does not match its name and key")
    return NoteVerifier(name, VerifyingKey.from_raw("ed25519", key[1:]))


def sign_note(text: bytes, *signers: NoteSigner) -> bytes:
    """Sign ``text`` with each signer: ``text || "\\n" || one signature line per signer``.

    Raises:
        ValueError: with no signer, if ``text`` is not UTF-8 ending in a newline, contains
            control characters other than newline, or the note would exceed MAX_NOTE_SIZE.
    """
    if not signers:
        raise ValueError("a note needs at least one signer")
    _check_text(text)
    lines = "".join(signer._signature_line(text) for signer in signers)
    note = text + b"\n" + lines.encode()
    if len(note) > MAX_NOTE_SIZE:
        raise ValueError(f"a signed note is at most {MAX_NOTE_SIZE} bytes")
    return note


def open_note(note: bytes, verifiers: Iterable[NoteVerifier]) -> bytes:
    """Verify a signed note and return its text (the signed body, final newline included).

    Args:
        note: the signed note, untrusted.
        verifiers: the trusted keys; signatures by any other key are ignored.

    Raises:
        InvalidNote: if the note is malformed, larger than MAX_NOTE_SIZE, has a signature
            from a trusted key that does not verify, or has no valid trusted signature.
        ValueError: if two different verifiers share a key name and key ID.
    """
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        slot = (verifier.name, verifier.key_id)
        other = known.setdefault(slot, verifier)
        if other.public_key.public_raw() != verifier.public_key.public_raw():
            raise ValueError(f"ambiguous verifiers for key {verifier.name}+{verifier.key_id.hex()}")
    if not isinstance(note, bytes) or len(note) > MAX_NOTE_SIZE:
        raise InvalidNote
    try:
        _check_text(note)
    except ValueError as exc:
        raise InvalidNote from exc
    # The separator is the last blank line: signature lines never contain one.
    split = note.rfind(b"\n\n")
    if split < 0:
        raise InvalidNote
    text = note[: split + 1]
    verified = False
    for line in note[split + 2 : -1].decode().split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise InvalidNote
        name, _, blob_b64 = line[len(_SIG_PREFIX):].partition(" ")
        blob = _b64decode(blob_b64)
        if not _is_key_name(name) or blob is None or len(blob) <= _KEY_ID_SIZE:
            raise InvalidNote
        match = known.get((name, blob[:_KEY_ID_SIZE]))
        if match is None:
            continue
        if not match.verify(text, blob[_KEY_ID_SIZE:]):
            raise InvalidNote
        verified = True
    if not verified:
        raise InvalidNote
    return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A transparency log checkpoint: the note text that a log signs for its tree head.

    Layout (c2sp.org/tlog-checkpoint), one ``\\n``-terminated line each::

        <origin>                 the log's identity, also its note key name
        <size>                   decimal tree size, no leading zeros
        <base64(root)>           the 32-byte RFC 6962 root hash for that size
        time <unix seconds>      optional extension line: when the log signed this head

    The ``time`` extension is keygrants' own and the only extension accepted: a checkpoint
    with another extension line is rejected rather than parsed without it, since the
    signature covers lines this class could not represent. The origin follows the signed
    note key-name rules (no spaces, no ``+``) so it can double as the log's key name.

    Raises:
        ValueError: (constructor) for an invalid origin, size, root or time.
    """

    origin: str
    size: int
    root: bytes
    time: int | None = None

    def __post_init__(self) -> None:
        if not _is_key_name(self.origin):
            raise ValueError("an origin is non-empty, without spaces, '+' or control characters")
        if not _is_uint64(self.size):
            raise ValueError("a tree size is an integer in [0, 2**64 - 1]")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise ValueError("a root hash is 32 bytes")
        if self.time is not None and not _is_uint64(self.time):
            raise ValueError("a checkpoint time is an integer in [0, 2**64 - 1]")

    def body(self) -> bytes:
        """The note text to sign."""
        lines = [self.origin, str(self.size), _b64encode(self.root)]
        if self.time is not None:
            lines.append(f"{_TIME_EXTENSION}{self.time}")
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        """Parse checkpoint text, as :func:`open_note` returns it.

        Raises:
            InvalidNote: for anything but exactly the layout above.
        """
        try:
            if not isinstance(body, bytes) or len(body) > MAX_NOTE_SIZE:
                raise ValueError("not a checkpoint")
            lines = _check_text(body)[:-1].split("\n")
            if len(lines) not in (3, 4):
                raise ValueError("a checkpoint has three lines and an optional time line")
            origin, size_text, root_text = lines[:3]
            size = _parse_decimal(size_text, _MAX_UINT64)
            root = _b64decode(root_text)
            time = None
            if len(lines) == 4:
                if not lines[3].startswith(_TIME_EXTENSION):
                    raise ValueError("unknown checkpoint extension")
                time = _parse_decimal(lines[3][len(_TIME_EXTENSION):], _MAX_UINT64)
                if time is None:
                    raise ValueError("bad checkpoint time")
            if size is None or root is None:
                raise ValueError("bad checkpoint size or root")
            return cls(origin, size, root, time)
        except ValueError as exc:
            raise InvalidNote from exc
