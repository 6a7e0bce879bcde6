"""Print, or write into README.md, the table of model families x capabilities.

    python scripts/family_table.py           # print the table
    python scripts/family_table.py --write   # replace the table between README.md's markers

The rows come from ``mlx_tune.testing.families`` (the registry ``tests/test_families.py``
parametrises over, so every cell is asserted by a test), and
``tests/test_families.py::test_readme_table_is_generated`` fails when README.md differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_tune.atomic import write_text_atomic  # noqa: E402
from mlx_tune.testing.families import readme_with_table, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's family table")
    args = parser.parse_args()
    if not args.write:
        print(table())
        return 0
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    new = readme_with_table(text)
    if new != text:
        write_text_atomic(path, new)
    print(f"{path}: family table {'updated' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
