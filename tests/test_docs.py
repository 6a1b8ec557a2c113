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
