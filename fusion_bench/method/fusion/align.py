"""Neuron groups of the ViT tower, maps between two towers' neurons, and the solvers that find them.

A **group** is a set of neurons that one map re-orders jointly (Git Re-Basin's "permutation
spec"): the residual stream ``res`` (one map for the whole tower: patch/class/position
embeddings, every LayerNorm, every output of out_proj and c_proj, the inputs of in_proj, c_fc and
proj), per block ``qk.i`` (queries and keys share a map so that q·k is kept), ``v.i`` (values and
out_proj's input) and ``mlp.i`` (the hidden neurons of c_fc / c_proj).

A **map** of a group is a non-negative coupling ``T`` (n_model × n_anchor): a permutation matrix
(weight/activation matching, OT with EMD at equal widths) or a transport plan (Sinkhorn; EMD at
unequal widths). :func:`apply_maps` writes a model in the anchor's neuron basis:

- where a tensor *produces* the group's neurons (rows of a weight, a bias, a LayerNorm gain, an
  embedding), anchor neuron j becomes the T-weighted *mean* of the model's neurons:
  ``x'_j = Σ_i T_ij x_i / Σ_i T_ij`` (columns normalised);
- where a tensor *consumes* them (columns of the next weight), the model's neuron i hands its
  weight to the anchor neurons in proportion: ``W'_{:,j} = Σ_i W_{:,i} T_ij / Σ_j' T_ij'`` (rows
  normalised), so a neuron merged into one anchor neuron keeps its full contribution.

For a permutation both are the permutation itself and the aligned model computes exactly the same
function (LayerNorm and GELU commute with permutations). At equal widths with uniform marginals the
two normalisations coincide with Imfeld et al.'s ``T · n``; at unequal widths they differ from it
(docs/methods/fusion/ot_fusion.md says how and why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.fusion.tower import TowerSpec, block


@dataclass(frozen=True)
class Use:
    """One place a group's neurons live: axis ``axis`` of ``key`` (only the ``part``-th of three
    equal chunks for in_proj's fused q/k/v rows), producing (``out``) or consuming them."""

    key: str
    axis: int
    out: bool
    part: int | None = None


def groups(spec: TowerSpec) -> dict[str, list[Use]]:
    """Every group of the tower, in forward order, with the tensors it touches."""
    res = [
        Use("conv1.weight", 0, True),
        Use("class_embedding", 0, True),
        Use("positional_embedding", 1, True),
        Use("ln_pre.weight", 0, True),
        Use("ln_pre.bias", 0, True),
    ]
    per_block: dict[str, list[Use]] = {}
    for i in range(spec.layers):
        p = block(i)
        res += [
            Use(p + "ln_1.weight", 0, True),
            Use(p + "ln_1.bias", 0, True),
            Use(p + "attn.in_proj_weight", 1, False),
            Use(p + "attn.out_proj.weight", 0, True),
            Use(p + "attn.out_proj.bias", 0, True),
            Use(p + "ln_2.weight", 0, True),
            Use(p + "ln_2.bias", 0, True),
            Use(p + "mlp.c_fc.weight", 1, False),
            Use(p + "mlp.c_proj.weight", 0, True),
            Use(p + "mlp.c_proj.bias", 0, True),
        ]
        per_block[f"qk.{i}"] = [
            Use(p + key, 0, True, part)
            for key in ("attn.in_proj_weight", "attn.in_proj_bias")
            for part in (0, 1)  # queries, keys
        ]
        per_block[f"v.{i}"] = [
            Use(p + "attn.in_proj_weight", 0, True, 2),
            Use(p + "attn.in_proj_bias", 0, True, 2),
            Use(p + "attn.out_proj.weight", 1, False),
        ]
        per_block[f"mlp.{i}"] = [
            Use(p + "mlp.c_fc.weight", 0, True),
            Use(p + "mlp.c_fc.bias", 0, True),
            Use(p + "mlp.c_proj.weight", 1, False),
        ]
    res += [Use("ln_post.weight", 0, True), Use("ln_post.bias", 0, True), Use("proj", 0, False)]
    return {"res": res, **per_block}


def group_size(spec: TowerSpec, group: str) -> int:
    if group.startswith("mlp."):
        return spec.mlp[int(group.split(".")[1])]
    return spec.width


# -- applying maps -----------------------------------------------------------------------------
def _along(x: Tensor, axis: int, m: Tensor) -> Tensor:
    """``y`` with ``y[..j..] = Σ_i m[i, j] x[..i..]`` along ``axis``."""
    return torch.movedim(torch.tensordot(m, torch.movedim(x, axis, 0), dims=([0], [0])), 0, axis)


def producing(t: Tensor) -> Tensor:
    """The coupling normalised for the producing side (columns sum to 1)."""
    return t / t.sum(dim=0, keepdim=True).clamp_min(1e-30)


def consuming(t: Tensor) -> Tensor:
    """The coupling normalised for the consuming side (rows sum to 1)."""
    return t / t.sum(dim=1, keepdim=True).clamp_min(1e-30)


def apply_maps(
    state: Mapping[str, Tensor],
    spec: TowerSpec,
    maps: Mapping[str, Tensor],
    keep_chunks: bool = False,
) -> dict[str, Tensor]:
    """``state`` (float) written in the anchor's neuron basis through ``maps`` ({group: T}); a
    group without a map is left as it is (identity). Tensors no group touches are copied;
    ``state`` may be a subset of the tower's keys (only those are written). ``keep_chunks``:
    in_proj's tensors stay lists of their q/k/v chunks (whose sizes differ while only some maps
    between models of different widths are applied)."""
    # in_proj's fused rows are held as their q/k/v chunks (their maps may change their sizes)
    out: dict[str, Tensor | list[Tensor]] = {
        k: list(v.chunk(3, dim=0))
        if k.endswith("attn.in_proj_weight") or k.endswith("attn.in_proj_bias")
        else v
        for k, v in state.items()
    }
    uses = groups(spec)
    for group, t in maps.items():
        n = group_size(spec, group)
        if t.shape[0] != n:
            raise FusionBenchError(
                f"The map of group {group} has {t.shape[0]} rows for {n} neurons (internal error)."
            )
        prod, cons = producing(t), consuming(t)
        for use in uses[group]:
            if use.key not in out:
                continue
            m = prod if use.out else cons
            x = out[use.key]
            if isinstance(x, list):  # in_proj: one chunk's rows, or the columns of all three
                parts = [use.part] if use.part is not None else range(3)
                for p in parts:
                    x[p] = _along(x[p], use.axis, m.to(x[p].dtype))
            else:
                out[use.key] = _along(x, use.axis, m.to(x.dtype))
    if keep_chunks:
        return out
    return {k: torch.cat(v, dim=0) if isinstance(v, list) else v for k, v in out.items()}


def rows(x: Tensor | list[Tensor], axis: int, part: int | None) -> Tensor:
    """The group's axis first (one q/k/v chunk of in_proj if ``part``; ``x`` may be the list of
    chunks), flattened: (n, rest)."""
    if isinstance(x, list):
        x = x[part] if part is not None else torch.cat(x, dim=0)
    elif part is not None:
        x = x.chunk(3, dim=0)[part]
    return torch.movedim(x, axis, 0).reshape(x.shape[axis], -1)


# -- solvers -----------------------------------------------------------------------------------
def permutation_matrix(cols: np.ndarray, n_cols: int | None = None) -> Tensor:
    """T with T[i, cols[i]] = 1 (model neuron i -> anchor neuron cols[i])."""
    t = torch.zeros(len(cols), n_cols or len(cols), dtype=torch.float64)
    t[torch.arange(len(cols)), torch.as_tensor(cols, dtype=torch.long)] = 1.0
    return t


def assign(cost: Tensor) -> Tensor:
    """The permutation of least total cost (SciPy's linear_sum_assignment); cost (n_model,
    n_anchor), equal sizes."""
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().double().cpu().numpy()
    if c.shape[0] != c.shape[1]:
        raise FusionBenchError(
            f"A permutation needs two groups of the same size, got {c.shape[0]} and {c.shape[1]} "
            "neurons: permutation methods (weight_matching, activation_matching, pleas) need "
            "models of equal width; fusion/ot_fusion fuses models of different widths."
        )
    if not np.isfinite(c).all():
        raise FusionBenchError(
            "The alignment cost has NaN/Inf entries: a model has non-finite weights or activations."
        )
    rows, cols = linear_sum_assignment(c)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return permutation_matrix(out)


def assign_heads(costs: list[Tensor], heads: int) -> list[Tensor]:
    """Least-cost permutations of a block's attention neurons that respect multi-head attention's
    symmetries: whole heads move together, by **one** head assignment shared by queries, keys and
    values (a head's attention pattern must stay with its values), and neurons permute inside a
    head, one way for queries and keys (``costs[0]``, q·k kept) and another for values
    (``costs[1]``). For every pair of heads (a, b): the best within-head assignment of each cost;
    then the best head assignment on their summed costs (the hierarchical matching the Git
    Re-Basin authors suggest for attention)."""
    from scipy.optimize import linear_sum_assignment

    n = costs[0].shape[0]
    if any(c.shape != (n, n) for c in costs):
        raise FusionBenchError(
            "Head-structured permutations need two blocks of the same width; use "
            "fusion/ot_fusion for models of different widths."
        )
    d = n // heads
    cs = [c.detach().double().cpu().numpy() for c in costs]
    inner: dict[tuple[int, int], list[np.ndarray]] = {}
    head_cost = np.zeros((heads, heads))
    for a in range(heads):
        for b in range(heads):
            inner[a, b] = []
            for c in cs:
                sub = c[a * d : (a + 1) * d, b * d : (b + 1) * d]
                r, k = linear_sum_assignment(sub)
                inner[a, b].append(k)
                head_cost[a, b] += sub[r, k].sum()
    ha, hb = linear_sum_assignment(head_cost)
    out = []
    for i in range(len(cs)):
        cols = np.empty(n, dtype=np.int64)
        for a, b in zip(ha, hb, strict=True):
            cols[a * d : (a + 1) * d] = b * d + inner[a, b][i]
        out.append(permutation_matrix(cols))
    return out


def units(spec: TowerSpec) -> list[tuple[str, ...]]:
    """The groups a permutation method solves together: the residual stream, each block's
    attention (queries/keys with values: they share the head assignment) and each block's MLP."""
    out: list[tuple[str, ...]] = [("res",)]
    for i in range(spec.layers):
        out += [(f"qk.{i}", f"v.{i}"), (f"mlp.{i}",)]
    return out


def assign_unit(unit: tuple[str, ...], costs: list[Tensor], heads: int) -> dict[str, Tensor]:
    """{group: permutation} of least cost for one unit of :func:`units`."""
    if len(unit) == 2:
        return dict(zip(unit, assign_heads(costs, heads), strict=True))
    return {unit[0]: assign(costs[0])}


def transport(cost: Tensor, solver: str, reg: float) -> Tensor:
    """Optimal transport plan between uniform marginals (POT): ``emd`` (exact, a permutation at
    equal sizes) or ``sinkhorn`` (entropic, regularisation ``reg`` relative to the cost, which is
    divided by its maximum first, as Imfeld et al.)."""
    import ot

    c = cost.detach().double().cpu()
    if not torch.isfinite(c).all():
        raise FusionBenchError(
            "The transport cost has NaN/Inf entries: a model has non-finite weights or activations."
        )
    c = c / c.max().clamp_min(1e-30)
    n0, n1 = c.shape
    a = torch.full((n0,), 1.0 / n0, dtype=torch.float64)
    b = torch.full((n1,), 1.0 / n1, dtype=torch.float64)
    if solver == "emd":
        plan = ot.emd(a, b, c)
    else:
        plan = ot.sinkhorn(a, b, c, reg)
        if not torch.isfinite(plan).all() or plan.sum() <= 0:
            raise FusionBenchError(
                f"Sinkhorn with reg={reg} did not converge (NaN plan): raise method.reg (the "
                "authors use 0.06-0.08 on a max-normalised cost) or use method.solver=emd."
            )
    return plan.to(torch.float64)


Solve = Callable[[Tensor, str], Tensor]  # (cost (n_model, n_anchor), group) -> coupling
