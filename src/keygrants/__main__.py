"""``python -m keygrants`` runs the CLI."""

from keygrants.cli import main

main()
