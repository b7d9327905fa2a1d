"""``keygrants operator``: maintenance that works on the data directory, not through the API.

``keygrants operator reseal --to URI`` moves the root key to another seal (like Vault's seal
migration): it unwraps the root key with the current seal, wraps it with the new one, checks
the new blob opens, then replaces the record. The root key itself does not change, so no key
material is re-encrypted and running servers keep serving (they hold the root key in
memory); the record names the new seal, so the next start without ``--seal`` uses it.
Credentials for both seals come from the environment as for ``keygrants server --seal``
(``AWS_*``, ``VAULT_TOKEN``, ``KEYGRANTS_PKCS11_PIN``, ``KEYGRANTS_PASSPHRASE``...). Moving
from one passphrase to another reads the new one from ``KEYGRANTS_NEW_PASSPHRASE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import click
import msgspec

from keygrants.cli._common import DATA_DIR_ENV, fail
from keygrants.errors import InvalidRequest, KeygrantsError, SealError

__all__ = ["operator"]

NEW_PASSPHRASE_ENV: Final = "KEYGRANTS_NEW_PASSPHRASE"


@click.group()
def operator() -> None:
    """Operate on a server's data directory (seal migration)."""


@operator.command()
@click.option("--to", "to_uri", required=True, metavar="URI",
              help="The new seal: local:///path/seal.key, local:passphrase, aws-kms://..., "
              "vault://..., pkcs11:..., gcp-kms://..., keygrants://...")
@click.option("--from", "from_uri", default=None, metavar="URI",
              help="The current seal [default: the local one recorded in the data directory; "
                   "another provider must be named here].")
@click.option("--data-dir", default="./keygrants-data", show_default=True, envvar=DATA_DIR_ENV,
              type=click.Path(file_okay=False), help="The server's data directory.")
@click.option("--store", default=None, help="Store URL [default: sqlite in the data dir].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
def reseal(to_uri: str, from_uri: str | None, data_dir: str, store: str | None,
           as_json: bool) -> None:
    """Move the root key to another seal, without downtime or re-encryption."""
    from keygrants.providers import open_root_provider
    from keygrants.seal import reseal_root_key, sealed_with
    from keygrants.server import DB_FILE, SEAL_KEY_FILE, _choose_seal, refuse_uri_query
    from keygrants.store import open_store

    path = Path(data_dir)
    if store is None and not (path / DB_FILE).exists():
        fail(as_json, SealError(f"no keygrants database in {path}; start the server once "
                                "first, or pass --store"))
    try:
        st = open_store(store or f"sqlite://{(path / DB_FILE).resolve()}")
        try:
            if sealed_with(st) is None:
                raise SealError("this store has no root key yet; start the server once first")
            # the same choice the server makes at start, so --from is rarely needed
            old = open_root_provider(_choose_seal(from_uri, sealed_with(st), path))
            new_options: dict[str, Any] = {}
            if to_uri == "local:passphrase" and os.environ.get(NEW_PASSPHRASE_ENV):
                new_options["passphrase"] = os.environ[NEW_PASSPHRASE_ENV]
            new = open_root_provider(refuse_uri_query(to_uri), **new_options)
            previous = reseal_root_key(st, old, new)
        finally:
            st.close()
    except KeygrantsError as exc:
        fail(as_json, exc)
        return
    except ValueError as exc:
        fail(as_json, InvalidRequest(str(exc)))
        return
    if as_json:
        click.echo(msgspec.json.encode({"previous_seal": previous, "seal": new.uri}).decode())
    else:
        click.echo(f"Root key resealed: {previous} -> {new.uri}")
        own_key_file = f"local://{(path / SEAL_KEY_FILE).resolve()}"
        if new.uri.startswith("local://") and new.uri != own_key_file:
            # a key file elsewhere: the next start does not find it on its own (saying that
            # it "uses the recorded seal" here contradicted the note that followed)
            click.echo(f"Running servers keep working. Without --seal a server looks for its "
                       f"key file at {own_key_file}: start servers with --seal {new.uri} (or "
                       "KEYGRANTS_SEAL) from now on.")
        elif new.uri.startswith("local:"):
            click.echo("Running servers keep working. The data directory records the new seal, "
                       "so the next start uses it (a --seal option, if you pass one, must name "
                       "it).")
        else:
            click.echo(f"Running servers keep working. Start servers with --seal {new.uri} (or "
                       "KEYGRANTS_SEAL) from now on: a seal other than a local one is never "
                       "taken from the store.")
