"""Every method config has a docs page and a row in the methods index (run by `make docs` and
by the test suite)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def problems() -> list[str]:
    found = []
    index = ROOT / "docs" / "methods" / "README.md"
    index_text = index.read_text() if index.is_file() else ""
    for config in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        name = config.stem
        page = ROOT / "docs" / "methods" / f"{name}.md"
        shared_page = any(
            f"`{name}`" in p.read_text()
            for p in (ROOT / "docs" / "methods").glob("*.md")
            if p != index
        )
        if not page.is_file() and not shared_page:
            found.append(f"conf/method/{name}.yaml has no docs/methods/{name}.md")
        if f"`{name}`" not in index_text:
            found.append(f"docs/methods/README.md has no row for `{name}`")
    return found


if __name__ == "__main__":
    issues = problems()
    print("\n".join(issues) or "docs: every method is documented")
    sys.exit(1 if issues else 0)
