"""Consoles that read well in a terminal and in a log (CI, `ray job logs`, `make run > log`)."""

from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 200  # a log has no width; Rich would assume 80 and cut tables to fit


def output_console(stderr: bool = False) -> Console:
    """Lines are never wrapped; off a terminal, tables get the width their values need."""
    terminal = Console(stderr=stderr).is_terminal
    return Console(stderr=stderr, soft_wrap=True, width=None if terminal else LOG_WIDTH)
