"""Check this Python has the packages a submitted job pins, before the job starts.

`python -m shipyard.runtime.requirements requirements.txt` exits 1 with one line per package
that is missing or at another version, and how to fix it; a job's entrypoint runs it first.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def unmet(requirements: list[str]) -> list[str]:
    """What differs from `requirements` here: one line per missing or mismatched package."""
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed (the job needs {requirement})")
            continue
        if requirement.specifier and installed not in requirement.specifier:
            problems.append(f"{requirement.name} {installed} is installed; the job needs {line}")
    return problems


def main(path: str) -> int:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    problems = unmet(lines)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(
            "To fix: install Shipyard's pinned requirements on the cluster's nodes (their "
            "image), or submit with --install-deps to have Ray install them per job.",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
