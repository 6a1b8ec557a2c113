"""Python API: the same methods as the CLI, without Hydra.

- ``fusion_bench.merge(method, pretrained, finetuned, **hyperparameters)`` -> the merged state dict
  of a ``merge``, ``data_merge`` or ``sequential`` method;
- ``fusion_bench.evaluate(method, modelpool, taskpool, **hyperparameters)`` -> per-task metrics of
  any method (merges, per-task models, routed models, ensembles), as the CLI's table.

``method`` is the name of a config in ``conf/method/``; that YAML's ``_target_`` is the class (no
second registry) and its values are the defaults, overridden by the keyword hyper-parameters of the
same names. Inputs may be paths (safetensors / torch files, or ``save_pretrained`` directories),
state dicts, or a model pool. Methods that use data get the task pool's
:class:`~fusion_bench.taskpool.data.TaskData` (``data=``), or one with default settings.

    merged = fusion_bench.merge("ties_merging", "pre.safetensors",
                                ["mnist.safetensors", "svhn.safetensors"], scaling_factor=0.4)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench.errors import FusionBenchError, did_you_mean

Source = "str | os.PathLike | Mapping[str, Tensor]"


def merge(
    method: Any,
    pretrained: Any,
    finetuned: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    data: Any = None,
    fabric: Any = None,
    save_to: str | os.PathLike | None = None,
    overwrite: bool = False,
    **hyperparameters: Any,
) -> dict:
    """Merge ``finetuned`` experts of ``pretrained`` with ``method``; return the merged state dict.

    - ``method``: a name from ``conf/method/`` (e.g. ``"ties_merging"``) or a method instance.

    - ``pretrained``: a checkpoint path, a state dict, or a model pool (then omit ``finetuned``).
    - ``finetuned``: a list of paths / state dicts, or a mapping {expert name: path or state dict}
      (names matter for per-expert options such as ``weights={name: w}``).
    - ``data``: for methods that use data (Fisher, RegMean, AdaMerging ...): a task pool or a
      ``TaskData``; default: ``TaskData()`` (the task specs' own datasets). These methods build
      models, so ``pretrained`` must then be a model pool.
    - ``fabric``: a ``lightning.fabric.Fabric`` to run on (default: one CPU process).
    - ``save_to``: also write the result as a safetensors file there (an existing file is kept
      unless ``overwrite=True``).
    - ``hyperparameters``: the keys of ``conf/method/<method>.yaml``, e.g. ``scaling_factor=0.3``.

    Checkpoint files are read lazily, key by key, as in the CLI.
    """
    from fusion_bench.method.base import (
        KIND_GIVES,
        STATE_DICT_KINDS,
        Context,
        check_finite,
        merged_state_dict,
    )

    instance, config = build_method(method, hyperparameters)
    method = label_of(method, instance)  # a name for messages from here
    if instance.kind not in STATE_DICT_KINDS:
        raise FusionBenchError(
            f"Method '{method}' gives {KIND_GIVES[instance.kind]}, not one merged model: evaluate "
            f"it with fusion_bench.evaluate('{method}', modelpool, taskpool) or the CLI "
            f"(fusion_bench method={method})."
        )
    if save_to is not None and Path(save_to).exists() and not overwrite:
        raise FusionBenchError(
            f"save_to '{save_to}' exists. Choose another path, or pass overwrite=True to replace it."
        )
    if save_to is not None:  # before the merge, not after it
        from fusion_bench.checkpoint import check_writable

        check_writable(Path(save_to).parent, "save_to", "Choose another save_to.")
    pool = as_pool(pretrained, finetuned, method)
    context = Context(fabric=fabric)
    state = merged_state_dict(instance, pool, as_task_data(data), context, method)
    state = {k: state[k] for k in state}
    check_finite(state)
    if save_to is not None:
        from fusion_bench.checkpoint import save_safetensors

        metadata = {
            "format": "pt",
            "fusion_bench_method": method,
            "hyperparameters": json.dumps(config, default=str),
        }
        try:  # without overwrite, never replace a file another process created meanwhile
            save_safetensors(state, Path(save_to), metadata, exclusive=not overwrite)
        except OSError as e:  # the merge is done: return it rather than lose it
            import warnings

            warnings.warn(
                f"fusion_bench.merge: saving to '{save_to}' failed ({e}); the merged state dict "
                "is returned, unsaved.",
                stacklevel=2,
            )
    return state


def evaluate(
    method: Any,
    modelpool: Any,
    taskpool: Any,
    *,
    fabric: Any = None,
    fast_dev_run: bool = False,
    **hyperparameters: Any,
) -> dict[str, float]:
    """Run ``method`` on a model pool and evaluate what it gives on a task pool: the metrics
    ``<split>/<task>/acc``, ``<split>/<task>/loss`` and ``<split>/avg_acc``, as the CLI reports.
    Works for every kind of method; ``fast_dev_run`` does one adaptation step (the task pool's
    own ``fast_dev_run`` limits evaluation to one batch)."""
    from fusion_bench.method.base import Context, build_classifiers, evaluate_classifiers

    if not is_pool(modelpool):
        raise FusionBenchError(
            "evaluate() needs a model pool (e.g. fusion_bench.modelpool.open_clip.OpenCLIPModelPool"
            "(...)): evaluation builds models and zero-shot heads, which state dicts alone do not "
            "give."
        )
    instance, _config = build_method(method, hyperparameters)
    label = label_of(method, instance)
    context = Context(fabric=fabric, fast_dev_run=fast_dev_run)
    model, _state = build_classifiers(instance, modelpool, taskpool.data, context, label)
    return evaluate_classifiers(model, taskpool, fabric)


def label_of(method: Any, instance: Any) -> str:
    """A method's name for messages: the config name, or the class of an instance."""
    return method if isinstance(method, str) else type(instance).__name__


def _fields(method: Any) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(method):
        return {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    return {}


def as_task_data(data: Any):
    """A TaskData from a task pool, a TaskData, or nothing (default settings)."""
    from fusion_bench.taskpool.data import TaskData

    if data is None:
        return TaskData()
    if isinstance(data, TaskData):
        return data
    if isinstance(getattr(data, "data", None), TaskData):
        return data.data
    raise FusionBenchError(
        f"data is a {type(data).__name__}: give a task pool (CLIPClassificationTaskPool) or a "
        "fusion_bench.taskpool.data.TaskData."
    )


def method_config(method: str) -> dict:
    """The YAML of ``conf/method/<method>.yaml`` as plain data, its ``defaults`` (other method
    configs it extends) merged in as Hydra would."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fusion_bench.paths import config_dir

    directory = config_dir() / "method"
    known = sorted(str(p.relative_to(directory).with_suffix("")) for p in directory.rglob("*.yaml"))
    if not isinstance(method, str) or method not in known:
        raise FusionBenchError(
            f"Unknown method '{method}'. Methods: {', '.join(known)}.{did_you_mean(str(method), known)}"
        )
    path = directory / f"{method}.yaml"
    node = OmegaConf.load(path)
    parents = [d for d in node.pop("defaults", []) if d != "_self_"]
    node = OmegaConf.merge(*(OmegaConf.create(method_config(p)) for p in parents), node)
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as e:
        raise FusionBenchError(
            f"Method config {path} cannot be read on its own ({e}); method configs must not "
            "interpolate other groups."
        ) from None


def build_method(method: Any, hyperparameters: Mapping[str, Any]) -> tuple[Any, dict]:
    """The method's class from its YAML ``_target_``, built with the YAML's values overridden by
    ``hyperparameters``. Returns (instance, the hyper-parameters used). A method instance (e.g.
    one of your own, not in ``conf/method``) is used as it is."""
    if not isinstance(method, str) and hasattr(method, "kind"):
        if hyperparameters:
            raise FusionBenchError(
                f"Got a method instance and hyper-parameters {sorted(hyperparameters)}: set them "
                "on the instance (dataclasses.replace(method, ...)) or pass the method's name."
            )
        return method, _fields(method)
    defaults = method_config(method)
    module, _, name = defaults.pop("_target_").rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    valid = set(defaults) | {p for p in inspect.signature(cls).parameters if not p.startswith("_")}
    unknown = sorted(set(hyperparameters) - valid)
    if unknown:
        hints = "".join(did_you_mean(u, valid) for u in unknown)
        raise FusionBenchError(
            f"Method '{method}' has no hyper-parameter {', '.join(map(repr, unknown))}. Valid: "
            f"{', '.join(sorted(valid))}.{hints}"
        )
    # A dict option (e.g. base_options) is merged over the YAML's dict, as Hydra merges a
    # command-line dict: the API and the CLI build the same method from the same overrides.
    merged = {
        k: {**defaults[k], **v}
        if isinstance(v, Mapping) and isinstance(defaults.get(k), Mapping)
        else v
        for k, v in hyperparameters.items()
    }
    config = {k: v for k, v in {**defaults, **merged}.items() if not k.startswith("_")}
    return cls(**config), config


# -- inputs ------------------------------------------------------------------------------------
def checkpoint_keys(keys: Sequence[str]) -> Mapping[str, str]:
    """Canonical image-tower keys of any supported layout: Hugging Face CLIP / CLIPVisionModel
    (transformers 4 or 5) or open_clip (whole CLIP, task_vectors ImageEncoder, bare tower)."""
    from fusion_bench.modelpool.clip_vision import vision_keys
    from fusion_bench.modelpool.open_clip import visual_keys

    hf_markers = ("vision_model.", "text_model.", "embeddings.patch_embedding.", "pre_layrnorm.")
    if any(k.startswith(hf_markers) for k in keys):
        return vision_keys(keys)
    return visual_keys(keys)


def load(source: Any, name: str):
    """A state dict as given, or a lazily read checkpoint for a path."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise FusionBenchError(
            f"'{name}' is a {type(source).__name__}: give a checkpoint path, a save_pretrained "
            "directory or a state dict (Mapping[str, Tensor])."
        )
    from fusion_bench.checkpoint import LazyStateDict, find_weight_files
    from fusion_bench.paths import resolve_path

    path = Path(resolve_path(str(source)))
    if path.is_dir():
        files = find_weight_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise FusionBenchError(f"Checkpoint '{path}' ({name}) does not exist. Check the path.")
    return LazyStateDict(files, key_map=checkpoint_keys, name=f"{name} ({path})")


def is_pool(obj: Any) -> bool:
    return hasattr(obj, "expert_names") and callable(getattr(obj, "expert", None))


def as_pool(pretrained: Any, finetuned: Any, method: str):
    if is_pool(pretrained):
        if finetuned is not None:
            raise FusionBenchError(
                "merge() got a model pool and `finetuned`: the pool already lists the experts; "
                "omit `finetuned`."
            )
        return pretrained
    if finetuned is None:
        raise FusionBenchError(
            "merge() needs the fine-tuned experts: pass `finetuned` as a list of paths / state "
            "dicts or a mapping {name: path}, or pass a model pool as `pretrained`."
        )
    if isinstance(finetuned, (str, os.PathLike)) or (
        isinstance(finetuned, Mapping)
        and finetuned
        and not isinstance(next(iter(finetuned.values())), (str, os.PathLike, Mapping))
    ):
        raise FusionBenchError(
            "`finetuned` must be a list of experts or a mapping {expert name: path or state "
            "dict}, not a single checkpoint (wrap it in a list)."
        )
    items = (
        finetuned.items()
        if isinstance(finetuned, Mapping)
        else ((f"#{i}", f) for i, f in enumerate(finetuned))
    )
    experts = {str(name): load(source, str(name)) for name, source in items}
    if not experts:
        raise FusionBenchError("`finetuned` is empty: give at least one expert.")
    return StateDictPool(load(pretrained, "pretrained"), experts, method)


class StateDictPool:
    """The part of the model-pool interface that data-free methods use: state dicts only."""

    def __init__(self, pretrained: Mapping, experts: dict[str, Mapping], method: str):
        from fusion_bench.tensor_ops import check_same_architecture

        for name, expert in experts.items():
            check_same_architecture(pretrained, expert, name)
        self._pretrained, self._experts, self._method = pretrained, experts, method
        self.expert_names = list(experts)

    def pretrained(self) -> Mapping:
        return self._pretrained

    def expert(self, name: str) -> Mapping:
        if name not in self._experts:
            from fusion_bench.modelpool.base import unknown_expert

            raise unknown_expert(name, self.expert_names)
        return self._experts[name]

    def describe(self) -> dict:
        return {"family": "state_dicts", "experts": self.expert_names}

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise FusionBenchError(
            f"Method '{self._method}' needs `modelpool.{attr}`: it builds models or uses data, "
            "which paths and state dicts alone do not give. Pass a model pool as `pretrained` "
            "(e.g. fusion_bench.modelpool.clip_vision.CLIPVisionModelPool(pretrained=..., "
            f"finetuned={{task: path}})), or run it with the CLI: fusion_bench method={self._method}"
        )
