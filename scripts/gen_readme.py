"""Regenerate the README's generated sections: the config reference (from the typed
config, so it never drifts) and, when a report exists, the performance table."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_tune.config import config_reference  # noqa: E402


def replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


def main() -> int:
    readme = ROOT / "README.md"
    text = replace_between(readme.read_text(), "config", config_reference())
    latest = ROOT / "bench" / "results" / "latest.md"
    if latest.is_file():
        text = replace_between(text, "perf", latest.read_text())
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
