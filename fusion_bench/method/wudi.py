"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099).

The task vector of a linear layer approximately spans that layer's inputs, so each expert's own
task vector stands in for its data. For every linear weight, the merged update τ_m minimises the
interference each task suffers on its own "inputs", weighted by the inverse squared norm of its
task vector:

    L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F,

by ``steps`` iterations of Adam (learning rate ``lr``, betas (0.9, 0.999), ε 1e-8, no weight
decay), starting from the task-arithmetic sum Σ_t τ_t; θ = θ0 + τ_m, with no scaling coefficient.
The defaults are the authors' ViT code (github.com/nathanielyvo/WUDI-Merging, ``vit/wudi_main.py``):
300 steps at 1e-5, only the attention and MLP weights of the transformer blocks are optimised
(``linear_keys``), everything else stays at θ0 (``other_keys: pretrained``). Their open_clip
towers hold q, k and v as one fused ``in_proj_weight``; on Hugging Face towers ``group_qkv``
optimises the three as that one fused matrix (they share the input, so they share the loss's Gram
matrix; the result is the same as on a fused layout). FusionBench 0.2.33's ``WUDIMerging`` is
``linear_keys=["*"] other_keys=average group_qkv=false`` (every 2-D tensor optimised on its own,
the rest averaged) with ``iter_num: 400``.

Computation. The loss is a quadratic in τ_m: with G_t = τ_tᵀ τ_t, A = Σ_t G_t / ‖τ_t‖²,
B = Σ_t τ_t G_t / ‖τ_t‖² and c = Σ_t ‖G_t‖²_F / ‖τ_t‖², L = ⟨τ_m A, τ_m⟩ − 2⟨τ_m, B⟩ + c and
∇L = 2(τ_m A − B). A, B and c are accumulated once, expert by expert, in float64; each Adam step
then costs one float64 product τ_m A (m·n² multiply-adds) instead of the 2·N·m²·n of
differentiating the N products (τ_m − τ_t) τ_tᵀ (what the reference does, in float32, on a GPU).
Same gradient, same optimiser: the tests compare with torch autograd on the loss as written, and
``benchmarks/parity.py`` with FusionBench (see docs/methods/wudi.md). An expert whose task vector
is exactly zero in a layer has no inputs to protect there and contributes no loss term.

Run: ``fusion_bench method=wudi``
Memory: key by key, expert by expert. Per linear layer (m×n) A (n×n) and six m×n float64 matrices
(B, τ_m, τ_m A, the gradient, Adam's two moments), for ``torch.get_num_threads()`` layers at a
time: the layers of a window are optimised together, one thread each
(:func:`fusion_bench.tensor_ops.parallel_map`; on a busy 2-core machine a single-threaded
192-wide layer stepped 10× faster than a two-threaded one). Independent of N. The loss of every
layer (first → last step) is logged and shown on the progress bar. Time: ``steps`` float64
products τ_m A per linear layer, ~1.1e10 multiply-adds per ViT-B/32 block and step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, require_experts
from fusion_bench.tensor_ops import (
    BLOCK_LINEAR_KEYS,
    GroupedKeys,
    StateDict,
    expert_tensor,
    fused_groups,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)

log = logging.getLogger(__name__)

OTHER_KEYS = ("pretrained", "average")
Terms = tuple[Tensor, Tensor, float, Tensor]  # (A, B, c, Σ τ_t) of one layer's loss


@dataclass(frozen=True)
class Wudi(StateDictMerge):
    steps: int = 300  # Adam iterations per layer (authors' --iter; FusionBench's YAML: 400)
    lr: float = 1e-5  # Adam learning rate (authors and FusionBench)
    # fnmatch patterns of the 2-D weights optimised (default: the blocks' attention + MLP weights)
    linear_keys: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_KEYS))
    group_qkv: bool = True  # q/k/v_proj of one attention layer optimised as one fused in_proj
    other_keys: str = "pretrained"  # the rest: "pretrained" (θ0, authors) | "average" (FusionBench)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if self.steps < 0:
            raise FusionBenchError(
                f"method.steps={self.steps} must be ≥ 0: it is the number of Adam iterations per "
                "layer (the authors use 300; 0 keeps the task-arithmetic sum Σ τ_t)."
            )
        if not 0.0 < self.lr < float("inf"):
            raise FusionBenchError(
                f"method.lr={self.lr} must be a positive, finite learning rate (the authors and "
                "FusionBench use 1e-5)."
            )
        if self.other_keys not in OTHER_KEYS:
            raise FusionBenchError(
                f"method.other_keys={self.other_keys!r} is not one of {list(OTHER_KEYS)}: "
                "'pretrained' keeps the tensors that are not optimised at θ0 (the authors' code), "
                "'average' gives them the mean task vector (FusionBench)."
            )

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        require_experts(experts, "WUDI")
        groups = fused_groups(pretrained, self.optimised, self.group_qkv)
        window = max(1, torch.get_num_threads())  # layers optimised at once, one thread each
        waiting: list[tuple[Sequence[str], Sequence[Tensor], list[Tensor], Terms]] = []
        bar = None

        def tracked(keys: Iterable[str]) -> Iterable[str]:
            nonlocal bar
            bar = progress(keys)
            return bar

        def descend(item) -> tuple[Tensor, list[float]]:
            return adam_descent(item[3], self.steps, self.lr)

        def flush() -> None:  # optimise the waiting layers, fill their outputs
            for (keys, bases, outputs, _), (merged, losses) in zip(
                waiting, parallel_map(descend, waiting), strict=True
            ):
                label = keys[0] if len(keys) == 1 else "+".join(keys)
                log.info(
                    "WUDI %s: loss %.6g -> %.6g (%d steps)",
                    label,
                    losses[0],
                    losses[-1],
                    self.steps,
                )
                if bar is not None and hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"loss {losses[0]:.3g}→{losses[-1]:.3g}", refresh=False)
                parts = merged.split([b.shape[0] for b in bases])
                for out, base, part in zip(outputs, bases, parts, strict=True):
                    out.copy_(base.to(torch.float64) + part)
            waiting.clear()

        def merge_group(keys: Sequence[str], bases: Sequence[Tensor]) -> list[Tensor]:
            def task_vectors():  # one expert's (fused) task vector at a time, float64
                for name, expert in experts.items():
                    yield torch.cat(
                        [
                            expert_tensor(expert, k, b, name).to(torch.float64)
                            - b.to(torch.float64)
                            for k, b in zip(keys, bases, strict=True)
                        ]
                    )

            outputs = [torch.empty_like(b) for b in bases]  # filled when its window is optimised
            waiting.append((keys, bases, outputs, interference_terms(task_vectors())))
            if len(waiting) >= window:
                flush()
            return outputs

        def merge_other(key: str, base: Tensor) -> Tensor:
            if self.other_keys == "pretrained":
                return base.clone()
            return base + task_vector_sum(experts, key, base) / len(experts)

        merge_key = GroupedKeys(pretrained, groups, merge_group, merge_other)
        out = map_keys(
            pretrained, merge_key, self.exclude_keys, tracked if progress is not None else None
        )
        flush()
        return out

    def optimised(self, key: str, base: Tensor) -> bool:
        return (
            base.dim() == 2
            and is_excluded(key, self.linear_keys)
            and not is_excluded(key, self.exclude_keys)
        )


def interference_terms(task_vectors: Iterable[Tensor]) -> Terms:
    """(A, B, c, Σ τ_t) of the loss L(M) = ⟨M A, M⟩ − 2⟨M, B⟩ + c, accumulated in float64 from the
    task vectors of one layer, given one at a time. Zero task vectors add no term."""
    a = b = total = None
    c = 0.0
    for tau in task_vectors:
        tau = tau.to(torch.float64)
        if total is None:
            total = torch.zeros(tau.shape, dtype=torch.float64)  # contiguous
            a = torch.zeros(tau.shape[1], tau.shape[1], dtype=torch.float64)
            b = torch.zeros(tau.shape, dtype=torch.float64)
        total += tau
        norm2 = float(tau.square().sum())
        if norm2 == 0.0:
            continue
        # τ_t G_t = (τ_t τ_tᵀ) τ_t and ‖G_t‖ = ‖τ_t τ_tᵀ‖: go through the smaller Gram matrix
        if tau.shape[0] < tau.shape[1]:
            a.addmm_(tau.T, tau, alpha=1.0 / norm2)
            small = tau @ tau.T
            b.addmm_(small, tau, alpha=1.0 / norm2)
        else:
            small = tau.T @ tau  # G_t
            a.add_(small, alpha=1.0 / norm2)
            b.addmm_(tau, small, alpha=1.0 / norm2)
        c += float(small.square().sum()) / norm2
    if total is None:
        raise FusionBenchError("WUDI needs at least one expert in the model pool.")
    return a, b, c, total


def optimise_layer(
    task_vectors: Iterable[Tensor], steps: int, lr: float
) -> tuple[Tensor, list[float]]:
    """The merged update τ_m of one layer (float64) and the loss before every Adam step and after
    the last (``steps + 1`` values): Adam from Σ τ_t on Σ_t ‖(τ_m − τ_t) τ_tᵀ‖² / ‖τ_t‖²."""
    return adam_descent(interference_terms(task_vectors), steps, lr)


def adam_descent(terms: Terms, steps: int, lr: float) -> tuple[Tensor, list[float]]:
    """:func:`optimise_layer` from the layer's :func:`interference_terms` (updates Σ τ_t in
    place)."""
    a, b, c, merged = terms
    adam = Adam(merged, lr)
    ma, grad = torch.empty_like(merged), torch.empty_like(merged)
    flat, flat_ma, flat_b = merged.view(-1), ma.view(-1), b.view(-1)
    losses = []
    for step in range(steps + 1):
        torch.mm(merged, a, out=ma)
        losses.append(float(torch.dot(flat_ma, flat) - 2.0 * torch.dot(flat, flat_b)) + c)
        if step < steps:
            adam.step(torch.sub(ma, b, out=grad).mul_(2.0))
    return merged, losses


class Adam:
    """Adam (Kingma & Ba) on one tensor, updated in place, with torch.optim.Adam's defaults and
    arithmetic (betas (0.9, 0.999), ε = 1e-8 added to the bias-corrected √v, no weight decay):
    the optimiser both references use. Written out because constructing a torch optimiser imports
    torch._dynamo, seconds on a busy CPU, for a loop this small."""

    def __init__(self, param: Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t = 0

    def step(self, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.v.sqrt() / math.sqrt(1 - beta2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - beta1**self.t))
