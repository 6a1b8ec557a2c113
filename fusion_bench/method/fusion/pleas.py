"""PLeaS (Nasery, Hayase, Koh & Oh, CVPR 2025): permute with activation matching, merge partially
to a chosen width, then fit every layer of the merged model by least squares so that, fed the
parents' own (permuted, averaged) inputs, it reproduces the parents' (permuted, averaged) outputs.

1. **Matching**: activation matching of every model onto the anchor (:mod:`.activation_matching`).
2. **Partial merging** (``width`` w ∈ [1, K], the MLP's hidden width relative to a parent's): in
   every block the fraction r = (w − 1)/(K − 1) of hidden neurons whose matched activations
   differ most are *kept separately*, one copy per model (its own c_fc row; its c_proj column
   divided by K), the rest are averaged. w = 1 merges everything (the parents' size); w = K keeps
   every model's MLP (an exact ensemble of the MLPs). The residual stream and attention are merged
   fully: the authors' code does not handle attention, and a wider residual stream would change
   every head (docs page).
3. **Least squares**: for every linear map ℓ of the merged tower (conv1, in_proj, out_proj, c_fc,
   c_proj, proj), X_ℓ = the parents' inputs of ℓ written in the merged basis and averaged (kept
   separately for separate neurons), Y_ℓ likewise for ℓ's outputs; minimise Σ_ℓ mean((X_ℓ W_ℓᵀ +
   b_ℓ − Y_ℓ)²) with Adam (the authors: 400 steps, lr 5e-4, cosine decay, batches of 32 images),
   starting from step 2's weights. LayerNorms and embeddings keep step 2's values.

A permuted copy of the anchor is recovered exactly by steps 1–2 at every width (test). Step 3
then starts at zero loss, but Adam divides by the gradient's running scale, so round-off
gradients grow into updates of about ``lr``: the copy's outputs stay within 1 % (test).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/pleas method.width=1.5``
Memory: ~3K + 10 towers (fp32 equivalents) during step 3 — the K models, a float64 copy of each
for the teacher activations, the fitted weights in float64 with gradients and Adam's moments —
and the ``num_samples`` images (in memory for step 3's batches).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion import (
    Members,
    activation_stats,
    check_image_sample,
    image_batches,
    load_members,
    require_equal_shapes,
    tasks_of,
)
from fusion_bench.method.fusion.activation_matching import permutations
from fusion_bench.method.fusion.align import apply_maps
from fusion_bench.method.fusion.finetune import finish
from fusion_bench.method.fusion.tower import TowerSpec, block, forward


def separated(distances: list[Tensor], fraction: float) -> Tensor:
    """Indices of the anchor's hidden neurons kept separately: the ``fraction`` whose matched
    neurons (``distances[k][j]``: model k's matched neuron vs anchor neuron j) differ most."""
    n = distances[0].numel()
    count = round(fraction * n)
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    score = torch.stack(distances).mean(0)
    return torch.sort(torch.topk(score, count).indices).values


def partial_merge(aligned: list[dict[str, Tensor]], spec: TowerSpec, seps: Mapping[int, Tensor]):
    """The merged tower: everything averaged, except each block's separate hidden neurons
    ``seps[i]`` (indices in the anchor's order), which appear once per model after the merged
    ones. Returns (state, hidden layout per block: (merged indices, separate indices))."""
    k = len(aligned)
    out = {key: sum(s[key] for s in aligned) / k for key in aligned[0]}
    layout = {}
    for i in range(spec.layers):
        p = block(i) + "mlp."
        sep = seps.get(i, torch.zeros(0, dtype=torch.long))
        keep = torch.ones(spec.mlp[i], dtype=torch.bool)
        keep[sep] = False
        merged = keep.nonzero().squeeze(1)
        layout[i] = (merged, sep)
        if not len(sep):
            continue
        out[p + "c_fc.weight"] = torch.cat(
            [out[p + "c_fc.weight"][merged]] + [s[p + "c_fc.weight"][sep] for s in aligned]
        )
        out[p + "c_fc.bias"] = torch.cat(
            [out[p + "c_fc.bias"][merged]] + [s[p + "c_fc.bias"][sep] for s in aligned]
        )
        out[p + "c_proj.weight"] = torch.cat(
            [out[p + "c_proj.weight"][:, merged]]
            + [s[p + "c_proj.weight"][:, sep] / k for s in aligned],
            dim=1,
        )
    return out, layout


def fitted_maps(spec: TowerSpec) -> dict[str, tuple[str, str, str | None]]:
    """{weight key: (input, output, bias key)} of every linear map step 3 fits."""
    out = {"conv1.weight": ("patches", "conv", None), "proj": ("post", "out", None)}
    for i in range(spec.layers):
        p = block(i)
        out[p + "attn.in_proj_weight"] = (f"ln1.{i}", f"qkv.{i}", p + "attn.in_proj_bias")
        out[p + "attn.out_proj.weight"] = (f"ctx.{i}", f"attn.{i}", p + "attn.out_proj.bias")
        out[p + "mlp.c_fc.weight"] = (f"ln2.{i}", f"fc.{i}", p + "mlp.c_fc.bias")
        out[p + "mlp.c_proj.weight"] = (f"gelu.{i}", f"mlp.{i}", p + "mlp.c_proj.bias")
    return out


def group_of(node: str) -> str | None:
    """The neuron group an activation's columns belong to (None: not aligned)."""
    name, _, i = node.partition(".")
    if name in ("patches", "out"):
        return None
    if name in ("q", "k"):
        return f"qk.{i}"
    if name in ("v", "ctx"):
        return f"v.{i}"
    if name in ("fc", "gelu"):
        return f"mlp.{i}"
    return "res"


def merged_activations(
    acts: list[dict[str, Tensor]],
    perms: list[Mapping[str, Tensor]],
    layout: Mapping[int, tuple[Tensor, Tensor]],
    nodes: set[str],
) -> dict[str, Tensor]:
    """The parents' activations ``nodes`` in the merged basis: columns permuted to the anchor's
    order, averaged over the parents, the separate MLP neurons kept once per parent."""
    out = {}
    for node in nodes:
        if node.startswith("qkv."):
            i = node.split(".")[1]
            parts = [merged_activations(acts, perms, layout, {f"{c}.{i}"}) for c in "qkv"]
            out[node] = torch.cat([p[f"{c}.{i}"] for p, c in zip(parts, "qkv", strict=True)], 1)
            continue
        group = group_of(node)
        cols = [
            a[node] if group is None or group not in pm else a[node] @ pm[group].to(a[node].dtype)
            for a, pm in zip(acts, perms, strict=True)
        ]
        mean = sum(cols) / len(cols)
        if group is not None and group.startswith("mlp."):
            merged, sep = layout[int(group.split(".")[1])]
            if len(sep):
                mean = torch.cat([mean[:, merged]] + [c[:, sep] for c in cols], dim=1)
        out[node] = mean
    return out


def float64_parents(members: Members, device) -> dict[str, dict[str, Tensor]]:
    return {
        n: {k: v.to(device, torch.float64) for k, v in members.states[n].items()}
        for n in members.names
    }


def teacher(
    members: Members, perms, layout, images: Tensor, device, parents64=None
) -> dict[str, Tensor]:
    """Every fitted map's input and output for ``images``: the parents' own activations
    (float64; ``parents64``: the parents already in float64 on ``device``), written in the
    merged basis (:func:`merged_activations`)."""
    parents = [members.anchor, *members.others]
    parents64 = parents64 or float64_parents(members, device)
    maps = fitted_maps(members.specs[members.anchor])
    nodes = {n for inp, outp, _ in maps.values() for n in (inp, outp)}
    acts = []
    with torch.no_grad():
        for n in parents:
            x = images.to(device, torch.float64)
            features, a = forward(parents64[n], members.specs[n], x, record=True)
            a["out"] = features
            acts.append(a)
    eye = [{}] + [{g: t.to(device) for g, t in perms[n].items()} for n in parents[1:]]
    return merged_activations(acts, eye, layout, nodes)


def objective(params: Mapping[str, Tensor], target: Mapping[str, Tensor], spec: TowerSpec):
    """Σ over the fitted maps of mean((X Wᵀ + b − Y)²) (PLeaS's least-squares loss)."""
    loss = 0.0
    for key, (inp, outp, bias) in fitted_maps(spec).items():
        w = params[key]
        w2 = w.reshape(w.shape[0], -1) if key != "proj" else w.T
        pred = target[inp] @ w2.T.to(target[inp].dtype)
        if bias is not None:
            pred = pred + params[bias].to(pred.dtype)
        loss = loss + ((pred - target[outp]) ** 2).mean()
    return loss


def least_squares(
    state: dict[str, Tensor],
    members: Members,
    perms: Mapping[str, Mapping[str, Tensor]],
    layout,
    images: Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
) -> dict[str, Tensor]:
    """Step 3: Adam on the fitted maps of ``state`` against the parents' teacher-forced
    activations, in float64 (round-off gradients are what Adam amplifies at a zero-loss start).
    Each step's batch is drawn with replacement from ``images`` (the authors iterate a shuffled
    loader over their training sets)."""
    from tqdm.auto import tqdm

    spec = members.specs[members.anchor]
    params = {}
    for key, (_, _, bias) in fitted_maps(spec).items():
        params[key] = state[key].to(device, torch.float64).clone().requires_grad_(True)
        if bias is not None:
            params[bias] = state[bias].to(device, torch.float64).clone().requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    parents64 = float64_parents(members, device)
    for _ in tqdm(range(steps), desc="PLeaS least squares", leave=False):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        target = teacher(members, perms, layout, images[idx], device, parents64)
        with torch.enable_grad():
            loss = objective(params, target, spec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
    out = dict(state)
    out.update({k: v.detach().float().cpu() for k, v in params.items()})
    return out


@dataclass(frozen=True)
class PLeaS(DataMerge):
    anchor: str | None = None
    width: float = 1.0  # MLP hidden width relative to a parent's, in [1, K]
    steps: int = 400  # least-squares Adam steps (the authors: 400)
    lr: float = 5e-4  # (the authors: 5e-4, cosine decay)
    batch_size: int = 32
    num_samples: int = 3200  # images for matching and the least squares (100 batches × 32)
    split: str = "train"
    seed: int = 0
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64

    def __post_init__(self):
        check_image_sample(self.num_samples, self.batch_size, self.split)
        if not self.width >= 1.0:
            raise FusionBenchError(
                f"method.width={self.width}: the merged MLP width relative to a parent's is at "
                "least 1 (1 = the parents' size; K = every model's MLP kept)."
            )
        if self.steps < 0:
            raise FusionBenchError(f"method.steps={self.steps}: give 0 or more steps.")

    def models_held(self, n_experts: int) -> float:
        # K fp32 models, the merged state and the output; during the least squares a float64
        # copy of each parent (2K) and of the fitted weights with gradients and Adam's moments (8)
        return 3.0 * n_experts + 10.0

    def merge(self, pool, data, context: Context):
        members = load_members(pool, self.anchor, "fusion/pleas")
        require_equal_shapes(members, "fusion/pleas")
        k = len(members.names)
        if self.width > k:
            raise FusionBenchError(
                f"method.width={self.width} is more than the number of models ({k}): at width "
                f"{k} every model's MLP is already kept."
            )
        tasks = tasks_of(pool, "fusion/pleas")
        n = self.batch_size if context.fast_dev_run else self.num_samples
        images = torch.cat(
            list(image_batches(pool, data, tasks, self.split, n, self.batch_size, self.seed))
        )
        stats = activation_stats(members, iter(images.split(self.batch_size)), context.device)
        perms = {name: permutations(stats[name], members.specs[name]) for name in members.others}
        spec = members.specs[members.anchor]
        fraction = (self.width - 1.0) / (k - 1)
        seps = {}
        for i in range(spec.layers):
            g = f"mlp.{i}"
            # distance of each anchor neuron to its matched neuron, per model
            dist = [
                (stats[name].distance(g, standardize=False) * perms[name][g]).sum(0)
                for name in members.others
            ]
            seps[i] = separated(dist, fraction)
        aligned = [members.states[members.anchor]] + [
            apply_maps(members.states[name], members.specs[name], perms[name])
            for name in members.others
        ]
        state, layout = partial_merge(aligned, spec, seps)
        del aligned, stats
        steps = min(self.steps, 1) if context.fast_dev_run else self.steps
        if steps:
            state = least_squares(
                state,
                members,
                perms,
                layout,
                images,
                steps,
                self.lr,
                self.batch_size,
                self.seed,
                context.device,
            )
        del members  # the K models are not needed while fine-tuning
        return finish(self, pool, state, data, context, tasks)
