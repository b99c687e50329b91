"""``python -m fedsqueeze`` runs the command line interface."""

from fedsqueeze.cli.main import app

app()
