"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

Every linear layer y = W x of the image tower is merged in closed form: the W that minimises
Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² over the experts' layer inputs X_i is

    W = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ   (transposed back to nn.Linear's (out, in) layout),

with G_i = X_iᵀX_i / rows the Gram matrix of the layer's inputs on expert i's own forward passes
over task i's training images. Off-diagonal Gram entries are scaled by α
(``reduce_non_diagonal_ratio``; α = 1 is the exact least-squares solution, α = 0 a per-input
weighted average). Every other parameter (biases, LayerNorms, embeddings, the patch conv,
open_clip's ``proj``) is the simple average, as in FusionBench.

Linear layers: every ``nn.Linear`` that is called as a module (HF CLIP: q/k/v/out_proj, fc1, fc2;
open_clip: mlp.c_fc, mlp.c_proj) and, for ``nn.MultiheadAttention`` (open_clip), its packed
``in_proj_weight`` (input: the attention's input) and ``out_proj`` (input: the attention output
before the projection, recomputed with an identity projection because PyTorch calls out_proj
functionally, so no hook on it ever fires).

Run: ``fusion_bench method=regmean``
Memory: Σ_i G_i and Σ_i G_i W_iᵀ per linear layer + one expert's Grams + one expert's encoder
(Grams are ~1.7× the weights for ViT-B: fc2's input is 4× wider); one expert at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import (
    Context,
    DataMerge,
    Experts,
    Progress,
    key_progress,
    pool_experts,
)
from fusion_bench.taskpool.data import TaskData, check_sample_size
from fusion_bench.tensor_ops import StateDict, expert_tensor, is_excluded, map_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegMean(DataMerge):
    num_regmean_examples: int = 256  # training images per task
    reduce_non_diagonal_ratio: float = 0.6  # α scaling off-diagonal Gram entries
    batch_size: int = 32
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0
    seed: int = 0  # which training images
    # RegMean++ (method=regmean_plusplus): blocks merged bottom-up, each expert's layer inputs
    # taken from the merged blocks below (fusion_bench/method/regmean_plusplus.py)
    blockwise: bool = False

    def __post_init__(self):
        check_ratio(self.reduce_non_diagonal_ratio)
        check_sample_size(self.num_regmean_examples, self.batch_size)

    def merge(self, pool, data: TaskData, context: Context) -> dict[str, Tensor]:
        if self.blockwise:
            from fusion_bench.method.regmean_plusplus import merge_blockwise

            return merge_blockwise(self, pool, data, context.device)
        grams = self.expert_grams(pool, data, context.device)
        return self.solve(pool.pretrained(), pool_experts(pool), grams, key_progress("regmean"))

    def models_held(self, n_experts: int) -> float:
        if self.blockwise:  # merged state + merged encoder + one block's Grams (+ activations)
            return 3.0
        return 5.5  # Σ G + one expert's G (~1.7 P each for ViT-B) + Σ G Wᵀ + output + encoder

    # -- the maths -------------------------------------------------------------------------------
    def solve(
        self,
        pretrained: StateDict,
        experts: Experts,
        grams: Iterable[Mapping[str, Tensor]],
        progress: Progress = None,
    ) -> dict[str, Tensor]:
        """RegMean over state dicts.

        ``grams`` yields, for each expert in order, ``{weight key: (in, in) Gram}`` for the linear
        layers to solve; it is consumed one expert at a time (a generator may compute each
        expert's Grams when asked), and only the sums are kept. Keys without a Gram are averaged.
        """
        sum_gram: dict[str, Tensor] = {}
        sum_gram_weight: dict[str, Tensor] = {}
        count = 0
        for (name, expert), expert_grams in zip(experts.items(), grams, strict=True):
            keys = {k for k in expert_grams if not is_excluded(k, self.exclude_keys)}
            if count and keys != set(sum_gram):
                raise FusionBenchError(
                    f"RegMean: expert '{name}' has Grams for {len(keys)} layers, the first expert "
                    f"for {len(sum_gram)}: all experts must share one architecture."
                )
            for key in keys:
                gram = reduce_off_diagonal(
                    expert_grams[key].float(), self.reduce_non_diagonal_ratio
                )
                weight = expert_tensor(expert, key, pretrained[key], name).to(gram.device)
                if weight.dim() != 2 or weight.shape[1] != gram.shape[0]:
                    raise FusionBenchError(
                        f"RegMean: '{key}' of shape {tuple(weight.shape)} does not take the "
                        f"{gram.shape[0]}-wide inputs of its Gram matrix."
                    )
                if key in sum_gram:
                    sum_gram[key] += gram
                    sum_gram_weight[key] += gram @ weight.T
                else:  # (in, in), (in, out)
                    sum_gram[key], sum_gram_weight[key] = gram, gram @ weight.T
            count += 1
        if count == 0:
            raise FusionBenchError("RegMean needs at least one expert.")

        def merge_key(key: str, base: Tensor) -> Tensor:
            if key in sum_gram:
                return solve_merged_weight(sum_gram.pop(key), sum_gram_weight.pop(key), key).cpu()
            acc = torch.zeros_like(base)
            for name, expert in experts.items():
                acc += expert_tensor(expert, key, base, name)
            return acc / count

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)

    # -- the statistic, per expert ---------------------------------------------------------------
    def expert_grams(self, pool, data: TaskData, device) -> Iterator[dict[str, Tensor]]:
        """Each expert's Grams on its own task's training images, computed when asked for."""
        from tqdm.auto import tqdm

        for name in tqdm(pool.expert_names, desc="Gram matrices", unit="expert", leave=False):
            encoder = pool.build_encoder(pool.expert(name)).to(device).eval()
            classifier = pool.classifier(encoder)
            images = data.images(
                name,
                "train",
                classifier.preprocess,
                self.num_regmean_examples,
                self.batch_size,
                self.seed,
            )
            with GramRecorder(encoder) as recorder, torch.no_grad():
                for batch in images:
                    classifier.features(encoder, batch.to(device))
            if not recorder.sums:
                raise FusionBenchError(
                    f"RegMean found no linear layer in the image tower of '{name}'."
                )
            grams = recorder.grams()
            del encoder, classifier, recorder
            yield grams


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise FusionBenchError(f"reduce_non_diagonal_ratio={ratio} is outside [0, 1].")


def reduce_off_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """α·G off the diagonal, G on it."""
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def solve_merged_weight(sum_gram: Tensor, sum_gram_weight: Tensor, key: str) -> Tensor:
    """W = ((Σ G)⁻¹ Σ G Wᵀ)ᵀ, (out, in). A solve, not an inverse; pinv if Σ G is singular."""
    try:
        merged_t = torch.linalg.solve(sum_gram, sum_gram_weight)  # (in, out)
    except torch.linalg.LinAlgError:
        log.warning("RegMean: the Gram sum of %s is singular; using its pseudo-inverse", key)
        merged_t = torch.linalg.pinv(sum_gram) @ sum_gram_weight
    return merged_t.T.contiguous()


# -- Gram matrices of the linear layers' inputs -------------------------------------------------
class GramRecorder:
    """Forward hooks accumulating X̄ᵀX̄ (mean over rows: batch × tokens) of every linear layer's
    input in ``module``; keys are parameter names (``prefix`` + the weight's name)."""

    def __init__(self, module: nn.Module, prefix: str = ""):
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []
        self._busy = False  # out_proj's input is recomputed by calling the attention again
        attention_children = set()
        for name, mod in module.named_modules():
            if isinstance(mod, nn.MultiheadAttention):
                attention_children.add(id(mod.out_proj))
                self._hook_attention(f"{prefix}{name}." if name else prefix, mod)
        for name, mod in module.named_modules():
            if isinstance(mod, nn.Linear) and id(mod) not in attention_children:
                key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
                self._handles.append(
                    mod.register_forward_pre_hook(lambda _m, args, key=key: self._add(key, args[0]))
                )

    def _add(self, key: str, x: Tensor) -> None:
        if self._busy:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        xtx = x.T @ x
        if key in self.sums:
            self.sums[key] += xtx
            self.rows[key] += x.shape[0]
        else:
            self.sums[key], self.rows[key] = xtx, x.shape[0]

    def _hook_attention(self, prefix: str, mha: nn.MultiheadAttention) -> None:
        if not mha._qkv_same_embed_dim:
            return  # separate q/k/v weights: not used by CLIP towers; those stay averaged

        def inputs(args, kwargs):
            names = ("query", "key", "value")
            return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]

        def pre_hook(_m, args, kwargs):
            query, key, value = inputs(args, kwargs)
            if key is query and value is query:  # self-attention: in_proj sees one input
                self._add(prefix + "in_proj_weight", query)

        def post_hook(m, args, kwargs, _output):
            if self._busy:
                return
            identity = {
                "out_proj.weight": torch.eye(m.embed_dim, device=m.out_proj.weight.device),
                "out_proj.bias": torch.zeros(m.embed_dim, device=m.out_proj.weight.device),
            }
            self._busy = True
            try:
                out = torch.func.functional_call(m, identity, args, kwargs, strict=False)
            finally:
                self._busy = False
            self._add(prefix + "out_proj.weight", out[0])

        self._handles.append(mha.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(mha.register_forward_hook(post_hook, with_kwargs=True))

    def grams(self) -> dict[str, Tensor]:
        return {key: s / self.rows[key] for key, s in self.sums.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GramRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
