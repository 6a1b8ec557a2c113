"""Every method config has a docs page and a row in the methods index, and every YAML block a
page quotes as ``# conf/method/<name>.yaml`` says what that file says (run by `make docs` and by
the test suite)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def problems() -> list[str]:
    found = []
    index = ROOT / "docs" / "methods" / "README.md"
    index_text = index.read_text() if index.is_file() else ""
    method_dir = ROOT / "conf" / "method"
    for config in sorted(method_dir.rglob("*.yaml")):
        name = str(config.relative_to(method_dir).with_suffix(""))
        page = ROOT / "docs" / "methods" / f"{name}.md"
        shared_page = any(
            f"`{name}`" in p.read_text()
            for p in (ROOT / "docs" / "methods").rglob("*.md")
            if p != index
        )
        if not page.is_file() and not shared_page:
            found.append(f"conf/method/{name}.yaml has no docs/methods/{name}.md")
        if f"`{name}`" not in index_text:
            found.append(f"docs/methods/README.md has no row for `{name}`")
    found += stale_quotes()
    return found


QUOTE = re.compile(r"```yaml\n# (conf/method/[\w/]+\.yaml)\n(.*?)```", re.S)


def stale_quotes() -> list[str]:
    """YAML blocks in the docs that quote a method config must match the file, key for key."""
    found = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for path, body in QUOTE.findall(page.read_text()):
            config = ROOT / path
            if not config.is_file():
                found.append(f"{page.relative_to(ROOT)} quotes {path}, which does not exist")
                continue
            quoted, actual = yaml.safe_load(body) or {}, yaml.safe_load(config.read_text())
            if quoted != actual:
                diff = sorted(
                    k
                    for k in set(quoted) | set(actual)
                    if quoted.get(k, "<missing>") != actual.get(k, "<missing>")
                )
                found.append(f"{page.relative_to(ROOT)} quotes {path} out of date: keys {diff}")
    return found


if __name__ == "__main__":
    issues = problems()
    print("\n".join(issues) or "docs: every method is documented")
    sys.exit(1 if issues else 0)
