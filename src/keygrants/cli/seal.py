"""``keygrants seal`` / ``unseal`` / ``seal-keygen``: sealed secrets, offline (no server).

A secret sealed to a service's X25519 public key can be kept anywhere (a repository, a config
map) and opened only with the service's private key; see :mod:`keygrants.sealed`.

Key files are PEM, the same as OpenSSL writes (``openssl genpkey -algorithm x25519`` /
``ed25519``, ``openssl pkey -pubout``): private keys PKCS#8, unencrypted, mode 0600 (a private
key file readable by group or others is refused); public keys SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from keygrants.cli._common import (
    State,
    b64,
    check_private_file,
    context_option,
    emit,
    fail,
    in_option,
    parse_context,
    read_file,
    read_input,
    unb64,
)
from keygrants.crypto import SigningKey, VerifyingKey
from keygrants.errors import InvalidCiphertext, InvalidRequest, KeygrantsError

if TYPE_CHECKING:
    from keygrants.crypto.hpke import HpkePrivateKey, HpkePublicKey

# keygrants.sealed needs pyca/cryptography's HPKE module (cryptography >= 47); it is imported
# inside the commands so that the rest of the CLI starts whatever the installed version.

__all__ = ["register", "seal_command", "seal_keygen_command", "unseal_command"]

F = TypeVar("F", bound=Callable[..., Any])
MAX_KEY_FILE: Final = 64 * 1024
_PEM_PRIVATE: Final = "PRIVATE KEY"


def _local(fn: F) -> F:
    """Add --json and turn errors into one line (or the JSON error shape) and exit status 1."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @functools.wraps(fn)
    def wrapper(as_json: bool, **kwargs: Any) -> Any:
        state = State(None, None, None, as_json)
        try:
            return fn(state, **kwargs)
        except KeygrantsError as exc:
            fail(as_json, exc)
        except ValueError as exc:
            fail(as_json, InvalidRequest(str(exc)))
        return None

    return wrapper  # type: ignore[return-value]


def _read_key_file(path: str, *, private_for: str | None = None) -> bytes:
    """The bytes of a key file; ``private_for``: the option given a private key (a public
    key, or a file readable by group or others, is refused)."""
    data = read_file(path, MAX_KEY_FILE)
    if private_for is not None:
        check_private_file(path, f"key file {path} ({private_for})")
    return data


def _pem_armor(der: bytes, label: str) -> bytes:
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


def _pem_body(pem: bytes, label: str) -> bytes:
    text = pem.decode("ascii", errors="replace")
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    start = text.find(begin)
    stop = text.find(end, start + 1)
    if start < 0 or stop < 0:
        raise ValueError(f"no PEM {label} block")
    return unb64(text[start + len(begin):stop], "the PEM body")


def _load_recipient(path: str) -> HpkePublicKey:
    from keygrants.crypto.hpke import HpkePublicKey

    try:
        return HpkePublicKey.from_pem(_read_key_file(path))
    except ValueError:
        raise InvalidRequest(f"--to {path}: not an X25519 public key (PEM)") from None


def _load_recipient_private(path: str) -> HpkePrivateKey:
    from keygrants.crypto.hpke import HpkePrivateKey

    try:
        return HpkePrivateKey.from_pem(_read_key_file(path, private_for="--key"))
    except ValueError:
        raise InvalidRequest(f"--key {path}: not an unencrypted X25519 private key (PEM)") from None


def _load_signer(path: str) -> SigningKey:
    pem = _read_key_file(path, private_for="--sign-with")  # its errors name the file and the fix
    try:
        der = _pem_body(pem, _PEM_PRIVATE)
        return SigningKey.from_private_bytes("ed25519", der)
    except (ValueError, InvalidRequest):
        raise InvalidRequest(f"--sign-with {path}: not an unencrypted Ed25519 private key (PEM)"
                             ) from None


def _load_sender(path: str) -> VerifyingKey:
    try:
        return VerifyingKey.from_pem("ed25519", _read_key_file(path))
    except ValueError:
        raise InvalidRequest(f"--from {path}: not an Ed25519 public key (PEM)") from None


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    if force:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InvalidRequest(f"{path} exists; refusing to overwrite a key (use --force)") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@click.command("seal-keygen")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--type", "key_type", default="x25519", show_default=True,
              type=click.Choice(["x25519", "ed25519"]),
              help="x25519: a recipient key pair; ed25519: a sender (signing) key pair.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@_local
def seal_keygen_command(state: State, out: str, key_type: str, force: bool) -> None:
    """Make a key pair: OUT (private, PEM, 0600) and OUT.pub (public, PEM)."""
    from keygrants.crypto.hpke import HpkePrivateKey
    from keygrants.sealed import ed25519_public_raw

    priv_path, pub_path = Path(out), Path(out + ".pub")
    if key_type == "x25519":
        key = HpkePrivateKey.generate()
        private_pem, public_pem = key.private_pem(), key.public_key().pem()
        raw = key.public_key().raw()
    else:
        signer = SigningKey.generate("ed25519")
        private_pem = _pem_armor(signer.private_bytes(), _PEM_PRIVATE)
        public_pem = signer.public_key().public_pem()
        raw = ed25519_public_raw(signer.public_key())
    if not force and pub_path.exists():
        raise InvalidRequest(f"{pub_path} exists; refusing to overwrite a key (use --force)")
    _write_new(priv_path, private_pem, 0o600, force)
    _write_new(pub_path, public_pem.encode("ascii"), 0o644, force)
    emit(state, {"type": key_type, "private_key_file": str(priv_path),
                 "public_key_file": str(pub_path), "public_key": b64(raw)},
         f"wrote {priv_path} (private, 0600) and {pub_path} ({key_type})")


@click.command("seal")
@click.option("--to", "to_file", required=True, metavar="PUBKEY_FILE",
              help="The recipient's X25519 public key (PEM).")
@click.option("--sign-with", "sign_with", default=None, metavar="KEY_FILE",
              help="Sign as the sender with this Ed25519 private key (PEM, 0600).")
@context_option
@in_option
@_local
def seal_command(state: State, to_file: str, sign_with: str | None, context: tuple[str, ...],
                 in_file: str | None) -> None:
    """Seal a secret (stdin or --in) to a recipient; prints the sealed secret in base64."""
    from keygrants.sealed import seal, sealed_sender

    recipient = _load_recipient(to_file)
    signer = _load_signer(sign_with) if sign_with else None
    ctx = parse_context(context)
    sealed = seal(read_input(in_file), recipient, sender_key=signer, context=ctx)
    sender = sealed_sender(sealed)
    emit(state, {"sealed": b64(sealed), "recipient": b64(recipient.raw()),
                 "sender": None if sender is None else b64(sender)}, b64(sealed))


@click.command("unseal")
@click.option("--key", "key_file", required=True, metavar="PRIVKEY_FILE",
              help="The recipient's X25519 private key (PEM, 0600).")
@click.option("--from", "from_file", default=None, metavar="PUBKEY_FILE",
              help="Require a signature by this sender's Ed25519 public key (PEM).")
@context_option
@in_option
@_local
def unseal_command(state: State, key_file: str, from_file: str | None, context: tuple[str, ...],
                   in_file: str | None) -> None:
    """Open a sealed secret (base64, stdin or --in); writes the secret to stdout."""
    from keygrants.sealed import open_sealed, sealed_sender

    key = _load_recipient_private(key_file)
    sender_key = _load_sender(from_file) if from_file else None
    ctx = parse_context(context)
    sealed = unb64(read_input(in_file), "the sealed secret")
    # The header says whether the secret is signed (public information): say what to do.
    named = sealed_sender(sealed)
    if named is not None and sender_key is None:
        raise InvalidCiphertext(f"the sealed secret is signed by sender key {b64(named)}; "
                                "pass --from with that sender's public key")
    if named is None and sender_key is not None:
        raise InvalidCiphertext("the sealed secret is not signed, but --from requires a signature")
    payload = open_sealed(sealed, key, sender_public_key=sender_key, context=ctx)
    if state.as_json:
        emit(state, {"payload": b64(payload), "sender": None if named is None else b64(named)}, "")
    else:
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()


def register(group: click.Group) -> None:
    """Add ``seal``, ``unseal`` and ``seal-keygen`` to the ``keygrants`` group."""
    for command in (seal_command, unseal_command, seal_keygen_command):
        group.add_command(command)
