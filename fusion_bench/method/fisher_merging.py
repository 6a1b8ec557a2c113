"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Per entry, a Fisher-weighted average of the experts:

    θ = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε)

with F_i the diagonal Fisher of expert i on unlabeled images of its task, ε =
``minimal_fisher_weight`` and, when ``normalize_fisher_weight``, c_i = 1 / (‖F_i‖₂ + ε) over all
of expert i's merged entries (otherwise c_i = 1). This is FusionBench's rule (its common factor
Σ_j 1/(‖F_j‖+ε) cancels in the ratio).

The Fisher is computed on the expert's zero-shot classifier (the pool's frozen text-tower head for
the task) under the model's own predicted distribution p, with FusionBench's (MergeLM's) estimator:
per batch B, g = ∇_θ Σ_{b∈B} Σ_c sqrt(p_bc) · log p_bc (sqrt(p) detached), F += g², and at the end
F /= number of images. It needs one backward pass per batch; it is not the exact
E_x Σ_c p_c (∇ log p_c)² (cross terms between classes and images in a batch remain), see the docs.

Run: ``fusion_bench method=fisher_merging``
Memory: running Σ c(F+ε)θ and Σ c(F+ε) (2 P), one expert's Fisher (1 P), its encoder + gradients
(2 P): experts are processed one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from fusion_bench.tensor_ops import StateDict, expert_tensor, map_keys, mergeable_keys


@dataclass(frozen=True)
class FisherMerging(DataMerge):
    num_fisher_examples: int = 256  # training images per task (FusionBench: 256)
    normalize_fisher_weight: bool = True  # weight expert i by 1/‖F_i‖₂
    minimal_fisher_weight: float = 1e-6  # ε added to every Fisher entry
    batch_size: int = 32  # the estimator squares per-batch gradients: it depends on this
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0
    seed: int = 0  # which training images

    def __post_init__(self):
        check_sample_size(self.num_fisher_examples, self.batch_size)

    def merge(self, pool, data: TaskData, context: Context) -> dict[str, Tensor]:
        fishers = self.expert_fishers(pool, data, context.device)
        return self.fisher_average(
            pool.pretrained(), pool_experts(pool), fishers, key_progress("fisher_merging")
        )

    def models_held(self, n_experts: int) -> float:
        return 5.0  # two running sums + one Fisher + the expert's encoder and its gradients

    # -- the maths -------------------------------------------------------------------------------
    def fisher_average(
        self,
        pretrained: StateDict,
        experts: Experts,
        fishers: Iterable[Mapping[str, Tensor]],
        progress: Progress = None,
    ) -> dict[str, Tensor]:
        """Fisher-weighted average over state dicts.

        ``fishers`` yields each expert's diagonal Fisher ``{key: tensor like the parameter}`` in
        order; it is consumed one expert at a time and only the two running sums are kept. A
        merged key without a Fisher entry counts as F = 0 (its weight is then ε·c_i).
        """
        keys = list(mergeable_keys(pretrained, self.exclude_keys))
        eps = float(self.minimal_fisher_weight)
        numerator: dict[str, Tensor] = {}
        denominator: dict[str, Tensor] = {}
        count = 0
        for (name, expert), fisher in zip(experts.items(), fishers, strict=True):
            coefficient = 1.0
            if self.normalize_fisher_weight:
                sq = sum(float(fisher[k].double().square().sum()) for k in keys if k in fisher)
                coefficient = 1.0 / (math.sqrt(sq) + eps)
            for key in keys:
                base = pretrained[key]
                theta = expert_tensor(expert, key, base, name)
                f = fisher[key].float().cpu() if key in fisher else torch.zeros(base.shape)
                if f.shape != theta.shape:
                    raise FusionBenchError(
                        f"Fisher of '{key}' for expert '{name}' has shape {tuple(f.shape)}, the "
                        f"parameter {tuple(theta.shape)}."
                    )
                weight = coefficient * (f + eps)
                if key in numerator:
                    numerator[key] += weight * theta
                    denominator[key] += weight
                else:
                    numerator[key], denominator[key] = weight * theta, weight
            count += 1
        if count == 0:
            raise FusionBenchError("Fisher merging needs at least one expert.")
        return map_keys(
            pretrained,
            lambda key, _base: numerator.pop(key) / denominator.pop(key),
            self.exclude_keys,
            progress,
        )

    # -- the statistic, per expert ---------------------------------------------------------------
    def expert_fishers(self, pool, data: TaskData, device) -> Iterator[dict[str, Tensor]]:
        """Each expert's Fisher on its own task's training images, computed when asked for."""
        from tqdm.auto import tqdm

        for name in tqdm(pool.expert_names, desc="Fisher information", unit="expert", leave=False):
            encoder = pool.build_encoder(pool.expert(name)).to(device).eval()
            encoder.requires_grad_(True)
            classifier = pool.classifier(encoder)
            head = data.zero_shot_head(classifier, name, device)  # (D, C), frozen
            images = data.images(
                name,
                "train",
                classifier.preprocess,
                self.num_fisher_examples,
                self.batch_size,
                self.seed,
            )
            with torch.enable_grad():
                fisher = diagonal_fisher(
                    encoder,
                    lambda x, c=classifier, h=head: c.logits(x, h),
                    images,
                    device,
                )
            del encoder, classifier
            yield fisher


# -- the statistic ------------------------------------------------------------------------------
def diagonal_fisher(
    model: nn.Module,
    logits_fn: Callable[[Tensor], Tensor],
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """FusionBench's estimator of ``model``'s diagonal Fisher (see the module docstring), keyed by
    parameter name; ``logits_fn(images) -> (B, C)`` runs the model."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    n_images = 0
    for images in batches:
        images = images.to(device)
        log_probs = torch.log_softmax(logits_fn(images).float(), dim=-1)  # (B, C)
        objective = (log_probs.detach().exp().sqrt() * log_probs).sum()
        grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
        for key, grad in zip(params, grads, strict=True):
            if grad is not None:
                fisher[key] += grad.detach().square()
        n_images += images.shape[0]
    if n_images == 0:
        raise FusionBenchError("No calibration images: the Fisher needs at least one batch.")
    return {k: f / n_images for k, f in fisher.items()}
