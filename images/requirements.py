"""Print the dependencies that pyproject.toml declares for the given extras, one per line.

    python images/requirements.py pyproject.toml operator > requirements.txt

The images install these first, from pyproject.toml alone, and copy the source afterwards: a
code change then leaves the (large) dependency layer cached. Standard library only, because it
runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The core dependencies plus those of each extra, in order, without duplicates."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(
            f"unknown extra(s) {', '.join(unknown)}; pyproject.toml has: {', '.join(optional)}"
        )
    found: list[str] = []
    for req in [*project.get("dependencies", []), *(r for e in extras for r in optional[e])]:
        if req not in found:
            found.append(req)
    return found


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: requirements.py PYPROJECT [EXTRA...]")
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
