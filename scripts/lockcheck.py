"""Is the lock still the one pyproject.toml's requirements were resolved to?

Each file under requirements/ records a digest of what it was resolved from (pyproject.toml's requirements
and requirements/overrides.txt). When pyproject.toml changes without `scripts/lock`, the digests disagree and
this exits 1 saying so, before anything is installed or tested. Standard library only: it runs before the
virtual environment exists.

    python3 scripts/lockcheck.py            check every lock file
    python3 scripts/lockcheck.py --digest   print the digest of the current requirements
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKS = ("cpu.txt", "cuda.txt", "test.txt")
MARK = "# pyproject-requirements-sha256: "


def digest(root: Path = REPO) -> str:
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject["project"]
    overrides = [line.split("#")[0].strip() for line in (root / "requirements" / "overrides.txt").read_text().splitlines()]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in project.get("optional-dependencies", {}).items()},
        "build-system": sorted(pyproject["build-system"]["requires"]),
        "overrides": sorted(line for line in overrides if line),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def stale(root: Path = REPO) -> list[str]:
    """Lock files missing, or resolved from other requirements than pyproject.toml holds now."""
    want, bad = digest(root), []
    for name in LOCKS:
        path = root / "requirements" / name
        recorded = next((line.removeprefix(MARK).strip() for line in path.read_text().splitlines()
                         if line.startswith(MARK)), None) if path.exists() else None
        if recorded != want:
            bad.append(f"requirements/{name}")
    return bad


def main() -> int:
    if sys.argv[1:] == ["--digest"]:
        print(digest())
        return 0
    bad = stale()
    if bad:
        print(f"the lock is out of date: {', '.join(bad)} were not resolved from pyproject.toml's current "
              "requirements. Run scripts/lock (it re-resolves them and runs the tests), then commit "
              "requirements/.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
