"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

θ(λ) = θ0 + Σ_i λ_i ⊙ τ_i with τ_i = θ_i − θ0, where λ is learned at test time: one λ_i per expert
(``granularity: task``) or one λ_{i,l} per expert and parameter tensor l (``granularity: layer``),
by minimising the Shannon entropy of the merged model's zero-shot predictions on *unlabeled* test
batches of every task (summed over tasks), with Adam and λ projected onto [0, 1] after each step.
AdaMerging++ (``ties_threshold``) first replaces the τ_i by their TIES-trimmed, sign-elected
versions (:func:`fusion_bench.method.ties_merging.ties_trim_and_elect`).

Run: ``fusion_bench method=adamerging_layer_wise`` (or ``adamerging_task_wise``,
``adamerging_plusplus``); ``method.weights=<path>`` re-evaluates saved λ without adapting.
Memory: θ0 (the one image tower module) + N stacked task vectors in ``task_vector_dtype`` + the
merged parameters and their gradient during a step + activations of N batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, DataMerge, Experts, pool_experts
from fusion_bench.method.ties_merging import ties_keep_rank
from fusion_bench.taskpool.data import TaskData
from fusion_bench.tensor_ops import StateDict, expert_tensor, mergeable_keys

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- maths -----------------------------------------------------------------------------------
def stack_task_vectors(
    pretrained: StateDict,
    experts: Experts,
    keys: Sequence[str],
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """key -> (N, *shape) stacked τ_i = θ_i − θ0, computed in float32 and stored in ``dtype``,
    one key at a time (lazy experts are read one tensor at a time)."""
    out = {}
    for key in keys:
        base = pretrained[key].float()
        out[key] = torch.stack(
            [expert_tensor(e, key, base, n) - base for n, e in experts.items()]
        ).to(dtype)
    return out


def merge_with_lambdas(
    pretrained: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], lambdas: Tensor
) -> dict[str, Tensor]:
    """θ0 + Σ_i λ_i τ_i for every key of ``task_vectors`` (differentiable in λ).

    ``lambdas``: (N,) task-wise, or (N, L) layer-wise with column l for the l-th key of
    ``task_vectors``. The weighted sum is one (N,) @ (N, P_key) product in the task vectors' dtype:
    autograd keeps a reference to τ, not a float32 copy of it."""
    out = {}
    for layer, (key, tv) in enumerate(task_vectors.items()):  # tv: (N, *shape)
        lam = lambdas if lambdas.dim() == 1 else lambdas[:, layer]  # (N,)
        delta = (lam.to(tv.dtype) @ tv.flatten(1)).view(tv.shape[1:])
        out[key] = pretrained[key] + delta.to(pretrained[key].dtype)
    return out


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of softmax(logits): (B, C) -> scalar."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def with_params(module: nn.Module, params: Mapping[str, Tensor]):
    """``module`` as a callable with the same signature that runs on ``params`` (via
    ``torch.func.functional_call``), so pool feature functions (``enc(images)`` for open_clip,
    ``enc(pixel_values=...)`` for Hugging Face) work unchanged."""
    return lambda *args, **kwargs: functional_call(module, params, args, kwargs)


def clamp_lambdas_(lambdas: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Project λ onto [low, high] in place (after each optimiser step)."""
    with torch.no_grad():
        return lambdas.clamp_(low, high)


# -- the method ------------------------------------------------------------------------------
class _Lambdas(nn.Module):
    """λ as the only parameter; θ0 and τ are plain attributes (not buffers), so Fabric's precision
    plugins never cast them and DDP never broadcasts them."""

    def __init__(
        self, init: Tensor, pretrained: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]
    ):
        super().__init__()
        self.value = nn.Parameter(init)
        self.merge_inputs = (pretrained, task_vectors)

    def forward(self) -> dict[str, Tensor]:
        # Parameter construction stays in full precision even under fabric.autocast (an autocast
        # matmul would make and keep a half-precision copy of every τ).
        with torch.autocast(self.value.device.type, enabled=False):
            return merge_with_lambdas(*self.merge_inputs, self.value)


@dataclass(frozen=True)
class AdaMerging(DataMerge):
    granularity: str = "layer"  # task: one λ per expert; layer: one per expert and tensor
    init_value: float = 0.3  # the paper's prior (task arithmetic's usual λ)
    lr: float = 1e-3  # Adam, betas (0.9, 0.999), as the paper
    max_steps: int = 1000  # FusionBench's default (the paper: 500)
    batch_size: int = 16  # unlabeled test images per task and step, as the paper
    clamp: bool = True  # project λ onto [0, 1] after each step
    ties_threshold: float | None = None  # a percentage (e.g. 20) = AdaMerging++
    task_vector_dtype: str = "float32"  # bfloat16/float16 halve the N task vectors held
    weights: str | None = None  # saved λ (.json/.safetensors): evaluate them, skip adaptation
    # where learned λ go (.json + .safetensors); relative to the run's output directory
    save_weights: str | None = "adamerging_weights"
    log_every: int = 10  # steps between tta/* logs (loss, per-task entropy, λ stats)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0
    seed: int = 42  # order of the test batches (42: the run's default seed)
    # per step: tta/loss, tta/step_s, per-task entropy (filled by merge(); not a hyper-parameter)
    history: list[dict[str, float]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if self.granularity not in ("task", "layer"):
            raise FusionBenchError(
                f"method.granularity is '{self.granularity}': use 'task' (one λ per expert) or "
                "'layer' (one λ per expert and parameter tensor)."
            )
        if self.task_vector_dtype not in DTYPES:
            raise FusionBenchError(
                f"method.task_vector_dtype is '{self.task_vector_dtype}'; use one of "
                f"{list(DTYPES)}."
            )
        if self.ties_threshold is not None:
            ties_keep_rank(1, self.ties_threshold)  # a percentage in [0, 100], checked early

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.task_vector_dtype]

    def models_held(self, n_experts: int) -> float:
        """θ0 + N task vectors (in their dtype) + merged parameters and their gradient; AdaMerging++
        first holds the N float32 TIES task vectors and the elected signs."""
        held = 3.0 + n_experts * self.dtype.itemsize / 4
        return max(held, 2.0 + n_experts) if self.ties_threshold is not None else held

    def merge(self, pool, data: TaskData, context: Context) -> dict[str, Tensor]:
        fabric = context.fabric
        if fabric is None:
            from lightning.fabric import Fabric

            fabric = Fabric(accelerator="cpu", devices=1, loggers=[])
        names = list(pool.expert_names)
        encoder = pool.build_encoder().to(fabric.device).requires_grad_(False)
        theta0 = encoder.state_dict()  # the module's own tensors: θ0 is not copied
        keys = list(mergeable_keys(theta0, self.exclude_keys))
        if self.weights:  # checked before any heavy work
            lambdas = load_lambdas(self.weights, names, keys, self.ties_threshold)
        task_vectors = self._task_vectors(pool, keys, fabric.device)
        shape = (len(names),) if self.granularity == "task" else (len(names), len(keys))
        if not self.weights:
            steps = 1 if context.fast_dev_run else self.max_steps
            lambdas = self._adapt(pool, data, encoder, theta0, task_vectors, fabric, shape, steps)
            stem = self._save_stem(context)
            if stem is not None and fabric.is_global_zero:
                save_lambdas(lambdas, stem, names, keys, self.ties_threshold)
        with torch.no_grad():
            merged = merge_with_lambdas(theta0, task_vectors, lambdas.to(fabric.device))
        return {k: merged.get(k, theta0[k]).detach().float().cpu() for k in theta0}

    def _save_stem(self, context: Context) -> str | None:
        if not self.save_weights:
            return None
        path = Path(self.save_weights).expanduser()
        if path.is_absolute():
            return str(path)
        if context.output_dir is None:
            log.info("learned λ not saved: no output directory (give an absolute save_weights)")
            return None
        return str(Path(context.output_dir) / path)

    def _task_vectors(self, pool, keys, device) -> dict[str, Tensor]:
        pretrained, experts = pool.pretrained(), pool_experts(pool)
        if self.ties_threshold is None:
            tvs = stack_task_vectors(pretrained, experts, keys, self.dtype)
            return {k: v.to(device) for k, v in tvs.items()}
        from fusion_bench.method.ties_merging import ties_trim_and_elect

        trimmed = ties_trim_and_elect(pretrained, experts, self.ties_threshold, self.exclude_keys)
        out = {}
        for key in keys:  # pop as we go: the float32 TIES vectors are freed key by key
            out[key] = torch.stack([tv.pop(key).float() for tv in trimmed]).to(device, self.dtype)
        return out

    def _adapt(
        self, pool, data: TaskData, encoder, theta0, task_vectors, fabric, shape, steps: int
    ) -> Tensor:
        from tqdm.auto import tqdm

        names = list(pool.expert_names)
        classifier = pool.classifier(encoder)
        heads = {t: data.zero_shot_head(classifier, t, fabric.device) for t in names}  # frozen
        seed = self.seed + 1000 * fabric.global_rank  # each rank sees its own batches
        batches = {
            t: unlabeled_batches(data, t, classifier.preprocess, self.batch_size, seed)
            for t in names
        }

        module = _Lambdas(torch.full(shape, float(self.init_value)), theta0, task_vectors)
        optimizer = torch.optim.Adam(module.parameters(), lr=self.lr, betas=(0.9, 0.999))
        module, optimizer = fabric.setup_module(module), fabric.setup_optimizers(optimizer)
        lambdas = next(module.parameters())  # the λ tensor itself (after any device move)
        self.history.clear()  # this run's steps only
        bar = tqdm(range(steps), desc="adamerging", unit="step")
        for step in bar:
            start = time.perf_counter()
            params = module()  # θ(λ) with the autograd graph back to λ
            model = dataclasses.replace(classifier, encoder=with_params(encoder, params))
            losses = {}
            for task in names:
                images = next(batches[task]).to(fabric.device)  # (B, 3, H, W); labels never read
                with fabric.autocast():
                    losses[task] = entropy(model.logits(images, heads[task]))
            loss = torch.stack(list(losses.values())).sum()
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            if self.clamp:
                clamp_lambdas_(lambdas)
            record = {
                "tta/loss": loss.item(),
                "tta/step_s": time.perf_counter() - start,
                **{f"tta/{t}/entropy": v.item() for t, v in losses.items()},
            }
            del params, model, losses, loss  # or the next step's merge would coexist with these
            self.history.append(record)
            bar.set_postfix(loss=f"{record['tta/loss']:.4f}")
            if step % self.log_every == 0 or step == steps - 1:
                lam = lambdas.detach()
                record |= {
                    "tta/lambda_mean": lam.mean().item(),
                    "tta/lambda_min": lam.min().item(),
                    "tta/lambda_max": lam.max().item(),
                }
                fabric.log_dict(record, step=step)
        return lambdas.detach().float().cpu()


def unlabeled_batches(
    data: TaskData, task: str, preprocess, batch_size: int, seed: int
) -> Iterator[Tensor]:
    """Endless image batches of ``task``'s test split, reshuffled each pass (seed + pass)."""
    ds = data.load_split(task, "test")
    for epoch in itertools.count():
        shuffled = ds.shuffle(seed=seed + epoch, keep_in_memory=True)
        for images, _labels in data.loader(shuffled, task, preprocess, batch_size):
            yield images


# -- saving and loading λ ---------------------------------------------------------------------
def save_lambdas(
    lambdas: Tensor,
    stem: str,
    names: Sequence[str],
    keys: Sequence[str],
    ties_threshold: float | None,
) -> None:
    """``<stem>.safetensors`` (the tensor, exact) and ``<stem>.json`` (readable, also loadable)."""
    from safetensors.torch import save_file

    info = {
        "experts": list(names),
        "keys": list(keys) if lambdas.dim() == 2 else None,
        "ties_threshold": ties_threshold,
    }
    path = Path(stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"lambdas": lambdas.contiguous()},
        str(path.with_suffix(".safetensors")),
        {"info": json.dumps(info)},
    )
    path.with_suffix(".json").write_text(
        json.dumps({**info, "lambdas": lambdas.tolist()}, indent=1)
    )
    log.info("learned λ saved to %s.{json,safetensors}", path)


def load_lambdas(
    location: str, names: Sequence[str], keys: Sequence[str], ties_threshold: float | None
) -> Tensor:
    """λ saved by :func:`save_lambdas` (either file), checked against this pool and method."""
    path = Path(location).expanduser()
    if path.suffix not in (".json", ".safetensors"):
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FusionBenchError(
            f"method.weights '{path}' does not exist. Point it at the adamerging_weights.json or "
            ".safetensors file written by an earlier run (in its output directory)."
        )
    if path.suffix == ".json":
        info = json.loads(path.read_text())
        lambdas = torch.tensor(info.pop("lambdas"), dtype=torch.float32)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            info, lambdas = json.loads(f.metadata()["info"]), f.get_tensor("lambdas").float()
    if info["experts"] != list(names):
        raise FusionBenchError(
            f"'{path}' holds λ for experts {info['experts']} but the pool has {list(names)} (in "
            "this order). Use the model pool the weights were learned with."
        )
    if lambdas.dim() == 2 and info["keys"] != list(keys):
        raise FusionBenchError(
            f"'{path}' holds layer-wise λ for other parameter tensors than this pool's image tower "
            "(different architecture or exclude_keys). Use the settings it was learned with."
        )
    if info.get("ties_threshold") != ties_threshold:
        raise FusionBenchError(
            f"'{path}' was learned with ties_threshold={info.get('ties_threshold')} but "
            f"method.ties_threshold={ties_threshold}: use the method config it was learned with "
            "(adamerging_plusplus vs adamerging_*_wise)."
        )
    return lambdas
