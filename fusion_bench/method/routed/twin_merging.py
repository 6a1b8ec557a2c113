"""Twin-Merging (Lu, Fan, Wei, Qu, Chen, Cheng, "Twin-Merging: Dynamic Integration of Modular
Expertise in Model Merging", NeurIPS 2024, arXiv:2406.15479; authors' code
github.com/LZY-the-boys/Twin-Merging, ``discriminative/``).

Build, with T experts θ_t:
1. **shared expert** θ_s = a data-free ``base`` merge, by default task arithmetic
   θ_s = θ0 + α Σ_t (θ_t − θ0) with α = 0.3 (the authors' generative setting; 0.29 for RoBERTa);
2. **exclusive experts** v_t = θ_t − θ_s, compressed per 2-D tensor to its top
   r = ⌊f · min(m, n)⌋ singular triplets, v_t ≈ U_r diag(s_r) V_rᵀ (f = ``rank_fraction``, the
   authors' density 1 − mask_rate = 0.1); every other tensor (biases, norms, class token, the patch
   convolution) is kept whole; a matrix with r = 0 gets no exclusive part;
3. **router**: an MLP d → 2d → 2d → T (Linear, BatchNorm, LeakyReLU, dropout 0.5 after each of the
   two hidden layers) on z(x) = the mean over all tokens of the shared model's last transformer
   block output (its last hidden state); trained with cross-entropy on the task id of
   ``num_samples`` validation images per task (their class labels are never read), AdamW
   (weight decay 0) at ``lr`` with linear decay to 0, ``batch_size`` features per step,
   ``epochs`` epochs.

Inference, per image x: pass 1 runs θ_s to get z(x); p = softmax(router(z(x))) (no temperature);
pass 2 runs θ(x) = θ_s + Σ_t p_t v_t. ``last_routing`` = p. Oracle task id t: p = one-hot(t), so
θ = θ_s + v_t. The routing weights differ per image, so pass 2 runs image by image (as the
authors' ``functional_call`` per sample); images with identical p (the oracle mode: a whole
batch) share one pass. θ(x) is one matrix-vector product over the flattened dense v_t, which are
reconstructed once from the stored factors and cached at inference.

Run: ``fusion_bench method=routed/twin_merging``
Memory: building: the base merge (task arithmetic: 1 tower) and θ0, then θ_s + the factors, one
expert tensor and its float64 SVD at a time. Inference: the T dense v_t (T towers, rebuilt from the
factors), θ_s flattened and one assembled model: T + 2 towers besides the stored model.
Stored: θ_s + T·r(m + n) per matrix + T × the other tensors + the router.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import (
    Context,
    RoutedMethod,
    RoutedModel,
    StateDictMerge,
    base_merge,
    check_finite,
    key_progress,
)
from fusion_bench.method.routed import Tower, mlp_inputs
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.tensor_ops import expert_tensor, parallel_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwinMerging(RoutedMethod):
    base: str = "task_arithmetic"  # the data-free merge giving the shared expert θ_s
    # over the base's YAML defaults (task_arithmetic: α = 0.3, the authors' generative setting;
    # RoBERTa: 0.29)
    base_options: dict[str, Any] = field(default_factory=dict)
    rank_fraction: float = 0.1  # r = ⌊f·min(m, n)⌋ per matrix (authors: mask_rate 0.9, svd)
    num_samples: int = 1000  # validation images per task to train the router (authors: ≤5500)
    batch_size: int = 1024  # router batch (authors' Trainer) and feature-extraction batch
    epochs: int = 50  # router training epochs (authors: 50)
    lr: float = 5e-4  # AdamW learning rate, linear decay to 0 (authors: 5e-4)
    seed: int = 42  # validation sample, router initialisation, dropout and batch order

    def __post_init__(self):
        if not (0.0 < self.rank_fraction <= 1.0):
            raise FusionBenchError(
                f"method.rank_fraction={self.rank_fraction} is not in (0, 1]: it is the share "
                "of each matrix's rank kept per exclusive expert, r = ⌊f·min(m, n)⌋ (authors: "
                "0.1; 1 keeps θ_t − θ_s exactly)."
            )
        if self.num_samples < 1:
            raise FusionBenchError(
                f"method.num_samples={self.num_samples}: the router is trained on this many "
                "validation images per task; give at least 1 (default 1000)."
            )
        if self.batch_size < 2:
            raise FusionBenchError(
                f"method.batch_size={self.batch_size}: the router's BatchNorm needs at least 2 "
                "features per step; give 2 or more (authors: 1024)."
            )
        if self.epochs < 1:
            raise FusionBenchError(
                f"method.epochs={self.epochs}: the router needs at least 1 training epoch "
                "(authors: 50)."
            )
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise FusionBenchError(
                f"method.lr={self.lr}: the router's learning rate must be a positive number "
                "(authors: 5e-4)."
            )
        self.base_method()  # the base's own checks, before anything is loaded

    def base_method(self) -> StateDictMerge:
        return base_merge(self.base, self.base_options, "base")

    def rank(self, shape: Sequence[int]) -> int:
        """r = ⌊f · min(m, n)⌋ for a matrix of ``shape`` (a tolerance keeps ⌊0.29·100⌋ at 29)."""
        return int(math.floor(self.rank_fraction * min(shape) + 1e-9))

    def models_held(self, n_experts: int) -> float:
        building = self.base_method().models_held(n_experts) + 1.0  # + θ0 in the tower
        return max(building, n_experts + 2.0)  # inference: dense v_t, flat θ_s, θ(x)

    # -- build ------------------------------------------------------------------------------------
    def build(self, pool, data, context: Context) -> TwinMergingModel:
        names = list(pool.expert_names)
        if not names:
            raise FusionBenchError("Twin-Merging needs at least one expert in the model pool.")
        if data is None:
            raise FusionBenchError(
                "Twin-Merging trains its router on validation images of every expert's task: "
                "give a task pool (fusion_bench.evaluate(..., taskpool) or the CLI's taskpool)."
            )
        pretrained = pool.pretrained()
        experts = {name: pool.expert(name) for name in names}
        shared = dict(
            self.base_method().merge(pretrained, experts, key_progress("twin: shared expert"))
        )
        check_finite(shared)
        factors, whole = self.exclusive_experts(shared, experts)
        model = TwinMergingModel(pool, names, factors, whole, shared)
        del shared
        model.to(context.device)
        self.train_router(model, pool, data, context)
        return model.eval()

    def exclusive_experts(
        self, shared: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """v_t = θ_t − θ_s per key: {key: (U diag(s) (T, m, r), Vᵀ (T, r, n))} for the matrices,
        {key: (T, *shape)} for the other floating tensors; float64 SVDs, stored in float32."""
        names = list(experts)
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        whole: dict[str, Tensor] = {}
        for key in key_progress("twin: exclusive experts")(list(shared)):
            theta_s = shared[key]
            if not theta_s.is_floating_point():
                continue
            theta_s = theta_s.float()
            if theta_s.dim() != 2:
                whole[key] = torch.stack(
                    [expert_tensor(experts[n], key, theta_s, n) - theta_s for n in names]
                )
                continue
            r = self.rank(theta_s.shape)
            if r == 0:
                continue

            def compress(name, key=key, theta_s=theta_s, r=r):
                v = expert_tensor(experts[name], key, theta_s, name).double() - theta_s.double()
                u, s, vh = top_singular_triplets(v, r)
                return (u * s).float(), vh.float()

            pairs = parallel_map(compress, names)
            factors[key] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        return factors, whole

    def load(self, pool, expert_names, state) -> TwinMergingModel:
        factors: dict[str, list] = {}
        whole: dict[str, Tensor] = {}
        for name, tensor in state.items():
            part, _, rest = name.partition(".")
            if part in ("u", "v"):
                factors.setdefault(_key(rest), [None, None])["uv".index(part)] = tensor
            elif part == "whole":
                whole[_key(rest)] = tensor
        if any(None in pair for pair in factors.values()):
            raise FusionBenchError(
                "The saved Twin-Merging model has a matrix with only one of its two factors: the "
                "save is incomplete. Save the routed model again."
            )
        model = TwinMergingModel(
            pool, list(expert_names), {k: tuple(v) for k, v in factors.items()}, whole
        )
        try:
            model.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise FusionBenchError(
                "The saved Twin-Merging model does not fit this model pool's image tower or "
                f"experts (another architecture?): {str(e).splitlines()[0]} Give the pool it "
                "was built from."
            ) from None
        return model.eval()

    # -- the router -------------------------------------------------------------------------------
    def train_router(self, model: TwinMergingModel, pool, data, context: Context) -> None:
        """Cross-entropy on the task id of the validation images' shared-model features."""
        from tqdm.auto import tqdm

        device = context.device
        preprocess = pool.classifier(model.tower.encoder).preprocess
        features, labels = [], []
        with torch.no_grad():
            model.eval()
            for index, task in enumerate(tqdm(model.expert_names, desc="twin: router data")):
                batches = data.images(
                    task, "validation", preprocess, self.num_samples, self.batch_size, self.seed
                )
                for images in batches:
                    features.append(model.router_features(images.to(device)).float())
                    labels.append(torch.full((len(images),), index, dtype=torch.long))
                    if context.fast_dev_run:
                        break
        z, y = torch.cat(features), torch.cat(labels).to(device)
        if len(z) < 2:
            raise FusionBenchError(
                f"The router's training set has {len(z)} image: the BatchNorm of the router needs "
                "at least 2. Give tasks with validation images, or a larger method.num_samples."
            )
        whole_batches, rest = divmod(len(z), self.batch_size)
        per_epoch = whole_batches + (rest >= 2)  # a last batch of one is skipped (BatchNorm)
        total = 1 if context.fast_dev_run else self.epochs * per_epoch
        router = model.router
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            for module in router.modules():
                if hasattr(module, "reset_parameters") and module is not router:
                    module.reset_parameters()
            optimizer = torch.optim.AdamW(router.parameters(), lr=self.lr, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)
            router.train()
            step, bar = 0, tqdm(total=total, desc="twin: router", unit="step")
            while step < total:
                order = torch.randperm(len(z), device=z.device)
                loss_sum, correct, seen = 0.0, 0, 0
                for start in range(0, len(z), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    if len(batch) < 2 or step >= total:  # BatchNorm: no singleton batch
                        continue
                    logits = router(z[batch])
                    loss = nn.functional.cross_entropy(logits, y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    step += 1
                    loss_sum += loss.item() * len(batch)
                    correct += int((logits.argmax(dim=-1) == y[batch]).sum())
                    seen += len(batch)
                    bar.update(1)
                if seen:
                    record = {"router/loss": loss_sum / seen, "router/train_acc": correct / seen}
                    bar.set_postfix(loss=f"{record['router/loss']:.4f}")
                    if context.fabric is not None:
                        context.fabric.log_dict(record, step=step)
            bar.close()
        router.eval()
        with torch.no_grad():
            accuracy = float((router(z).argmax(dim=-1) == y).float().mean())
        log.info("Twin-Merging router: %.4f accuracy on its %d training images", accuracy, len(z))


def _safe(key: str) -> str:  # buffer names cannot hold dots
    return key.replace(".", "/")


def _key(name: str) -> str:
    return name.replace("/", ".")


class _Store(nn.Module):
    """Persistent buffers keyed by canonical state-dict keys (saved, counted as storage)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        for key, tensor in tensors.items():
            self.register_buffer(_safe(key), tensor)

    def get(self, key: str) -> Tensor:
        return getattr(self, _safe(key))


def router_mlp(width: int, n_experts: int) -> nn.Sequential:
    """The authors' router: d → 2d → 2d → T, BatchNorm + LeakyReLU + dropout 0.5 per hidden layer."""
    hidden = 2 * width
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.BatchNorm1d(hidden),
        nn.LeakyReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.LeakyReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, n_experts),
    )


class TwinMergingModel(RoutedModel):
    """θ_s (the tower's own parameters), the factors of the exclusive experts and the router."""

    extra_forward_passes = 1  # the shared model's pass for the router's features

    def __init__(
        self,
        pool,
        expert_names: Sequence[str],
        factors: Mapping[str, tuple[Tensor, Tensor]],
        whole: Mapping[str, Tensor],
        shared: Mapping[str, Tensor] | None = None,
    ):
        super().__init__(expert_names)
        self.tower = Tower(pool)
        if shared is not None:  # the tower's parameters become θ_s
            own = self.tower.encoder.state_dict(keep_vars=True)
            with torch.no_grad():
                for key, value in own.items():
                    if value.is_floating_point():
                        value.copy_(shared[key])
        self.tower.requires_grad_(False)
        n = len(self.expert_names)
        for key, tensor in [*((k, f[0]) for k, f in factors.items()), *whole.items()]:
            if tensor.shape[0] != n:
                raise FusionBenchError(
                    f"The exclusive expert of '{key}' holds {tensor.shape[0]} tasks but the model "
                    f"has {n} experts {self.expert_names}: the saved model and its config.json "
                    "disagree. Save the routed model again."
                )
        self.u = _Store({k: f[0] for k, f in factors.items()})
        self.v = _Store({k: f[1] for k, f in factors.items()})
        self.whole = _Store(whole)
        self.whole_keys = set(whole)
        self.delta_keys = [k for k in self.tower.pretrained() if k in factors or k in whole]
        last_mlp = mlp_inputs(self.tower.encoder)[-1]  # the last block's first MLP layer
        self.width = self.tower.encoder.get_submodule(last_mlp).in_features
        self.last_block = last_mlp.rsplit(".mlp.", 1)[0]
        self.router = router_mlp(self.width, n)
        self._dense: tuple[Tensor, Tensor] | None = None

    # -- the exclusive experts --------------------------------------------------------------------
    def exclusive(self, key: str) -> Tensor:
        """The T exclusive experts of ``key`` as dense tensors (T, *shape)."""
        if key in self.whole_keys:
            return self.whole.get(key)
        return torch.bmm(self.u.get(key), self.v.get(key))

    def dense(self) -> tuple[Tensor, Tensor]:
        """(θ_s flattened over ``delta_keys`` (P,), the dense v_t flattened (T, P)), built once
        from the stored factors (rebuilt after ``.to()`` or ``load_state_dict``)."""
        if self._dense is None:
            theta = self.tower.pretrained()
            device = next(self.tower.parameters()).device
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                flat = torch.cat([theta[k].detach().float().flatten() for k in self.delta_keys])
                rows = [self.exclusive(k).float().flatten(1) for k in self.delta_keys]
                stacked = (
                    torch.cat(rows, dim=1) if rows else flat.new_zeros(len(self.expert_names), 0)
                )
            self._dense = (flat, stacked)
        return self._dense

    def weights(self, p: Tensor) -> dict[str, Tensor]:
        """θ_s + Σ_t p_t v_t over ``delta_keys`` for the routing weights ``p`` (T,)."""
        flat, stacked = self.dense()
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            merged = torch.addmv(flat, stacked.T, p.to(flat.device, flat.dtype))
        theta = self.tower.pretrained()
        out, start = {}, 0
        for key in self.delta_keys:
            shape = theta[key].shape
            size = math.prod(shape)
            out[key] = merged[start : start + size].view(shape)
            start += size
        return out

    def _apply(self, fn, recurse=True):  # .to(device) etc.: the dense cache is rebuilt there
        self._dense = None
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._dense = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- routing ----------------------------------------------------------------------------------
    def router_features(self, images: Tensor) -> Tensor:
        """z (B, d): the token mean of the last transformer block's output under θ_s."""
        found = []

        def hook(module, args, output):
            found.append(output[0] if isinstance(output, tuple) else output)

        block = self.tower.encoder.get_submodule(self.last_block)
        handle = block.register_forward_hook(hook)
        try:
            self.tower(images)
        finally:
            handle.remove()
        hidden = found[-1]
        if hidden.shape[0] != images.shape[0]:  # a sequence-first transformer
            hidden = hidden.transpose(0, 1)
        return hidden.float().mean(dim=1)

    def routing(self, images: Tensor) -> Tensor:
        """p (B, T) = softmax(router(z(x)))."""
        return torch.softmax(self.router(self.router_features(images)).float(), dim=-1)

    # -- the contract -----------------------------------------------------------------------------
    def forward(self, images: Tensor, task: str | None = None) -> Tensor:
        if task is not None:
            p = torch.zeros(len(self.expert_names), device=images.device)
            p[self.expert_index(task)] = 1.0
            return self.tower(images, self.weights(p))
        p = self.routing(images)
        self.last_routing = p
        rows, inverse = torch.unique(p, dim=0, return_inverse=True)
        out: Tensor | None = None
        for j, row in enumerate(rows):  # one pass per distinct routing (per image when soft)
            index = (inverse == j).nonzero().flatten()
            features = self.tower(images[index], self.weights(row))
            if out is None:
                out = features.new_empty((images.shape[0], *features.shape[1:]))
            out[index] = features
        assert out is not None
        return out
