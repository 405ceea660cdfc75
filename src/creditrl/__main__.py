"""`python -m creditrl` is the `creditrl` command."""

from creditrl.cli import app

app(prog_name="creditrl")
