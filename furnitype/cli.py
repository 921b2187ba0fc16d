"""The ``furnitype`` command line: each command parses its options, calls the API once and prints."""

from __future__ import annotations

import functools
import json
import sys

import click

from furnitype.errors import FurnitypeError


def _api_errors(command):
    """Turn furnitype's exceptions into a one-line ``Error: ...`` and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FurnitypeError as err:
            exc = click.ClickException(str(err))
            exc.exit_code = err.exit_code
            raise exc from None

    return wrapper


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="furnitype")
def cli() -> None:
    """Recognise furniture and home-goods product photos with pretrained convolutional networks."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="furnitype")


if __name__ == "__main__":
    sys.exit(main())
