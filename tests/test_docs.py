"""Docs stay true to the configs: every method has a page and an index row."""

import runpy
from pathlib import Path


def test_every_method_is_documented():
    module = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "check_docs.py"))
    assert module["problems"]() == []


def test_python_api_examples_run_verbatim():
    """The self-contained examples of docs/python_api.md (state dicts in memory, your own method)
    run as written, in one namespace, and say what they claim."""
    import re

    import torch

    text = (Path(__file__).parents[1] / "docs" / "python_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    in_memory = next(b for b in blocks if "pre = {" in b)
    own_method = next(b for b in blocks if "class FirstExpert" in b)
    namespace: dict = {}
    exec(in_memory, namespace)  # noqa: S102 - the documented code itself
    exec(own_method, namespace)  # noqa: S102
    import fusion_bench

    out = fusion_bench.merge(namespace["FirstExpert"](), namespace["pre"], namespace["experts"])
    assert torch.equal(out["w"], torch.tensor([1.0, 0.0, 0.0]))
    lora = next(b for b in blocks if "LowRank(" in b)
    exec(lora, namespace)  # noqa: S102
    torch.testing.assert_close(namespace["merged"]["w"], torch.full((4, 3), 1.5))


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `fusion_bench ...` line in the README, docs/ and the YAML
    comments of conf/ (continuation lines joined, shell comments dropped)."""
    import re

    root = Path(__file__).parents[1]
    found = []
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    files += sorted((root / "conf").rglob("*.yaml"))
    for path in files:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())  # continuation lines joined
        in_block = path.suffix == ".yaml"  # YAML: every comment line; Markdown: code blocks
        for n, line in enumerate(text.splitlines(), 1):
            if path.suffix == ".md" and line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if path.suffix == ".yaml" and not re.match(
                r"\s*#\s{2,}fusion_bench|\s{4,}fusion_bench", line
            ):
                continue  # YAML: the indented examples in comments and in the --help footer
            line = line.strip().lstrip("#").strip()
            if in_block and re.match(r"fusion_bench( |$)", line):
                found.append((f"{path.relative_to(root)}:{n}", line))
    return found


def test_documented_commands_parse_as_hydra_overrides():
    """A command copied from the docs never fails in Hydra's override parser (an unquoted
    `{task}` in a path does: it must be quoted for the shell to pass it through)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    commands = documented_commands()
    assert len(commands) > 30  # the scan finds the docs' commands
    bad = []
    for where, command in commands:
        try:
            words = shlex.split(command, comments=True)[1:]
            parser.parse_overrides([w for w in words if "=" in w and not w.startswith("-")])
        except Exception as e:  # noqa: BLE001 - collect every failure
            bad.append(f"{where}: {command!r}: {str(e).splitlines()[0]}")
    assert not bad, "\n".join(bad)
