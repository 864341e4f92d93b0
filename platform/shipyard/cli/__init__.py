"""The `shipyard` command: parse arguments, call one function, print the outcome.

One module per command group registers its subcommands and handles them: `run` (train, serve,
sweep), `planning` (plan), `clusters` (cluster, submit, jobs) and `artifacts`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shipyard.cli import artifacts, clusters, planning, run
from shipyard.console import output_console
from shipyard.errors import ShipyardError

SPEC_ERROR_EXIT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors Shipyard understands are printed without a traceback."""
    args = _parser().parse_args(argv)
    console = output_console()  # whole lines in logs, whatever the terminal width
    try:
        return args.command(args, console)
    except ShipyardError as error:
        output_console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return SPEC_ERROR_EXIT
    except KeyboardInterrupt:
        output_console(stderr=True).print("interrupted; Ray was shut down. Re-run to resume.")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard", description="Train, sweep and serve models on Ray with DeepSpeed."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in (run, clusters, artifacts, planning):
        group.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
