"""The method contract: a method is declared once, as a frozen dataclass of its hyper-parameters
(the constructor signature is the schema a YAML binds to), and is of exactly one **kind**. The kind
says what the method is given and what it returns; the runner and the Python API choose what to
do from ``method.kind``, never from the type of a result.

| kind          | base class        | entry point                                        | returns                |
|---------------|-------------------|----------------------------------------------------|------------------------|
| ``merge``     | StateDictMerge    | ``merge(pretrained, experts, progress)``           | merged state dict      |
| ``data_merge``| DataMerge         | ``merge(pool, data, context)``                     | merged state dict      |
| ``lora_merge``| LoRAMerge         | ``merge(pretrained, adapters, progress)``          | merged state dict      |
| ``sequential``| SequentialMerge   | ``start(pretrained, context)``, ``absorb(state, name, expert)``, ``merged(state)`` | merged state dict after each expert |
| ``per_task``  | PerTaskMethod     | ``models(pool)``                                   | {task: state dict}     |
| ``routed``    | RoutedMethod      | ``build(pool, data, context)``                     | :class:`RoutedModel`   |
| ``ensemble``  | EnsembleMethod    | ``combiner(names)``                                | logits combiner        |

- ``pretrained`` and every expert are ``Mapping[str, Tensor]`` in the pool's canonical key layout,
  usually read lazily tensor by tensor; ``experts`` maps expert name -> state dict, in pool order.
- ``adapters`` (``lora_merge``) maps expert name -> its LoRA factors, {weight key:
  :class:`~fusion_bench.lora.LowRank`} (a LoRA model pool's ``adapter(name)``); weights no adapter
  touches are the pretrained ones in every expert.
- ``data`` is the run's :class:`~fusion_bench.taskpool.data.TaskData` (splits, seeded samples,
  loaders, zero-shot heads), built once by the runner from the task pool.
- ``context`` (:class:`Context`) carries the device (Fabric), the run's output directory and the
  fast-dev-run switch; methods never read the run configuration.
- ``models_held(n_experts)``: the method's peak memory in image towers (fp32) besides the evaluated
  model, for ``dry_run``'s estimate and the docs.

The kinds are base classes with defaults (one level of inheritance: a method class derives from
exactly one of them). See ``docs/add_a_method.md``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.tensor_ops import StateDict

if TYPE_CHECKING:
    from fusion_bench.lora import LowRank
    from fusion_bench.taskpool.data import TaskData

Kind = Literal["merge", "data_merge", "lora_merge", "sequential", "per_task", "routed", "ensemble"]
STATE_DICT_KINDS: tuple[Kind, ...] = ("merge", "data_merge", "lora_merge", "sequential")

Experts = Mapping[str, StateDict]  # expert name -> (lazy) state dict, in the pool's order
Adapters = Mapping[str, Mapping[str, "LowRank"]]  # expert name -> {weight key: its LoRA factors}
Progress = Callable[[Iterable[str]], Iterable[str]] | None
State = TypeVar("State")


@dataclass(frozen=True)
class Context:
    """What a run gives a method besides the pool and the data."""

    fabric: Any = None  # lightning.fabric.Fabric; None = one CPU process
    output_dir: Path | None = None  # where a method may write its own artefacts (e.g. learned λ)
    fast_dev_run: bool = False  # one step / one batch: a smoke test of the job

    @property
    def device(self):
        import torch

        return self.fabric.device if self.fabric is not None else torch.device("cpu")


# -- the kinds -----------------------------------------------------------------------------------
class Hyperparameters:
    """Behind every kind: a method's fields are type-checked against their annotations (the
    constructor is the schema) before its own ``__post_init__`` checks run."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            check_hyperparameters(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__


class StateDictMerge(Hyperparameters):
    """Data-free merge of state dicts. Streams key by key where the algorithm allows."""

    kind: ClassVar[Kind] = "merge"

    def merge(
        self, pretrained: StateDict, experts: Experts, progress: Progress = None
    ) -> StateDict:
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        return 1.0  # the output; per-key temporaries are negligible


class DataMerge(Hyperparameters):
    """A merge that uses task data (calibration statistics, test-time adaptation)."""

    kind: ClassVar[Kind] = "data_merge"

    def merge(self, pool: Any, data: TaskData, context: Context) -> StateDict:
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        raise NotImplementedError


class LoRAMerge(Hyperparameters):
    """Data-free merge of LoRA experts from their low-rank factors, never expanding them to
    full models (needs a LoRA model pool: ``modelpool=tiny8_lora`` or ``modelpool=lora``)."""

    kind: ClassVar[Kind] = "lora_merge"

    def merge(
        self, pretrained: StateDict, adapters: Adapters, progress: Progress = None
    ) -> StateDict:
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        return 1.0  # the output; one weight's factors at a time


class SequentialMerge(Hyperparameters, Generic[State]):
    """Experts arrive one at a time and are absorbed into a running state; the merged model is
    available after every step (continual merging). The default memory is θ0 + the merged
    model + one expert, whatever the number of experts."""

    kind: ClassVar[Kind] = "sequential"

    def start(self, pretrained: StateDict, context: Context | None = None) -> State:
        """The state before any expert (``context``: the device for methods that optimise)."""
        raise NotImplementedError

    def absorb(self, state: State, name: str, expert: StateDict) -> State:
        raise NotImplementedError

    def merged(self, state: State) -> StateDict:
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        return 2.0


class PerTaskMethod(Hyperparameters):
    """One model per task (the task id picks the model at inference)."""

    kind: ClassVar[Kind] = "per_task"

    def models(self, pool: Any) -> Mapping[str, StateDict]:
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        return 0.0  # the evaluator builds each task's model when it reaches that task

    def stored_models(self, n_experts: int) -> float:
        """What serving every task needs, in pretrained image towers (fp32; a 1-bit mask counts
        1/32): the storage cost in reports. Default: one full model per task."""
        return float(n_experts)


class RoutedModel(nn.Module):
    """An image tower that picks or mixes experts per input.

    ``forward(images (B, 3, H, W), task=None) -> features (B, D)`` in the joint image-text space
    (what the pool's zero-shot heads expect). ``task=None`` is the task-agnostic mode (the
    router decides); ``task=<expert name>`` is the oracle-task-id mode (the router is bypassed and
    that expert's part is used; ``FusionBenchError`` for a name that is not an expert).

    After a task-agnostic forward, ``last_routing`` is a (B, N) tensor of how much each input was
    routed to each expert (``expert_names`` order; rows of a hard router are one-hot): the
    evaluator scores routing accuracy as ``argmax == the input's own task``.
    ``extra_forward_passes`` (tower passes per image beyond one, e.g. MASS's routing pass) and
    ``stored_parameters()`` are the costs the report lists."""

    extra_forward_passes: ClassVar[int] = 0

    def __init__(self, expert_names: Sequence[str]):
        super().__init__()
        self.expert_names = list(expert_names)
        self.last_routing: Tensor | None = None

    def expert_index(self, task: str) -> int:
        """The index of expert ``task`` (the oracle task id), or a clear error."""
        if task not in self.expert_names:
            raise FusionBenchError(
                f"Task id '{task}' is not an expert of this routed model (experts: "
                f"{self.expert_names}); the oracle-task-id mode needs one of those names."
            )
        return self.expert_names.index(task)

    def stored_parameters(self) -> int:
        """Numbers the routed model keeps: its ``state_dict()`` (what saving writes; parameters
        and persistent buffers; a mask entry counts one). Caches rebuilt from these (non-persistent
        buffers, plain attributes) are not storage."""
        return sum(t.numel() for t in self.state_dict().values())


class RoutedMethod(Hyperparameters):
    """Builds a :class:`RoutedModel` from the pool (and task data, for trained routers);
    ``load`` rebuilds a saved one from its ``state_dict()`` (``method=routed/checkpoint``)."""

    kind: ClassVar[Kind] = "routed"

    def build(self, pool: Any, data: TaskData, context: Context) -> RoutedModel:
        raise NotImplementedError

    def load(self, pool: Any, expert_names: Sequence[str], state: StateDict) -> RoutedModel:
        """The routed model this method built, from its saved ``state_dict()``."""
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        raise NotImplementedError


class EnsembleMethod(Hyperparameters):
    """Not a merge: all experts run on every image and their logits are combined."""

    kind: ClassVar[Kind] = "ensemble"

    def combiner(self, names: Sequence[str]) -> Callable[[Tensor], Tensor]:
        """``(N, B, C) logits -> (B, C)`` for the experts ``names`` (validates per-expert
        options before any model is built)."""
        raise NotImplementedError

    def models_held(self, n_experts: int) -> float:
        return float(n_experts)


Method = (
    StateDictMerge | DataMerge | SequentialMerge | PerTaskMethod | RoutedMethod | EnsembleMethod
)


# -- running the state-dict kinds ------------------------------------------------------------------
def pool_experts(pool: Any) -> dict[str, StateDict]:
    """The pool's experts as {name: lazy state dict}, in the pool's order."""
    return {name: pool.expert(name) for name in pool.expert_names}


def pool_adapters(pool: Any, label: str = "this method") -> dict[str, Mapping[str, LowRank]]:
    """A LoRA pool's experts as {name: LoRA factors}, in the pool's order; any other pool is
    refused, naming the fix."""
    if not hasattr(pool, "adapter"):
        raise FusionBenchError(
            f"Method '{label}' merges LoRA factors, but the model pool "
            f"({type(pool).__name__}) holds full fine-tuned models. Use a LoRA pool: "
            "modelpool=tiny8_lora, or modelpool=lora with modelpool.adapters={task: PEFT adapter "
            "directory}. (Every other method also runs on a LoRA pool, on the expanded experts.)"
        )
    return {name: pool.adapter(name) for name in pool.expert_names}


def merge_sequentially(
    method: SequentialMerge,
    pretrained: StateDict,
    experts: Experts,
    context: Context | None = None,
    every_step: bool = True,
) -> Iterator[tuple[str, StateDict]]:
    """Feed ``experts`` to ``method`` one at a time; yield ``(name, merged model)`` after each
    (``every_step=False``: after the last only — no intermediate model is built)."""
    state = method.start(pretrained, context)
    names = list(experts)
    for i, name in enumerate(names):
        state = method.absorb(state, name, experts[name])
        if every_step or i == len(names) - 1:
            yield name, method.merged(state)


def merged_state_dict(
    method: Method, pool: Any, data: TaskData | None, context: Context, label: str
) -> StateDict:
    """The one merged model of a ``merge``, ``data_merge`` or ``sequential`` method."""
    if method.kind == "merge":
        return method.merge(pool.pretrained(), pool_experts(pool), key_progress(label))
    if method.kind == "data_merge":
        return method.merge(pool, data, context)
    if method.kind == "lora_merge":
        return method.merge(pool.pretrained(), pool_adapters(pool, label), key_progress(label))
    if method.kind == "sequential":
        steps = merge_sequentially(method, pool.pretrained(), pool_experts(pool), context, False)
        last = deque(steps, maxlen=1)
        if not last:
            raise FusionBenchError("A sequential merge needs at least one expert in the pool.")
        return last[0][1]
    raise FusionBenchError(
        f"Method '{label}' is of kind '{method.kind}': it gives "
        f"{KIND_GIVES[method.kind]}, not one merged model."
    )


def build_classifiers(
    method: Method, pool: Any, data: TaskData | None, context: Context, label: str
) -> tuple[Any, StateDict | None]:
    """Run ``method`` by its kind: ``(what the evaluator classifies with, the merged state dict or
    None)``. The first is one ``ZeroShotClassifier`` for every task, or a mapping task ->
    classifier (per-task kinds; each built when the evaluator reaches its task)."""

    if method.kind in STATE_DICT_KINDS:
        state = merged_state_dict(method, pool, data, context, label)
        return merged_classifier(pool, state), state
    if method.kind == "per_task":
        return PerTaskClassifiers(pool, method.models(pool)), None
    if method.kind == "routed":
        return RoutedClassifiers(pool, method.build(pool, data, context)), None
    if method.kind == "ensemble":
        from fusion_bench.method.ensemble import ensemble_classifier

        return ensemble_classifier(pool, method.combiner(list(pool.expert_names))), None
    raise FusionBenchError(f"{type(method).__name__} has an unknown kind {method.kind!r}.")


def evaluate_classifiers(
    model: Any, taskpool: Any, fabric: Any = None, tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """What ``build_classifiers`` gave, evaluated on ``taskpool``: routed models in both modes
    (:meth:`RoutedClassifiers.evaluate`), anything else by the task pool as it is."""
    if isinstance(model, RoutedClassifiers):
        return model.evaluate(taskpool, fabric, tasks)
    return taskpool.evaluate(model, fabric, tasks=tasks)


class RoutedClassifiers:
    """A routed model as the evaluator sees it, in two labelled modes:

    - **task-agnostic** (the router decides): metrics ``<split>/<task>/acc|loss``,
      ``<split>/avg_acc`` — the headline numbers, comparable with a merged model's — and
      ``routing/<split>/<task>/acc``: the share of the task's images whose largest routing weight
      is that task's own expert (tasks that are no expert of the pool have none);
    - **oracle task id** (each task's images go to that task's expert part): ``oracle/<split>/...``,
      for the tasks that are experts of the pool — an upper bound on what routing can give.
    """

    def __init__(self, pool: Any, model: RoutedModel):
        self.pool, self.model = pool, model

    def classifier(self, features: Callable[[nn.Module, Tensor], Tensor]):
        import dataclasses

        return dataclasses.replace(self.pool.classifier(self.model), features=features)

    def evaluate(self, taskpool: Any, fabric: Any = None, tasks: Sequence[str] | None = None):
        tasks = list(taskpool.tasks if tasks is None else tasks)
        names = self.model.expert_names
        metrics: dict[str, float] = {}
        for split in taskpool.splits:
            hits = {task: [0, 0] for task in tasks}
            agnostic = {
                task: self.classifier(_routing_probe(hits[task], task, names)) for task in tasks
            }
            metrics |= taskpool.evaluate(agnostic, fabric, tasks=tasks, splits=[split])
            routed = [t for t in tasks if t in names and hits[t][1]]
            for task in routed:
                metrics[f"routing/{split}/{task}/acc"] = hits[task][0] / hits[task][1]
            if routed:
                metrics[f"routing/{split}/avg_acc"] = sum(
                    metrics[f"routing/{split}/{t}/acc"] for t in routed
                ) / len(routed)
            own = [t for t in tasks if t in names]
            if own:
                oracle = {task: self.classifier(_oracle(task)) for task in own}
                found = taskpool.evaluate(oracle, fabric, tasks=own, splits=[split])
                metrics |= {f"oracle/{k}": v for k, v in found.items()}
        return metrics


def _routing_probe(hits: list[int], task: str, names: list[str]):
    """features(module, images) in the task-agnostic mode, counting the inputs routed to ``task``
    (own expert) into ``hits`` = [routed to own expert, images]."""
    own = names.index(task) if task in names else None

    def features(module: nn.Module, images: Tensor) -> Tensor:
        out = module(images)
        if own is not None and module.last_routing is not None:
            hits[0] += int((module.last_routing.argmax(dim=-1) == own).sum())
            hits[1] += module.last_routing.shape[0]
        return out

    return features


def _oracle(task: str):
    return lambda module, images: module(images, task=task)


def merged_classifier(pool: Any, state: StateDict):
    """The zero-shot classifier of a merged state dict, refused if it holds NaN/Inf."""
    check_finite(state)
    return pool.classifier(pool.build_encoder(state))


class PerTaskClassifiers(Mapping):
    """task -> classifier, each built from its state dict when first asked for (so evaluating
    per-task models holds one at a time)."""

    def __init__(self, pool: Any, models: Mapping[str, StateDict]):
        self.pool, self.models = pool, models

    def __getitem__(self, task: str):
        state = self.models[task]
        return self.pool.classifier(self.pool.build_encoder(state))

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, task: object) -> bool:  # Mapping's default would build the model
        return task in self.models


def check_finite(state_dict: StateDict) -> None:
    """A merge that overflowed must not be evaluated or saved as if it were a model."""
    for key in state_dict:
        value = state_dict[key]
        if value.is_floating_point() and not value.isfinite().all():
            raise FusionBenchError(
                f"The merged model has NaN/Inf in '{key}'. The method's hyper-parameters "
                "overflowed (e.g. a huge scaling factor), or an input checkpoint holds NaN/Inf; "
                "nothing was evaluated or saved."
            )


KIND_GIVES = {
    "per_task": "one model per task",
    "routed": "a routed model that picks its experts per input",
    "ensemble": "an output ensemble of all experts",
}


def require_experts(experts: Experts, method: str) -> None:
    """A merge of no expert is refused, naming the method (the runner and the API refuse an empty
    pool first; this guards a direct ``merge(pretrained, {})``)."""
    if not experts:
        raise FusionBenchError(f"{method} needs at least one expert in the model pool.")


def key_progress(desc: str) -> Callable[[Iterable[str]], Iterable[str]]:
    """A progress bar over state-dict keys (tqdm writes to stderr and hides itself off a TTY
    only when asked, so long merges show progress in logs too)."""
    from tqdm.auto import tqdm

    return lambda keys: tqdm(keys, desc=desc, unit="tensor", leave=False)


def per_expert(value: float | Sequence[float], names: Sequence[str], option: str) -> list[float]:
    """One float per expert from a scalar or a list in the pool's order (e.g. ``scaling_factor``)."""
    if isinstance(value, (int, float)):
        return [float(value)] * len(names)
    values = [float(v) for v in value]
    if len(values) != len(names):
        raise FusionBenchError(
            f"{option} has {len(values)} values for {len(names)} experts {list(names)}: give one "
            "value, or one per expert in the pool's order."
        )
    return values


# -- the schema, checked ------------------------------------------------------------------------------
def base_merge(name: str, options: Mapping[str, Any], option: str = "base") -> StateDictMerge:
    """The data-free merge ``conf/method/<name>.yaml`` with ``options`` over its YAML defaults:
    how a method composes with another one (LiNeS or singular-value calibration after TIES,
    DARE in front of it ...). Errors name ``method.<option>`` and the fix."""
    from fusion_bench.api import build_method

    try:
        method, _ = build_method(name, options)
    except FusionBenchError as e:
        message = str(e)
        if message.startswith("method."):  # a base option's check: name its real path
            message = f"method.{option}_options." + message.removeprefix("method.")
        raise FusionBenchError(f"method.{option}={name!r}: {message}") from None
    if method.kind != "merge":
        raise FusionBenchError(
            f"method.{option}={name!r} is a {method.kind} method; a base must be a data-free "
            "merge of kind 'merge' (e.g. task_arithmetic, ties_merging, tsv_m)."
        )
    return method


def check_hyperparameters(method: Any, label: str = "method") -> None:
    """Every field of a method dataclass has its declared type (the constructor is the schema):
    ``method.scaling_factor=abc`` fails here, naming the option, not deep inside the maths."""
    import dataclasses
    import math
    import typing

    if not dataclasses.is_dataclass(method):
        return
    hints = typing.get_type_hints(type(method))
    for f in dataclasses.fields(method):
        if not f.init or f.name not in hints:
            continue
        value = getattr(method, f.name)
        if not _conforms(value, hints[f.name]):
            raise FusionBenchError(
                f"{label}.{f.name}={value!r} is not a valid {_describe(hints[f.name])}: fix the "
                f"value of {f.name} (see conf/method/ for its default and meaning)."
            )
        if isinstance(value, float) and math.isnan(value):
            raise FusionBenchError(f"{label}.{f.name} is NaN: give a number.")
        if f.name == "scaling_factor" and _largest(value) > ABSURD_SCALE:
            import warnings

            warnings.warn(
                f"{label}.scaling_factor={value!r}: a task-vector scale above {ABSURD_SCALE:g} "
                "moves the weights far outside the experts' range (usual values are 0.1–2); the "
                "merge will likely be at chance accuracy.",
                stacklevel=2,
            )


ABSURD_SCALE = 100.0  # scaling factors above this are warned about (usual: 0.1–2)


def _largest(value: Any) -> float:
    values = value if isinstance(value, (list, tuple)) else [value]
    return max((abs(v) for v in values if isinstance(v, (int, float))), default=0.0)


def _conforms(value: Any, hint: Any) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if origin in (dict, Mapping):
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, Mapping) and all(
            _conforms(k, key) and _conforms(v, item) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # anything more exotic is the method's own check


def _describe(hint: Any) -> str:
    import typing

    if typing.get_origin(hint) is typing.Literal:
        return "choice of " + " | ".join(map(repr, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
