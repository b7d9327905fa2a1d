"""C2SP signed notes and tlog checkpoints: the Go reference vectors, layout pins, negatives.

Vectors from golang.org/x/mod/sumdb/note ``note_test.go`` (the reference implementation of
c2sp.org/signed-note): the PeterNeumann and EnochRoot vkeys, the PeterNeumann private key,
the signed note text and both signature lines, its key manglings and its malformed notes.
Ed25519 is deterministic, so signing the same text with the same key must reproduce the Go
note byte for byte. The checkpoint text is the example of c2sp.org/tlog-checkpoint.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keygrants.audit.merkle import EMPTY_ROOT
from keygrants.audit.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    InvalidNote,
    NoteSigner,
    NoteVerifier,
    format_vkey,
    open_note,
    parse_vkey,
    sign_note,
)
from keygrants.crypto import SigningKey, VerifyingKey

# --- golang.org/x/mod/sumdb/note note_test.go ------------------------------------------------

PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (b"If you think cryptography is the answer to your problem,\n"
        b"then you don't know what your problem is.\n")
PETER_SIG = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdng"
             "otpRZb6KE6RyyBwJnAM=\n").encode()
ENOCH_SIG = ("\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGw"
             "nWLox33WWd1RvMc+QQ=\n").encode()
PETER_NOTE = TEXT + b"\n" + PETER_SIG

# --- c2sp.org/tlog-checkpoint -----------------------------------------------------------------

SPEC_CHECKPOINT = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def _peter_signing_key() -> SigningKey:
    prefix, alg_seed = PETER_SKEY.split("+", 4)[:4], PETER_SKEY.split("+", 4)[4]
    assert prefix == ["PRIVATE", "KEY", "PeterNeumann", "c74f20a3"]
    raw = base64.b64decode(alg_seed)
    assert raw[0] == 0x01
    assert len(raw) == 33
    pkcs8 = ed25519.Ed25519PrivateKey.from_private_bytes(raw[1:]).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SigningKey.from_private_bytes("ed25519", pkcs8)


@pytest.fixture(scope="module")
def peter() -> NoteVerifier:
    return parse_vkey(PETER_VKEY)


@pytest.fixture(scope="module")
def enoch() -> NoteVerifier:
    return parse_vkey(ENOCH_VKEY)


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return NoteSigner("keygrants.example/audit", SigningKey.generate("ed25519"))


@pytest.fixture(scope="module")
def other_signer() -> NoteSigner:
    return NoteSigner("witness.example/w1", SigningKey.generate("ed25519"))


# --- the reference vectors --------------------------------------------------------------------


def test_reference_vkey(peter: NoteVerifier) -> None:
    assert peter.name == "PeterNeumann"
    assert peter.key_id == bytes.fromhex("c74f20a3")
    assert peter.vkey() == PETER_VKEY
    assert format_vkey(peter.name, peter.public_key) == PETER_VKEY
    raw = peter.public_key.public_raw()
    assert hashlib.sha256(b"PeterNeumann\n\x01" + raw).digest()[:4] == peter.key_id


def test_reference_signature_is_reproduced_byte_for_byte(peter: NoteVerifier) -> None:
    key = _peter_signing_key()
    assert key.public_key().public_raw() == peter.public_key.public_raw()
    note_signer = NoteSigner("PeterNeumann", key)
    assert note_signer.key_id == peter.key_id
    assert sign_note(TEXT, note_signer) == PETER_NOTE


def test_reference_note_opens(peter: NoteVerifier, enoch: NoteVerifier) -> None:
    assert open_note(PETER_NOTE, [peter]) == TEXT
    both = TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    assert open_note(both, [peter]) == TEXT  # Enoch's signature is unknown: ignored
    assert open_note(both, [enoch]) == TEXT
    assert open_note(both, [peter, enoch]) == TEXT
    assert open_note(both, (v for v in [enoch, peter])) == TEXT
    with pytest.raises(InvalidNote):
        open_note(both, [])
    with pytest.raises(InvalidNote):
        open_note(TEXT + b"\n" + ENOCH_SIG, [peter])
    # Repeated known and unknown signatures, including a corrupt unknown one, are fine.
    enoch_abcd = ENOCH_SIG[:60] + b"ABCD" + ENOCH_SIG[60:]
    many = TEXT + b"\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd
    assert open_note(many, [peter]) == TEXT


def test_reference_tampering(peter: NoteVerifier) -> None:
    with pytest.raises(InvalidNote):  # a signature from a known key that fails
        open_note(TEXT + b"\n" + PETER_SIG[:60] + b"ABCD" + PETER_SIG[60:], [peter])
    with pytest.raises(InvalidNote):
        open_note(PETER_NOTE.replace(b"cryptography", b"cryptographY"), [peter])


@pytest.mark.parametrize(
    "note",
    [
        TEXT,
        TEXT + b"\n",
        TEXT + b"\n" + PETER_SIG[:-1],
        b"\x01" + TEXT + b"\n" + PETER_SIG,
        b"\xff" + TEXT + b"\n" + PETER_SIG,
        TEXT + b"\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqf"
                      "qdngotpRZb6KE6RyyBwJnAM=".encode(),
        TEXT + b"\n" + PETER_SIG + b"Unexpected line.\n",
    ],
)
def test_reference_malformed_notes(note: bytes, peter: NoteVerifier) -> None:
    with pytest.raises(InvalidNote):
        open_note(note, [peter])


def test_reference_vkey_manglings() -> None:
    parse_vkey(PETER_VKEY)
    bad: list[str] = []
    for i in range(len(PETER_VKEY) + 1):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                bad.append(PETER_VKEY[i:j])
    for i in range(len(PETER_VKEY)):
        bad.append(PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1:])
    bad.append("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")  # long key
    bad.append("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")  # unknown alg
    for vkey in bad:
        with pytest.raises(ValueError):
            parse_vkey(vkey)


# --- our own round trips ----------------------------------------------------------------------


def test_round_trip(signer: NoteSigner) -> None:
    body = b"hello\n\nworld, with an empty line in the text\n"
    note = sign_note(body, signer)
    assert note.startswith(body + b"\n\xe2\x80\x94 keygrants.example/audit ")
    assert note.endswith(b"\n")
    blob = base64.b64decode(note[len(body) + 1:].decode().split(" ")[2])
    assert len(blob) == 4 + 64
    assert blob[:4] == signer.key_id
    assert signer.verifier().public_key.verify(body, blob[4:])
    assert open_note(note, [signer.verifier()]) == body


def test_several_signers(signer: NoteSigner, other_signer: NoteSigner) -> None:
    note = sign_note(b"two keys\n", signer, other_signer)
    assert note.count("\u2014 ".encode()) == 2
    for verifiers in ([signer.verifier()], [other_signer.verifier()],
                      [signer.verifier(), other_signer.verifier()]):
        assert open_note(note, verifiers) == b"two keys\n"
    with pytest.raises(ValueError):
        sign_note(b"no signer\n")


def test_signed_by_another_key(signer: NoteSigner, other_signer: NoteSigner) -> None:
    note = sign_note(b"body\n", other_signer)
    with pytest.raises(InvalidNote):
        open_note(note, [signer.verifier()])
    # Same name, another key: an unknown key ID, so the signature is ignored.
    impostor = NoteSigner(signer.name, SigningKey.generate("ed25519"))
    assert impostor.key_id != signer.key_id
    with pytest.raises(InvalidNote):
        open_note(sign_note(b"body\n", impostor), [signer.verifier()])
    # A known key's name with its key ID, but signed by another key: known, and it fails,
    # which rejects the note even next to a valid signature.
    impostor_blob = base64.b64decode(sign_note(b"body\n", impostor).decode().split(" ")[-1])
    forged_line = _line(signer.name, signer.key_id + impostor_blob[4:])
    good = sign_note(b"body\n", signer)
    assert open_note(good, [signer.verifier()]) == b"body\n"
    with pytest.raises(InvalidNote):
        open_note(good + forged_line, [signer.verifier()])


def test_every_byte_flip_and_truncation_is_rejected(signer: NoteSigner) -> None:
    body = Checkpoint("keygrants.example/audit", 12, EMPTY_ROOT, 1_700_000_000).body()
    note = sign_note(body, signer)
    verifiers = [signer.verifier()]
    for i in range(len(note)):
        for delta in (1, 0x20):
            tampered = note[:i] + bytes([note[i] ^ delta]) + note[i + 1:]
            with pytest.raises(InvalidNote):
                open_note(tampered, verifiers)
    for n in range(len(note)):
        with pytest.raises(InvalidNote):
            open_note(note[:n], verifiers)
    for suffix in (b"\n", b"x", b"\n\n", b"\xe2\x80\x94 \n"):
        with pytest.raises(InvalidNote):
            open_note(note + suffix, verifiers)


def _line(name: str, blob: bytes) -> bytes:
    return f"\u2014 {name} {base64.b64encode(blob).decode()}\n".encode()


def test_malformed_signature_lines(signer: NoteSigner) -> None:
    body = b"body\n"
    good_line = sign_note(body, signer)[len(body) + 1:]
    name, b64 = good_line.decode()[2:-1].split(" ")
    blob = base64.b64decode(b64)
    bad_lines = [
        good_line.replace("\u2014".encode(), b"-"),
        good_line.replace("\u2014".encode(), "\u2013".encode()),  # en dash
        good_line.replace(b" ", b"", 1),
        good_line.replace(b" ", b"  ", 1),
        good_line.replace(b" ", b"\t", 1),
        good_line.replace(f" {b64}".encode(), f"  {b64}".encode()),
        good_line.replace(f" {b64}".encode(), b""),
        good_line[:-1] + b" \n",
        good_line[:-1] + b"\r\n",
        b" " + good_line,
        _line("", blob),
        _line("a+b", blob),
        _line("a\u00a0b", blob),
        _line(name, blob[:4]),  # a key ID and no signature
        _line(name, b""),
        good_line.replace(b"=", b""),  # unpadded
        good_line[:-2] + b"==\n",  # wrong padding
        good_line.replace(b"=\n", b"=A\n"),
        good_line.replace(b"=", b"*"),
        _line(name, blob).replace(b"=", b"").replace(b"\n", b"-_\n"),  # base64url characters
    ]
    # Non-canonical base64: same bytes with the unused trailing bits set (68 bytes leaves 4).
    last = b64[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    noncanonical = b64[:-2] + alphabet[alphabet.index(last) | 0b1111] + "="
    if noncanonical != b64:
        bad_lines.append(f"\u2014 {name} {noncanonical}\n".encode())
    assert open_note(body + b"\n" + good_line, [signer.verifier()]) == body
    for line in bad_lines:
        for note in (body + b"\n" + line, body + b"\n" + good_line + line, body + b"\n" + line + good_line):
            with pytest.raises(InvalidNote):
                open_note(note, [signer.verifier()])


def test_text_rules(signer: NoteSigner) -> None:
    verifiers = [signer.verifier()]
    for text in (b"no final newline", b"", b"bad \xff utf-8\n", b"a\rb\n", b"tab\there\n",
                 b"nul\x00\n", b"esc\x1b\n", b"\xed\xa0\x80 surrogate\n"):
        with pytest.raises(ValueError):
            sign_note(text, signer)
        line = sign_note(b"ok\n", signer)[len(b"ok\n"):]
        with pytest.raises(InvalidNote):
            open_note(text + line, verifiers)
    # Any UTF-8 text is fine, as is a text that is only a newline.
    for text in ("Grüße — ✓\n".encode(), b"\n", b"a\n\n\nb\n"):
        assert open_note(sign_note(text, signer), verifiers) == text
    with pytest.raises(InvalidNote):
        open_note(sign_note(b"x\n", signer).decode(), verifiers)  # type: ignore[arg-type]


def test_size_limit(signer: NoteSigner) -> None:
    verifiers = [signer.verifier()]
    line_len = len(sign_note(b"\n", signer)) - 2
    fits = b"a" * (MAX_NOTE_SIZE - line_len - 2) + b"\n"
    note = sign_note(fits, signer)
    assert len(note) == MAX_NOTE_SIZE
    assert open_note(note, verifiers) == fits
    with pytest.raises(ValueError):
        sign_note(b"a" + fits, signer)
    # A valid note made too large by repeating its own signature line.
    small = sign_note(b"small\n", signer)
    line = small[len(b"small\n\n"):]
    padded = small + line * ((MAX_NOTE_SIZE - len(small)) // len(line))
    assert len(padded) <= MAX_NOTE_SIZE
    assert open_note(padded, verifiers) == b"small\n"
    with pytest.raises(InvalidNote):
        open_note(padded + line, verifiers)


def test_invalid_note_is_opaque(signer: NoteSigner, other_signer: NoteSigner) -> None:
    messages = set()
    cases = [b"", b"x" * (MAX_NOTE_SIZE + 1), b"\xff\n\n", b"text\n", sign_note(b"t\n", other_signer)]
    for note in cases:
        with pytest.raises(InvalidNote) as info:
            open_note(note, [signer.verifier()])
        messages.add(str(info.value))
    assert messages == {"invalid note"}
    assert issubclass(InvalidNote, ValueError)


def test_ambiguous_verifiers_are_misuse(signer: NoteSigner) -> None:
    note = sign_note(b"x\n", signer)
    verifier = signer.verifier()
    assert open_note(note, [verifier, signer.verifier()]) == b"x\n"  # the same key twice is fine

    class Colliding(NoteVerifier):
        pass

    clash = Colliding(signer.name, SigningKey.generate("ed25519").public_key())
    clash.key_id = verifier.key_id
    with pytest.raises(ValueError) as info:
        open_note(note, [verifier, clash])
    assert not isinstance(info.value, InvalidNote)


def test_signer_and_verifier_reject_bad_configuration() -> None:
    ed = SigningKey.generate("ed25519")
    ecdsa = SigningKey.generate("ecdsa-p256-sha256")
    for name in ("", "a b", "a+b", "tab\tname", "nl\nname", "nbsp\u00a0name", 7):
        with pytest.raises(ValueError):
            NoteSigner(name, ed)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            NoteVerifier(name, ed.public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NoteSigner("ok", ecdsa)
    with pytest.raises(ValueError):
        NoteVerifier("ok", ecdsa.public_key())
    with pytest.raises(ValueError):
        format_vkey("ok", ecdsa.public_key())


def test_vkey_round_trip_and_tampering() -> None:
    # Collect keys until one's base64 contains "+", which must not confuse the parser.
    keys = [SigningKey.generate("ed25519") for _ in range(8)]
    while not any("+" in format_vkey("log.example/x", k.public_key()).split("+", 2)[2] for k in keys):
        keys.append(SigningKey.generate("ed25519"))
    for key in keys:
        vkey = format_vkey("log.example/x", key.public_key())
        name, key_id, key_b64 = vkey.split("+", 2)
        verifier = parse_vkey(vkey)
        assert verifier.name == name == "log.example/x"
        assert verifier.key_id.hex() == key_id
        assert verifier.public_key.public_raw() == key.public_key().public_raw()
        assert verifier.vkey() == vkey
        assert NoteSigner("log.example/x", key).key_id == verifier.key_id
        raw = base64.b64decode(key_b64)
        other_raw = SigningKey.generate("ed25519").public_key().public_raw()
        swapped = base64.b64encode(b"\x01" + other_raw).decode()
        other_alg = base64.b64encode(b"\x02" + raw[1:]).decode()
        no_alg = base64.b64encode(raw[1:]).decode()
        for bad in (
            f"log.example/y+{key_id}+{key_b64}",  # renamed
            f"{name}+{key_id.upper() if key_id.upper() != key_id else 'g' + key_id[1:]}+{key_b64}",
            f"{name}+{key_id[:7]}+{key_b64}",
            f"{name}+0x{key_id[:6]}+{key_b64}",
            f"{name}+{key_id}+{swapped}",  # another key under the same key ID
            f"{name}+{key_id}+{other_alg}",  # another algorithm
            f"{name}+{key_id}+{no_alg}",  # no algorithm byte
            f"{name}+{key_id}+{key_b64[:-1]}",
            f"{name}+{key_id}+{key_b64}=",
            f"{name}+{key_id}+{key_b64} ",
            f"{name}+{key_id}",
            f"+{key_id}+{key_b64}",
        ):
            with pytest.raises(ValueError):
                parse_vkey(bad)
    with pytest.raises(ValueError):
        parse_vkey(b"bytes+00000000+AA==")  # type: ignore[arg-type]


def test_raw_public_key_wrappers() -> None:
    key = SigningKey.generate("ed25519").public_key()
    raw = key.public_raw()
    assert len(raw) == 32
    assert VerifyingKey.from_raw("ed25519", raw).public_der() == key.public_der()
    for bad in (raw[:31], raw + b"\x00", bytearray(raw)):
        with pytest.raises(ValueError):
            VerifyingKey.from_raw("ed25519", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VerifyingKey.from_raw("ecdsa-p256-sha256", raw)
    with pytest.raises(ValueError):
        SigningKey.generate("ecdsa-p256-sha256").public_key().public_raw()


# --- checkpoints ------------------------------------------------------------------------------

ROOT = hashlib.sha256(b"some root").digest()


def test_checkpoint_layout_is_pinned() -> None:
    cp = Checkpoint("keygrants.example/audit", 5, ROOT, time=1_700_000_000)
    root_b64 = base64.b64encode(ROOT)
    assert cp.body() == b"keygrants.example/audit\n5\n" + root_b64 + b"\ntime 1700000000\n"
    assert Checkpoint("o", 0, EMPTY_ROOT).body() == (
        b"o\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    )
    assert Checkpoint.parse(cp.body()) == cp
    assert Checkpoint.parse(Checkpoint("o", 0, EMPTY_ROOT).body()) == Checkpoint("o", 0, EMPTY_ROOT)


def test_checkpoint_spec_example() -> None:
    cp = Checkpoint.parse(SPEC_CHECKPOINT)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.time is None
    assert cp.body() == SPEC_CHECKPOINT


def test_checkpoint_signed_round_trip(signer: NoteSigner) -> None:
    cp = Checkpoint(signer.name, 2**64 - 1, ROOT, time=0)
    note = sign_note(cp.body(), signer)
    assert Checkpoint.parse(open_note(note, [signer.verifier()])) == cp


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"o\n5\n",
        b"o\n5\n{root}",  # no final newline
        b"o\n5\n{root}\n\n",  # blank line at the end
        b"o\n\n5\n{root}\n",  # blank line in the middle
        b"\no\n5\n{root}\n",
        b"o\n5\n{root}\ntime 1\n\n",
        b"o\n5\n{root}\ntime 1\ntime 2\n",
        b"o\n5\n{root}\nother extension\n",
        b"o\n5\n{root}\ntime\n",
        b"o\n5\n{root}\ntime \n",
        b"o\n5\n{root}\ntime  1\n",
        b"o\n5\n{root}\nTime 1\n",
        b"o\n5\n{root}\ntime -1\n",
        b"o\n5\n{root}\ntime 01\n",
        b"o\n5\n{root}\ntime 1.5\n",
        b"o\n5\n{root}\ntime 18446744073709551616\n",
        b"o\n-5\n{root}\n",
        b"o\n+5\n{root}\n",
        b"o\n05\n{root}\n",
        b"o\n 5\n{root}\n",
        b"o\n5 \n{root}\n",
        b"o\n5_0\n{root}\n",
        b"o\n0x5\n{root}\n",
        "o\n\uff15\n{root}\n".encode(),  # a full-width digit
        b"o\n18446744073709551616\n{root}\n",
        b"o\n5\n{short}\n",
        b"o\n5\n{long}\n",
        b"o\n5\n{unpadded}\n",
        b"o\n5\n{urlsafe}\n",
        b"o\n5\n{root} \n",
        b"o\n5\nnot base64!\n",
        b"o\r\n5\r\n{root}\r\n",
        b"o p\n5\n{root}\n",
        b"o+p\n5\n{root}\n",
        b"\xff\n5\n{root}\n",
        b"o\n5\n{root}\n\x00\n",
    ],
)
def test_checkpoint_parse_is_strict(body: bytes) -> None:
    root = base64.b64encode(ROOT)
    tricky = b"+/+/" * 10 + b"+/4="  # 32 bytes with both "+" and "/"
    body = (body.replace(b"{root}", root)
            .replace(b"{short}", base64.b64encode(ROOT[:31]))
            .replace(b"{long}", base64.b64encode(ROOT + b"\x00"))
            .replace(b"{unpadded}", root.rstrip(b"="))
            .replace(b"{urlsafe}", tricky.replace(b"+", b"-").replace(b"/", b"_")))
    with pytest.raises(InvalidNote):
        Checkpoint.parse(body)


def test_checkpoint_constructor_validates() -> None:
    Checkpoint("o", 0, ROOT)
    for args in (("", 1, ROOT), ("a b", 1, ROOT), ("a+b", 1, ROOT), ("a\nb", 1, ROOT),
                 ("o", -1, ROOT), ("o", 2**64, ROOT), ("o", True, ROOT), ("o", 1.0, ROOT),
                 ("o", 1, ROOT[:31]), ("o", 1, ROOT.hex()), ("o", 1, bytearray(ROOT))):
        with pytest.raises(ValueError):
            Checkpoint(*args)  # type: ignore[arg-type]
    for time in (-1, 2**64, True, 1.5, "1"):
        with pytest.raises(ValueError):
            Checkpoint("o", 1, ROOT, time)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        Checkpoint("o", 1, ROOT).size = 2  # type: ignore[misc]
