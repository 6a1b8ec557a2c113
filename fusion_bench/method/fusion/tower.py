"""The open_clip ViT image tower as plain functions of its state dict: its shape (``TowerSpec``)
and a forward pass that records every activation the alignment methods use.

Why not hooks on the open_clip module: its attention is ``nn.MultiheadAttention``, which calls
``F.multi_head_attention_forward`` with the fused weights, so the queries, keys, values and the
input of ``out_proj`` are never outputs of a submodule. This forward computes the same features
(tested against the module) and names each intermediate:

| name        | shape (B·T, n)   | what                                              | neuron group |
|-------------|------------------|---------------------------------------------------|--------------|
| ``emb``     | width            | patch + class + position embedding (before ln_pre)| ``res``      |
| ``res.i``   | width            | residual stream entering block i (i = L: output)  | ``res``      |
| ``ln1.i``   | width            | in_proj's input                                   | ``res``      |
| ``q.i``, ``k.i`` | width       | queries, keys (before the 1/√d scaling)           | ``qk.i``     |
| ``v.i``     | width            | values                                            | ``v.i``      |
| ``ctx.i``   | width            | attention output = out_proj's input               | ``v.i``      |
| ``ln2.i``   | width            | c_fc's input                                      | ``res``      |
| ``fc.i``    | mlp width        | c_fc output (pre-GELU)                            | ``mlp.i``    |
| ``gelu.i``  | mlp width        | c_proj's input                                    | ``mlp.i``    |
| ``post``    | width            | ln_post of the class token = proj's input (B, n)  | ``res``      |
| ``patches`` | 3·p·p            | conv1's input, one row per patch (B·g², 3p²)      | —            |
| ``conv``    | width            | conv1's output (B·g² rows)                        | ``res``      |
| ``attn.i``  | width            | out_proj's output                                 | ``res``      |
| ``mlp.i``   | width            | c_proj's output                                   | ``res``      |
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_bench.errors import FusionBenchError

BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
BLOCK_KEYS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
REQUIRED = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "proj")


@dataclass(frozen=True)
class TowerSpec:
    """What alignment needs to know of an open_clip ViT tower (the rest is in the weights)."""

    width: int  # residual stream
    heads: int
    layers: int
    mlp: tuple[int, ...]  # hidden width per block
    patch: int
    tokens: int  # 1 + grid²
    embed: int  # output dimension (proj's columns)
    quick_gelu: bool = False  # open_clip's QuickGELU (the OpenAI-weight "-quickgelu" models)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def of(
        cls, state: Mapping[str, Tensor], heads: int, name: str = "model", quick_gelu: bool = False
    ) -> TowerSpec:
        """The spec of a tower state dict with ``heads`` attention heads; a clear error for a
        state dict that is not an open_clip ViT image tower (canonical keys, no wrappers)."""
        missing = [k for k in REQUIRED if k not in state]
        if missing:
            raise FusionBenchError(
                f"{name} is not an open_clip ViT image tower (no {missing}): the fusion methods "
                "align open_clip's VisionTransformer (conv1, class/positional embedding, "
                "transformer.resblocks.*, ln_post, proj)."
            )
        shape = state.shape if hasattr(state, "shape") else (lambda k: tuple(state[k].shape))
        layers = 1 + max((int(m.group(1)) for k in state if (m := BLOCK.match(k))), default=-1)
        width = shape("conv1.weight")[0]
        if heads < 1 or width % heads:
            raise FusionBenchError(
                f"{name}: width {width} is not divisible into {heads} attention heads."
            )
        extra = [
            k
            for k in state
            if k.startswith(("attn_pool", "ln_1_kv", "ls_"))
            or (BLOCK.match(k) and (".ls_" in k or ".ln_attn" in k or ".ln_inner" in k))
        ]
        if extra or "ln_post.weight" not in state:
            raise FusionBenchError(
                f"{name} has parts the fusion methods do not align ({extra[:3] or 'no ln_post'}): "
                "only the plain CLIP ViT (no attention pooling, layer scale or extra norms)."
            )
        expected = {f"{block(i)}{k}" for i in range(layers) for k in BLOCK_KEYS}
        missing = sorted(expected - {k for k in state if BLOCK.match(k)})
        if missing:
            raise FusionBenchError(
                f"{name} is not a complete open_clip ViT tower: {len(missing)} block weight(s) "
                f"missing, e.g. {missing[:3]} (blocks 0..{layers - 1} expected)."
            )
        mlp = tuple(shape(f"{block(i)}mlp.c_fc.weight")[0] for i in range(layers))
        return cls(
            width=width,
            heads=heads,
            layers=layers,
            mlp=mlp,
            patch=shape("conv1.weight")[-1],
            tokens=shape("positional_embedding")[0],
            embed=shape("proj")[1],
            quick_gelu=quick_gelu,
        )

    def same_up_to_width(self, other: TowerSpec) -> list[str]:
        """What differs besides the widths (empty: the two towers can be fused)."""
        fields = ("layers", "patch", "tokens", "embed", "head_dim")
        return [
            f"{f} {getattr(self, f)} vs {getattr(other, f)}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


def block(i: int) -> str:
    return f"transformer.resblocks.{i}."


def layer_norm(x: Tensor, state: Mapping[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"])


def forward(
    state: Mapping[str, Tensor], spec: TowerSpec, images: Tensor, record: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(features (B, embed), activations)`` of the tower ``state`` (float tensors on the images'
    device). ``activations`` (only with ``record``) maps the names of the module docstring to
    (rows, neurons) tensors, one row per image and token."""
    acts: dict[str, Tensor] = {}

    def keep(name: str, x: Tensor) -> None:
        if record:
            acts[name] = x.reshape(-1, x.shape[-1])

    b = images.shape[0]
    w = state["conv1.weight"]
    patches = F.unfold(images, kernel_size=spec.patch, stride=spec.patch).transpose(1, 2)
    keep("patches", patches)
    x = patches @ w.reshape(w.shape[0], -1).T  # (B, g², D), conv1 has no bias in open_clip
    keep("conv", x)
    cls = state["class_embedding"].expand(b, 1, -1)
    x = torch.cat([cls, x], dim=1) + state["positional_embedding"]
    keep("emb", x)
    x = layer_norm(x, state, "ln_pre.")
    for i in range(spec.layers):
        p = block(i)
        keep(f"res.{i}", x)
        h = layer_norm(x, state, p + "ln_1.")
        keep(f"ln1.{i}", h)
        qkv = F.linear(h, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        keep(f"q.{i}", q)
        keep(f"k.{i}", k)
        keep(f"v.{i}", v)
        t, d = x.shape[1], spec.head_dim
        qh, kh, vh = (z.reshape(b, t, spec.heads, d).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
        ctx = (att @ vh).transpose(1, 2).reshape(b, t, spec.width)
        keep(f"ctx.{i}", ctx)
        a = F.linear(ctx, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        keep(f"attn.{i}", a)
        x = x + a
        h = layer_norm(x, state, p + "ln_2.")
        keep(f"ln2.{i}", h)
        f = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        keep(f"fc.{i}", f)
        g = f * torch.sigmoid(1.702 * f) if spec.quick_gelu else F.gelu(f)
        keep(f"gelu.{i}", g)
        m = F.linear(g, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        keep(f"mlp.{i}", m)
        x = x + m
    keep(f"res.{spec.layers}", x)
    post = layer_norm(x[:, 0], state, "ln_post.")
    keep("post", post)
    return post @ state["proj"], acts
