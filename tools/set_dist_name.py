#!/usr/bin/env python3
"""Renames the distribution in a pyproject.toml, e.g. to build the CUDA wheel `pylandmark-cu13`.

    python tools/set_dist_name.py pylandmark-cu13 [path/to/pyproject.toml]

The import package stays `pylandmark`. PEP 621 makes `project.name` static (no backend setting
or environment variable may change it), so the CUDA build edits a copy of the tree, or a CI
checkout, before building. Only the one `name = "pylandmark"` line of [project] changes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    name = sys.argv[1]
    if not re.fullmatch(r"pylandmark(-[a-z0-9]+)?", name):
        print(f"name must be pylandmark or pylandmark-<suffix> (lowercase), got {name!r}", file=sys.stderr)
        return 2
    path = Path(sys.argv[2] if len(sys.argv) == 3 else "pyproject.toml")
    text = path.read_text()
    new, n = re.subn(r'(?m)^name = "pylandmark(-[a-z0-9]+)?"$', f'name = "{name}"', text, count=1)
    if n != 1 or "[project]" not in text or text.index("[project]") > new.index(f'name = "{name}"'):
        print(f"{path}: no `name = \"pylandmark\"` line under [project]", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: distribution renamed to {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
