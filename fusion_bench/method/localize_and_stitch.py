"""Localize-and-Stitch (He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task
Arithmetic", TMLR 2025, arXiv:2408.13656).

Two steps, for task vectors τ_t = θ_t − θ0 over all merged parameters:

1. **localize**: a binary mask m_t per task.
   - ``localize_and_stitch`` (dataless, :class:`LocalizeAndStitch`): m_t = |τ_t| > κ_t, with κ_t
     the k-th largest |τ_t| over the WHOLE model (one threshold per task, all tensors together),
     k = ⌊sparsity · P⌋ (P: number of merged entries). The strict ">" is the reference's: with
     distinct magnitudes k − 1 entries are kept, and an entry with τ = 0 is never kept.
   - ``localize_and_stitch_learned`` (:class:`LocalizeAndStitchLearned`): mask logits S_t start
     at ±``sigmoid_bias`` (+ on the dataless mask above at the small initial ``sparsity``) and are
     trained on a few labeled training images of task t: each epoch, at θ = θ0 + σ(S_t) ⊙ τ_t,
     the cross-entropy gradients g of all batches are summed, then
     S_t ← S_t − lr · (g ⊙ τ_t) ⊙ σ'(S_t) + λ · sign(S_t) ⊙ σ'(S_t)
     (λ = ``l1_strength``, sign(0) = −1): the authors' code, whose λ-term pushes the logits away
     from 0; ``regularizer: paper`` uses the gradient of the paper's λ‖σ(S_t)‖₁ instead,
     S_t ← S_t − lr · (g ⊙ τ_t) ⊙ σ'(S_t) − λ · σ'(S_t). Finally m_t = [S_t > 0] (round(σ(S))).
2. **stitch**: θ = θ0 + Σ_t m_t ⊙ τ_t / c with c = Σ_t m_t per entry (overlaps averaged;
   θ0 where no mask covers an entry). No scaling factor: the paper tunes none.

Checked against the authors' code (github.com/yifei-he/Localize-and-Stitch, ``localize_utils.py``:
``Localizer.create_basepatch`` / ``train_graft`` / ``interpolate_model``, ``Stitcher``;
``vision/src/main_localize_stitch.py`` and ``main_dataless_localize_stitch.py`` for the defaults);
see docs/methods/localize_and_stitch.md.

Run: ``fusion_bench method=localize_and_stitch`` / ``method=localize_and_stitch_learned``
Memory (dataless): the thresholds by a streaming exact selection
(:func:`fusion_bench.tensor_ops.kth_smallest_magnitudes`, two passes, one τ tensor at a time), then
one pass key by key: the output + O(1) tensors of one key, independent of N; each expert is read
three times. Learned: θ0, one τ and its logits S, the encoder with its gradients, and the stitch
sums Σ m τ and Σ m: about 7 image towers, one task at a time (independent of N).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import (
    Context,
    DataMerge,
    Experts,
    Progress,
    StateDictMerge,
    require_experts,
)
from fusion_bench.taskpool.data import TaskData, check_sample_size
from fusion_bench.tensor_ops import (
    Scratch,
    StateDict,
    expert_tensor,
    kth_smallest_magnitudes,
    map_keys,
    mergeable_keys,
    streamed_task_vectors,
)

log = logging.getLogger(__name__)


# -- localize: the top-k mask over the whole model --------------------------------------------------
def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise FusionBenchError(
            f"method.sparsity={sparsity} is not a fraction in [0, 1]: it is the share of each task "
            "vector's entries kept, over the whole model (e.g. 0.1 for 10 %)."
        )


def localize_thresholds(
    pretrained: StateDict, experts: Experts, sparsity: float, exclude_keys: Sequence[str] = ()
) -> list[Tensor]:
    """Per task, κ_t: the k-th largest |τ_t| over all merged entries, k = ⌊sparsity · P⌋
    (+inf when k = 0: nothing kept). Entries with |τ_t| > κ_t form the mask."""
    keys = list(mergeable_keys(pretrained, exclude_keys))
    numel = sum(pretrained[k].numel() for k in keys)
    k = int(sparsity * numel)  # as the reference: int(sparsity · numel)
    if k == 0 or not experts:
        return [torch.tensor(float("inf"))] * len(experts)
    task_vectors = streamed_task_vectors(pretrained, experts, keys)

    # the k-th largest of P values is the (P − k + 1)-th smallest
    return kth_smallest_magnitudes(task_vectors, [numel - k + 1] * len(experts))


class Stitch:
    """Running Σ_t m_t ⊙ τ_t and Σ_t m_t for one tensor; :meth:`result` is θ0 + their ratio
    (θ0 where no mask covers an entry)."""

    def __init__(self, base: Tensor):
        self.base = base
        self.total = torch.zeros_like(base)
        self.count = torch.zeros_like(base)

    def add(self, tau: Tensor, mask: Tensor) -> None:
        self.total += tau * mask
        self.count += mask

    def result(self) -> Tensor:
        return self.base + self.total / self.count.clamp(min=1.0)


@dataclass(frozen=True)
class LocalizeAndStitch(StateDictMerge):
    # share of each task vector kept, one threshold over the whole model (the authors' vision
    # dataless script: 0.1; their language one: 0.05)
    sparsity: float = 0.1
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        check_sparsity(self.sparsity)

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        require_experts(experts, "Localize-and-Stitch")
        kth = localize_thresholds(pretrained, experts, self.sparsity, self.exclude_keys)
        scratch = Scratch()

        def merge_key(key: str, base: Tensor) -> Tensor:
            stitch = Stitch(base)
            tau = scratch("tau", base.numel(), torch.float32).view(base.shape)
            for (name, expert), t in zip(experts.items(), kth, strict=True):
                torch.sub(expert_tensor(expert, key, base, name), base, out=tau)
                stitch.add(tau, tau.abs() > t)
            return stitch.result()

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)


# -- the learned masks ---------------------------------------------------------------------------
REGULARIZERS = ("reference", "paper")


@dataclass(frozen=True)
class LocalizeAndStitchLearned(DataMerge):
    sparsity: float = 1e-5  # initial mask: this share of |τ| (whole model) starts on
    sigmoid_bias: float = 5.0  # initial logits: +bias on the initial mask, −bias elsewhere
    learning_rate: float = 1e7  # step on the loss gradient (the authors' vision script)
    l1_strength: float = 1.0  # λ of the sparsity term (vision: 1; their language script: 10)
    regularizer: str = "reference"  # reference: the authors' code's update | paper: ∇ λ‖σ(S)‖₁
    num_epochs: int = 10  # full passes over the few-shot sample, one mask step each
    shots_per_class: int = 64  # labeled training images per class (the authors' 64-shot)
    max_samples: int = 1024  # at most this many per task (the authors' data cap)
    batch_size: int = 128  # the gradient is a sum of per-batch mean losses: it depends on this
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0
    seed: int = 0  # which training images, and their order in each epoch

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_sample_size(self.shots_per_class, self.batch_size)
        check_sample_size(self.max_samples, self.batch_size)
        if self.num_epochs < 0:
            raise FusionBenchError(
                f"method.num_epochs={self.num_epochs} is negative: give the number of mask "
                "training epochs (0 keeps the initial top-sparsity mask; the authors use 10)."
            )
        if self.regularizer not in REGULARIZERS:
            raise FusionBenchError(
                f"method.regularizer={self.regularizer!r} is not one of {list(REGULARIZERS)}: "
                "'reference' (the authors' code, λ·sign(S)·σ'(S) added to S) or 'paper' (the "
                "gradient of λ‖σ(S)‖₁, λ·σ'(S) subtracted)."
            )
        if not self.sigmoid_bias > 0:
            raise FusionBenchError(
                f"method.sigmoid_bias={self.sigmoid_bias} must be > 0: the initial mask logits "
                "are ±sigmoid_bias (the authors use 5)."
            )

    def models_held(self, n_experts: int) -> float:
        return 7.0  # θ0, τ_t, S_t, encoder + gradients, the stitch sums Σ m τ and Σ m

    def merge(self, pool, data: TaskData, context: Context) -> dict[str, Tensor]:
        from tqdm.auto import tqdm

        device = context.device
        epochs = min(self.num_epochs, 1) if context.fast_dev_run else self.num_epochs
        pretrained = pool.pretrained()
        encoder = pool.build_encoder().to(device).eval()
        classifier = pool.classifier(encoder)
        params = dict(encoder.named_parameters())
        # the masks cover the encoder's parameters among the merged keys (the reference's
        # named_parameters); other floating tensors stay at θ0
        keys = [k for k in mergeable_keys(pretrained, self.exclude_keys) if k in params]
        theta0 = {k: pretrained[k].to(torch.float32) for k in keys}  # CPU
        stitches = {k: Stitch(theta0[k]) for k in keys}
        for name in tqdm(pool.expert_names, desc="localize", unit="task", leave=False):
            expert = pool.expert(name)
            tau = {k: expert_tensor(expert, k, theta0[k], name) - theta0[k] for k in keys}
            (kth,) = localize_thresholds(theta0, {name: expert}, self.sparsity)
            logits = {k: initial_logits(tau[k], kth, self.sigmoid_bias).to(device) for k in keys}
            if epochs > 0:
                head = data.zero_shot_head(classifier, name, device)  # (D, C), frozen
                batches = self._epochs(data, name, classifier.preprocess, context.fast_dev_run)
                logits = learn_mask_logits(
                    encoder,
                    {k: v.to(device) for k, v in theta0.items()},
                    {k: v.to(device) for k, v in tau.items()},
                    logits,
                    lambda x, c=classifier, h=head: c.logits(x, h),
                    batches,
                    epochs,
                    self.learning_rate,
                    self.l1_strength,
                    self.regularizer,
                )
            kept, total = 0, 0
            for k in keys:
                mask = (logits[k] > 0).cpu().to(torch.float32)  # round(σ(S)) = 1 iff S > 0
                stitches[k].add(tau[k], mask)
                kept, total = kept + int(mask.sum()), total + mask.numel()
            log.info("Localize-and-Stitch: mask of %s keeps %.4f%%", name, 100 * kept / total)
            if context.fabric is not None:
                context.fabric.log_dict({f"localize/{name}/proportion": kept / max(total, 1)})
            del tau, logits
        merged = {k: s.result() for k, s in stitches.items()}
        return {k: merged[k] if k in merged else pretrained[k].clone() for k in pretrained}

    def _epochs(self, data: TaskData, task: str, preprocess, fast_dev_run: bool):
        """epoch -> batches (images, labels) of the task's few-shot sample, reshuffled per
        epoch like the reference's shuffled loader (one batch under fast_dev_run)."""
        sample = few_shot_sample(data, task, self.shots_per_class, self.max_samples, self.seed)

        def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            shuffled = sample.shuffle(seed=self.seed + epoch + 1, keep_in_memory=True)
            for i, batch in enumerate(data.loader(shuffled, task, preprocess, self.batch_size)):
                yield batch
                if fast_dev_run and i == 0:
                    return

        return batches


def initial_logits(tau: Tensor, kth: Tensor, bias: float) -> Tensor:
    """The reference's initial mask logits: +bias where |τ| > κ, −bias elsewhere."""
    return torch.where(tau.abs() > kth, bias, -bias).to(torch.float32)


def few_shot_sample(data: TaskData, task: str, shots: int, cap: int, seed: int):
    """At most ``shots`` training images per class (a seeded random choice), at most ``cap`` in
    all (a seeded random subset), as the reference's k-shot set (which takes the first ``shots``
    of each class in its dataset's order)."""
    ds = data.load_split(task, "train")
    labels = ds[data.spec(task).label_column]
    generator = torch.Generator().manual_seed(seed)
    taken: dict[int, int] = {}
    chosen = []
    for i in torch.randperm(len(ds), generator=generator).tolist():
        label = int(labels[i])
        if taken.get(label, 0) < shots:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(i)
    order = torch.randperm(len(chosen), generator=generator).tolist()
    return ds.select(sorted(chosen[j] for j in order[:cap]))


def learn_mask_logits(
    model: nn.Module,
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    logits: dict[str, Tensor],
    logits_fn,
    batches,
    epochs: int,
    lr: float,
    l1_strength: float,
    regularizer: str = "reference",
) -> dict[str, Tensor]:
    """The reference's mask training (``Localizer.train_graft``) on ``model``'s parameters named
    in ``logits``: each epoch, the parameters are set to θ0 + σ(S) ⊙ τ, the cross-entropy
    gradients of all ``batches(epoch)`` (images, labels) are summed (one backward per batch, each a
    batch mean), and S ← S − lr·(g ⊙ τ)·σ'(S) + λ·sign(S)·σ'(S) (sign(0) = −1; ``regularizer=
    "reference"``) or S ← S − lr·(g ⊙ τ)·σ'(S) − λ·σ'(S) (``"paper"``: the gradient of
    λ‖σ(S)‖₁). Returns S (updated in place). ``model`` is left at θ0."""
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for k in logits:
        params[k].requires_grad_(True)
    loss_fn = nn.CrossEntropyLoss()
    device = params[next(iter(logits))].device if logits else torch.device("cpu")
    try:
        for epoch in range(epochs):
            with torch.no_grad():
                for k in logits:
                    params[k].copy_(theta0[k] + torch.sigmoid(logits[k]) * tau[k])
                    params[k].grad = None
            with torch.enable_grad():
                for images, labels in batches(epoch):
                    loss = loss_fn(logits_fn(images.to(device)).float(), labels.to(device))
                    loss.backward()  # gradients accumulate: the sum over the epoch's batches
            with torch.no_grad():
                for k, s in logits.items():
                    grad = params[k].grad
                    g = lr * grad * tau[k] if grad is not None else torch.zeros_like(s)
                    sig = torch.sigmoid(s)
                    derivative = sig * (1 - sig)
                    if regularizer == "paper":
                        s -= g * derivative + l1_strength * derivative
                    else:  # the reference's active line: pushes S away from 0
                        s -= g * derivative - l1_strength * torch.where(
                            s > 0, derivative, -derivative
                        )
    finally:
        with torch.no_grad():
            for k in logits:
                params[k].copy_(theta0[k])
                params[k].grad = None
        model.requires_grad_(False)
    return logits
