"""The method contract: a method is declared once, as a frozen dataclass of its hyper-parameters
(the constructor signature is the schema a YAML binds to), and is of exactly one **kind**. The kind
says what the method is given and what it returns; the runner and the Python API choose what to
do from ``method.kind``, never from the type of a result.

| kind          | base class        | entry point                                        | returns                |
|---------------|-------------------|----------------------------------------------------|------------------------|
| ``merge``     | StateDictMerge    | ``merge(pretrained, experts, progress)``           | merged state dict      |
| ``data_merge``| DataMerge         | ``merge(pool, data, context)``                     | merged state dict      |
| ``sequential``| SequentialMerge   | ``start(pretrained, context)``, ``absorb(state, name, expert)``, ``merged(state)`` | merged state dict after each expert |
| ``per_task``  | PerTaskMethod     | ``models(pool)``                                   | {task: state dict}     |
| ``routed``    | RoutedMethod      | ``build(pool, data, context)``                     | :class:`RoutedModel`   |
| ``ensemble``  | EnsembleMethod    | ``combiner(names)``                                | logits combiner        |

- ``pretrained`` and every expert are ``Mapping[str, Tensor]`` in the pool's canonical key layout,
  usually read lazily tensor by tensor; ``experts`` maps expert name -> state dict, in pool order.
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
    from fusion_bench.taskpool.data import TaskData

Kind = Literal["merge", "data_merge", "sequential", "per_task", "routed", "ensemble"]
STATE_DICT_KINDS: tuple[Kind, ...] = ("merge", "data_merge", "sequential")

Experts = Mapping[str, StateDict]  # expert name -> (lazy) state dict, in the pool's order
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


class RoutedModel(nn.Module):
    """An image tower whose forward picks or mixes experts per input: ``forward(images (B, 3, H,
    W)) -> features (B, D)`` in the joint image-text space (what the pool's zero-shot heads
    expect). ``stored_parameters()`` is what it keeps, for the storage factor in reports."""

    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers())


class RoutedMethod(Hyperparameters):
    """Builds a :class:`RoutedModel` from the pool (and task data, for trained routers)."""

    kind: ClassVar[Kind] = "routed"

    def build(self, pool: Any, data: TaskData, context: Context) -> RoutedModel:
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
    import dataclasses

    if method.kind in STATE_DICT_KINDS:
        state = merged_state_dict(method, pool, data, context, label)
        return merged_classifier(pool, state), state
    if method.kind == "per_task":
        return PerTaskClassifiers(pool, method.models(pool)), None
    if method.kind == "routed":
        routed = method.build(pool, data, context)
        return dataclasses.replace(pool.classifier(routed), features=_call), None
    if method.kind == "ensemble":
        from fusion_bench.method.ensemble import ensemble_classifier

        return ensemble_classifier(pool, method.combiner(list(pool.expert_names))), None
    raise FusionBenchError(f"{type(method).__name__} has an unknown kind {method.kind!r}.")


def merged_classifier(pool: Any, state: StateDict):
    """The zero-shot classifier of a merged state dict, refused if it holds NaN/Inf."""
    check_finite(state)
    return pool.classifier(pool.build_encoder(state))


def _call(module: nn.Module, images: Tensor) -> Tensor:
    return module(images)


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
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
