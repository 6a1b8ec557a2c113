"""SMILE: Sparse Mixture of Low-Rank Experts, built zero-shot from fine-tuned models (Tang et al.,
"SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained Foundation
Models", arXiv 2408.10174, 2024; FusionBench ``smile_upscaling``).

Every linear layer of the image tower's transformer blocks (attention q, k, v and output
projections, both MLP layers) with pretrained W0 (m×n), b0 and experts W_i, b_i (i = 1…T) becomes
a mixture: with ΔW_i = W_i − W0 = U_i S_i V_iᵀ (SVD, singular values descending),

- expert i keeps its rank-k part U_i,k (m×k) and S_i,k V_i,kᵀ (k×n), and Δb_i = b_i − b0
  (``k = -1``: the dense ΔW_i);
- the router of the layer keeps V_i,g, the top ``gate_k`` right singular vectors of every
  expert (of W_i itself with ``routing_use_diff: false``), and routes each token x by
  r_i(x) = ‖V_i,gᵀ x‖₂, p = softmax(r), the ``top_k`` largest p_i renormalised to sum to 1 (p̃);
- y = W0 x + b0 + Σ_{i ∈ top-k} p̃_i(x) (U_i,k S_i,k V_i,kᵀ x + Δb_i).

Each layer routes each token on its own. A layer where every expert's ΔW is 0 (|ΔW| ≤ 1e-8)
stays the pretrained layer, as in FusionBench. All other parameters (patch embedding, class and
position embeddings, layer norms, output projection) stay pretrained; ``average_experts: true``
averages the experts' values for them, except the class token and the output projection
(FusionBench's rule: it averages the leaf modules of Hugging Face's ``CLIPVisionModel``).

open_clip towers fuse q, k and v into ``nn.MultiheadAttention.in_proj_weight`` (3d×d), which is no
``nn.Linear``: its three d×d row blocks become three SMILE layers (the layout of the Hugging Face
tower FusionBench upscales, where q_proj, k_proj and v_proj are separate linear layers), and the
attention is recomputed from them as ``nn.MultiheadAttention`` does
(``torch.nn.functional.scaled_dot_product_attention``, then the output projection).

Evaluation: task-agnostic, one forward pass; ``last_routing`` (the per-image routing weights the
evaluator scores) is p̃ averaged over the image's tokens and over the upscaled layers. With a task
id (oracle), every layer adds that expert's part only (p̃ = one-hot).

Run: ``fusion_bench method=routed/smile``
Memory: the SMILE model itself (θ0 + per layer T·(k(m+n) + m + gate_k·n) numbers) + while
building, per layer one expert's ΔW and its float64 SVD per worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import RoutedMethod, RoutedModel, pool_experts
from fusion_bench.method.routed import Tower, mlp_inputs
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.tensor_ops import StateDict, expert_tensor, parallel_map

UNTRAINED_ATOL = 1e-8  # FusionBench's test for "expert not trained": allclose(ΔW, 0) (atol 1e-8)
ATTENTION_PARTS = ("q", "k", "v", "out_proj")


# -- one SMILE layer ------------------------------------------------------------------------------
class Routing:
    """What the SMILE layers of one model share during a forward: the oracle expert (or None), and
    the per-image routing weights summed over the layers that ran."""

    def __init__(self) -> None:
        self.oracle: int | None = None
        self.total: Tensor | None = None
        self.layers = 0

    def add(self, weights: Tensor, batch_dim: int) -> None:
        """``weights`` (*lead, T): a layer's p̃ per token; added as the mean over the tokens of
        each image (the images are along ``batch_dim`` of the lead dimensions)."""
        per_image = weights.movedim(batch_dim, 0)
        per_image = per_image.reshape(per_image.shape[0], -1, per_image.shape[-1]).mean(1)
        self.total = per_image if self.total is None else self.total + per_image
        self.layers += 1


class SmileLinear(nn.Module):
    """y = W0 x + b0 + Σ_{i ∈ top-k} p̃_i(x) (U_i S_i V_iᵀ x + Δb_i), routed per token.

    Buffers: ``weight`` W0 (m×n), ``bias`` b0 (m) or None, ``gate`` (T, gate_k, n) the routers'
    right singular vectors, ``u`` (T, m, k) and ``svh`` (T, k, n) the experts' low-rank factors
    (or ``delta`` (T, m, n), the dense ΔW_i, for k = -1), ``delta_bias`` (T, m) or None."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        gate: Tensor,
        u: Tensor | None,
        svh: Tensor | None,
        delta: Tensor | None,
        delta_bias: Tensor | None,
        top_k: int,
        routing: Routing | None = None,
        batch_dim: int = 0,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.n_experts, self.gate_k = gate.shape[0], gate.shape[1]
        self.top_k = top_k
        self.routing = Routing() if routing is None else routing
        self.batch_dim = batch_dim
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("gate", gate)
        self.register_buffer("u", u)
        self.register_buffer("svh", svh)
        self.register_buffer("delta", delta)
        self.register_buffer("delta_bias", delta_bias)

    @classmethod
    def empty(cls, state: StateDict, prefix: str, top_k: int, routing: Routing, batch_dim: int):
        """A layer of the shapes saved under ``prefix`` in ``state`` (filled by load_state_dict)."""

        def like(name: str) -> Tensor | None:
            key = prefix + name
            return torch.empty_like(state[key], device="cpu") if key in state else None

        return cls(
            like("weight"),
            like("bias"),
            like("gate"),
            like("u"),
            like("svh"),
            like("delta"),
            like("delta_bias"),
            top_k,
            routing,
            batch_dim,
        )

    def expert(self, index: int, h: Tensor) -> Tensor:
        """Expert ``index``'s part for the tokens ``h`` (N, n): ΔW_i,k h + Δb_i, (N, m)."""
        if self.delta is not None:
            out = F.linear(h, self.delta[index])
        else:
            out = F.linear(F.linear(h, self.svh[index]), self.u[index])
        return out if self.delta_bias is None else out + self.delta_bias[index]

    def route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(p̃ (N, T), selected experts (N, top_k)) for the tokens ``h`` (N, n)."""
        n_tokens, n = h.shape[0], self.n_experts
        if n == 1:  # FusionBench's gate: one expert takes every token with weight 1
            return h.new_ones(n_tokens, 1), h.new_zeros(n_tokens, 1, dtype=torch.long)
        logits = F.linear(h, self.gate.reshape(n * self.gate_k, -1))
        logits = logits.view(n_tokens, n, self.gate_k).norm(dim=-1)
        top_p, top_i = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(1, top_i, top_p), top_i

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        if self.routing.oracle is not None:
            return out + self.expert(self.routing.oracle, h).view(*lead, self.out_features)
        weights, selected = self.route(h)
        self.routing.add(weights.view(*lead, self.n_experts), self.batch_dim)
        return out + self.mix(h, weights, selected).view(*lead, self.out_features)

    def mix(self, h: Tensor, weights: Tensor, selected: Tensor) -> Tensor:
        """Σ_{i ∈ selected} p̃_i (ΔW_i,k h + Δb_i) per token, each expert run on its own tokens
        only: the (token, expert) pairs sorted by expert, one contiguous slice per expert."""
        n_tokens, top_k = selected.shape
        experts = selected.reshape(-1)
        order = torch.argsort(experts, stable=True)
        tokens = torch.arange(n_tokens, device=h.device).repeat_interleave(top_k)[order]
        counts = torch.bincount(experts, minlength=self.n_experts).tolist()
        parts = [
            self.expert(index, chunk)
            for index, chunk in enumerate(h[tokens].split(counts))
            if chunk.shape[0]
        ]
        pair_weights = weights.gather(1, selected).reshape(-1)[order, None]
        sorted_out = torch.cat(parts) * pair_weights
        out = torch.empty_like(sorted_out)
        out[order] = sorted_out
        return out.view(n_tokens, top_k, self.out_features).sum(dim=1)

    def extra_repr(self) -> str:
        rank = "dense" if self.delta is not None else self.u.shape[-1]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"experts={self.n_experts}, k={rank}, gate_k={self.gate_k}, top_k={self.top_k}"
        )


ExpertReader = Callable[[int], tuple[Tensor, Tensor | None]]


def smile_linear(
    weight: Tensor,
    bias: Tensor | None,
    expert: ExpertReader,
    n_experts: int,
    *,
    k: int,
    gate_k: int,
    top_k: int,
    routing_use_diff: bool = True,
    routing: Routing | None = None,
    batch_dim: int = 0,
) -> SmileLinear | None:
    """The SMILE layer of the linear layer (``weight`` W0, ``bias`` b0) and the experts
    ``expert(i) -> (W_i, b_i)``, stored in W0's dtype (the SVDs are float64); None when every
    ΔW_i is 0 (the layer stays pretrained). Experts are read and decomposed one per worker."""
    ranks = max(k, gate_k)  # one SVD of ΔW_i serves the expert and (routing_use_diff) the router

    def decompose(index: int):
        w_i, b_i = expert(index)
        diff = w_i - weight
        trained = bool((diff.abs() > UNTRAINED_ATOL).any())
        delta_b = None if bias is None else (b_i - bias)
        if routing_use_diff or k != -1:
            u, s, vh = top_singular_triplets(diff, ranks if routing_use_diff else k)
        vh_gate = vh[:gate_k] if routing_use_diff else top_singular_triplets(w_i, gate_k)[2]
        if k == -1:
            return trained, vh_gate, None, None, diff, delta_b
        return trained, vh_gate, u[:, :k], s[:k, None] * vh[:k], None, delta_b

    parts = parallel_map(decompose, range(n_experts))
    if not any(p[0] for p in parts):
        return None
    dtype = weight.dtype

    def stack(j: int) -> Tensor | None:
        return None if parts[0][j] is None else torch.stack([p[j] for p in parts]).to(dtype)

    return SmileLinear(
        weight.detach().clone(),
        None if bias is None else bias.detach().clone(),
        stack(1),
        stack(2),
        stack(3),
        stack(4),
        stack(5),
        top_k,
        routing,
        batch_dim,
    )


# -- the attention of open_clip towers ------------------------------------------------------------
class SmileAttention(nn.Module):
    """``nn.MultiheadAttention`` with its q, k, v and output projections as separate layers (each
    a :class:`SmileLinear` or the pretrained ``nn.Linear``): the same computation — per-head
    scaled dot-product attention of the projected inputs, then the output projection."""

    def __init__(self, mha: nn.MultiheadAttention, parts: Mapping[str, nn.Module]):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.q, self.k, self.v, self.out_proj = (parts[name] for name in ATTENTION_PARTS)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights or key_padding_mask is not None:
            raise FusionBenchError(
                "SMILE's attention layer computes the attention output only (need_weights=False, "
                "no key_padding_mask), as open_clip's image tower calls it."
            )
        if query.dim() != 3:
            raise FusionBenchError("SMILE's attention layer needs batched inputs (3-D).")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt, src = query.shape[0], query.shape[1], key.shape[1]

        def heads(t: Tensor, length: int) -> Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(query), tgt), heads(self.k(key), src), heads(self.v(value), src)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = not allowed, as nn.MultiheadAttention
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(
                    attn_mask, float("-inf")
                )
            attn_mask = attn_mask.to(q.dtype)
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, tgt, src)
            is_causal = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


# -- which layers: the linear layers of the transformer blocks ------------------------------------
@dataclass(frozen=True, eq=False)
class Source:
    """A linear layer as canonical keys: its weight (rows ``rows`` of it) and bias, with the
    stored tensors' shapes (``weight_like``, ``bias_like``: meta tensors) to check experts by."""

    weight: str
    bias: str | None
    weight_like: Tensor
    bias_like: Tensor | None
    rows: slice | None = None

    def read(self, state: StateDict, name: str) -> tuple[Tensor, Tensor | None]:
        """Expert ``name``'s (W, b) of this layer, float32."""
        w = expert_tensor(state, self.weight, self.weight_like, name)
        b = None if self.bias is None else expert_tensor(state, self.bias, self.bias_like, name)
        if self.rows is not None:
            w, b = w[self.rows], (None if b is None else b[self.rows])
        return w, b


def _meta(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")


_SEPARATE_QKV = re.compile(r"q_proj_weight|k_proj_weight|v_proj_weight")


def block_layers(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``nn.Linear`` and ``nn.MultiheadAttention`` inside the transformer
    blocks (open_clip ``transformer.resblocks.<i>``, Hugging Face ``encoder.layers.<i>``)."""
    blocks = [name.rsplit(".mlp.", 1)[0] for name in mlp_inputs(encoder)]
    found: list[tuple[str, nn.Module]] = []
    for block in blocks:
        attention: list[str] = []
        for sub_name, module in encoder.get_submodule(block).named_modules():
            name = f"{block}.{sub_name}" if sub_name else block
            if any(name.startswith(a + ".") for a in attention):
                continue  # the output projection of an nn.MultiheadAttention: handled with it
            if isinstance(module, nn.MultiheadAttention):
                if module.in_proj_weight is None or module.bias_k is not None:
                    raise FusionBenchError(
                        f"'{name}' is an nn.MultiheadAttention with separate q/k/v weights or "
                        "bias_k/bias_v, which SMILE does not upscale: CLIP towers fuse q, k, v."
                    )
                attention.append(name)
                found.append((name, module))
            elif isinstance(module, nn.Linear):
                found.append((name, module))
            elif any(
                "in_proj" in p or _SEPARATE_QKV.search(p)
                for p, _ in module.named_parameters(recurse=False)
            ):
                raise FusionBenchError(
                    f"'{name}' ({type(module).__name__}) holds attention projections that are no "
                    "nn.Linear or nn.MultiheadAttention; SMILE cannot upscale this tower."
                )
    return found


def sources(name: str, module: nn.Module) -> dict[str, tuple[Source, Tensor, Tensor | None]]:
    """part -> (its keys, W0, b0) of a block layer: '' for an nn.Linear, q/k/v/out_proj for an
    nn.MultiheadAttention (q, k, v: the row blocks of in_proj_weight)."""

    def linear(prefix: str, layer: nn.Linear) -> tuple[Source, Tensor, Tensor | None]:
        bias = None if layer.bias is None else f"{prefix}.bias"
        source = Source(f"{prefix}.weight", bias, _meta(layer.weight), _meta(layer.bias))
        return source, layer.weight, layer.bias

    if isinstance(module, nn.Linear):
        return {"": linear(name, module)}
    d = module.embed_dim
    w, b = module.in_proj_weight, module.in_proj_bias
    bias_key = None if b is None else f"{name}.in_proj_bias"
    out: dict[str, tuple[Source, Tensor, Tensor | None]] = {}
    for i, part in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        source = Source(f"{name}.in_proj_weight", bias_key, _meta(w), _meta(b), rows)
        out[part] = (source, w[rows], None if b is None else b[rows])
    out["out_proj"] = linear(f"{name}.out_proj", module.out_proj)
    return out


def plain_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(weight.dtype)


def tower_batch_dim(encoder: nn.Module) -> int:
    """Where the images are in the blocks' (batch, tokens) layout: open_clip towers built with
    ``batch_first=False`` (older open_clip) run token-first."""
    transformer = getattr(encoder, "transformer", None)
    return 0 if getattr(transformer, "batch_first", True) else 1


def averaged_keys(encoder: nn.Module, linear_keys: set[str]) -> list[str]:
    """What ``average_experts`` averages: every floating tensor of the tower that is no block
    linear layer's, the class token and the output projection excepted (FusionBench averages the
    leaf modules of Hugging Face's CLIPVisionModel, whose class token is no leaf's and which has
    no projection)."""
    return [
        key
        for key, value in encoder.state_dict().items()
        if value.is_floating_point()
        and key not in linear_keys
        and key.rsplit(".", 1)[-1] != "class_embedding"
        and key != "proj"
    ]


# -- the routed model -----------------------------------------------------------------------------
class SmileModel(RoutedModel):
    """The pool's image tower with its block linear layers replaced by SMILE layers."""

    extra_forward_passes = 0

    def __init__(self, pool, expert_names: Sequence[str]):
        super().__init__(expert_names)
        self.tower = Tower(pool)
        self.routing = Routing()
        self.batch_dim = tower_batch_dim(self.tower.encoder)

    @property
    def smile_layers(self) -> list[SmileLinear]:
        return [m for m in self.modules() if isinstance(m, SmileLinear)]

    def forward(self, images: Tensor, task: str | None = None) -> Tensor:
        routing = self.routing
        if task is not None:
            routing.oracle = self.expert_index(task)
            try:
                return self.tower(images)
            finally:
                routing.oracle = None
        routing.total, routing.layers = None, 0
        features = self.tower(images)
        if routing.layers == 0:  # no layer was upscaled (every expert equals θ0 there)
            n = len(self.expert_names)
            self.last_routing = torch.full((images.shape[0], n), 1.0 / n, device=features.device)
        else:
            self.last_routing = routing.total / routing.layers
        routing.total = None
        return features

    def replace(self, name: str, module: nn.Module) -> None:
        self.tower.encoder.set_submodule(name, module)


@dataclass(frozen=True)
class Smile(RoutedMethod):
    # Defaults: FusionBench 0.2.33 method/smile_upscaling/smile_upscaling.yaml (the reported CLIP
    # runs use gate_k=16 with k=32 or 128: docs/methods/routed/smile.md).
    gate_k: int = 1  # right singular vectors per expert in each layer's router
    k: int = 128  # rank of each expert's ΔW; -1: the dense ΔW
    top_k: int = 1  # experts mixed per token
    routing_use_diff: bool = True  # router from the SVD of ΔW_i (false: of W_i)
    average_experts: bool = False  # average the experts' non-linear parameters (else θ0's)

    def __post_init__(self):
        if self.k == 0 or self.k < -1:
            raise FusionBenchError(
                f"method.k={self.k}: each expert keeps the top k singular vectors of its ΔW, so k "
                "must be ≥ 1 (or -1 for the dense ΔW)."
            )
        if self.gate_k < 1:
            raise FusionBenchError(
                f"method.gate_k={self.gate_k}: the router keeps the top gate_k right singular "
                "vectors of each expert, so gate_k must be ≥ 1."
            )
        if self.top_k < 1:
            raise FusionBenchError(
                f"method.top_k={self.top_k}: each token is sent to its top_k experts, so top_k "
                "must be ≥ 1 (and at most the number of experts)."
            )

    def check(self, model: SmileModel) -> list[tuple[str, nn.Module]]:
        """The block layers of the model's tower, after checking the options fit them."""
        n = len(model.expert_names)
        if n == 0:
            raise FusionBenchError("SMILE needs at least one expert in the model pool.")
        if self.top_k > n:
            raise FusionBenchError(
                f"method.top_k={self.top_k}: the pool has {n} experts; choose top_k ≤ {n}."
            )
        layers = block_layers(model.tower.encoder)
        for name, module in layers:
            for part, (_, w0, _) in sources(name, module).items():
                m, n_in = w0.shape
                rank, label = min(m, n_in), f"{name}{'.' + part if part else ''}"
                for option, value in (("k", self.k), ("gate_k", self.gate_k)):
                    if value > rank:
                        raise FusionBenchError(
                            f"method.{option}={value}: the layer '{label}' is {m}×{n_in}, of "
                            f"rank at most {rank}; choose {option} ≤ {rank}"
                            + (" (or -1 for the dense ΔW)." if option == "k" else ".")
                        )
        return layers

    @torch.no_grad()
    def build(self, pool, data, context) -> SmileModel:
        model = SmileModel(pool, pool.expert_names)
        layers = self.check(model)
        experts = pool_experts(pool)
        names = list(experts)
        if self.average_experts:  # θ0's tensors, keyed before any layer is replaced
            self.average(model.tower.encoder, layers, experts)
        for name, module in layers:
            plain = sources(name, module)
            parts = {}
            for part, (source, w0, b0) in plain.items():

                def read(i: int, source=source):
                    return source.read(experts[names[i]], names[i])

                parts[part] = smile_linear(
                    w0.detach(),
                    None if b0 is None else b0.detach(),
                    read,
                    len(names),
                    k=self.k,
                    gate_k=self.gate_k,
                    top_k=self.top_k,
                    routing_use_diff=self.routing_use_diff,
                    routing=model.routing,
                    batch_dim=model.batch_dim,
                )
            if isinstance(module, nn.Linear):
                if parts[""] is not None:
                    model.replace(name, parts[""])
            elif any(p is not None for p in parts.values()):
                filled = {
                    part: plain_linear(*plain[part][1:]) if layer is None else layer
                    for part, layer in parts.items()
                }
                model.replace(name, SmileAttention(module, filled))
        return model.eval()

    @staticmethod
    def average(
        encoder: nn.Module, layers: list[tuple[str, nn.Module]], experts: Mapping[str, StateDict]
    ) -> None:
        """``average_experts``: the experts' mean in place of θ0 for :func:`averaged_keys`."""
        linear_keys = {
            key
            for name, module in layers
            for source, _, _ in sources(name, module).values()
            for key in (source.weight, source.bias)
            if key is not None
        }
        tensors = encoder.state_dict(keep_vars=True)
        for key in averaged_keys(encoder, linear_keys):
            target = tensors[key]
            total = torch.zeros_like(target, dtype=torch.float64)
            for name, expert in experts.items():
                total += expert_tensor(expert, key, target, name).to(torch.float64)
            target.data.copy_((total / len(experts)).to(target.dtype))

    @torch.no_grad()
    def load(self, pool, expert_names: Sequence[str], state: StateDict) -> SmileModel:
        model = SmileModel(pool, expert_names)
        self.check(model)
        prefix = "tower.encoder."
        for name, module in block_layers(model.tower.encoder):
            if isinstance(module, nn.Linear):
                if f"{prefix}{name}.gate" in state:
                    model.replace(name, self.saved_layer(state, f"{prefix}{name}.", model))
            elif f"{prefix}{name}.q.weight" in state:
                plain = sources(name, module)
                parts = {
                    part: self.saved_layer(state, f"{prefix}{name}.{part}.", model)
                    if f"{prefix}{name}.{part}.gate" in state
                    else plain_linear(*plain[part][1:])
                    for part in ATTENTION_PARTS
                }
                model.replace(name, SmileAttention(module, parts))
        try:
            model.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise FusionBenchError(
                f"The saved SMILE model does not fit this model pool's image tower ({e}). Evaluate "
                "it with the pool it was built from."
            ) from None
        return model.eval()

    def saved_layer(self, state: StateDict, prefix: str, model: SmileModel) -> SmileLinear:
        n = state[prefix + "gate"].shape[0]
        if n != len(model.expert_names):
            raise FusionBenchError(
                f"The saved SMILE layer '{prefix}' has {n} experts, the saved model names "
                f"{len(model.expert_names)}: the save is corrupted."
            )
        return SmileLinear.empty(state, prefix, self.top_k, model.routing, model.batch_dim)

    def models_held(self, n_experts: int) -> float:
        # Built layer by layer: one expert's ΔW and its float64 SVD per worker at a time; the
        # SMILE model itself is the evaluated model (its size is costs.stored_parameters).
        return 0.0
