"""The method interface: ``run(modelpool, fabric) -> result``.

A result is one of:
- a merged state dict of the image tower (``Mapping[str, Tensor]``, canonical keys);
- an image tower module (``torch.nn.Module``), e.g. after test-time adaptation;
- :class:`PerTask`: one of the above per task (each expert on its own task, task-routed methods).

The runner turns a result into classifiers with the model pool; methods never evaluate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable


class PerTask(dict):
    """task name -> state dict or image tower: evaluate each task with its own model."""


@runtime_checkable
class Method(Protocol):
    def run(self, modelpool: Any, fabric: Any = None) -> Any: ...


def merge_pool(merge: Callable[..., Any], modelpool: Any, desc: str, *hyperparameters: Any) -> Any:
    """``merge(pretrained, experts, *hyperparameters, names, progress)`` on a model pool: what the
    ``run()`` of every data-free method does. The checkpoints are opened lazily (tensors are read
    key by key inside ``merge``); ``progress`` is a bar over the state-dict keys named ``desc``."""
    names = modelpool.expert_names
    experts = [modelpool.expert(n) for n in names]
    return merge(modelpool.pretrained(), experts, *hyperparameters, names, key_progress(desc))


def key_progress(desc: str) -> Callable[[Iterable[str]], Iterable[str]]:
    """A progress bar over state-dict keys (tqdm writes to stderr and hides itself off a TTY
    only when asked, so long merges show progress in logs too)."""
    from tqdm.auto import tqdm

    return lambda keys: tqdm(keys, desc=desc, unit="tensor", leave=False)
