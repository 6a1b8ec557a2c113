"""MASS: MoErging through Adaptive Subspace Selection (Crisostomi, Zirilli et al., 2025,
arXiv:2504.05342; authors' code github.com/crisostomi/mass).

Build (data-free, training-free), with T experts and τ_t = θ_t − θ0 per tensor:
1. every 2-D tensor (attention and MLP matrices, the positional embedding, the projection; not the
   keys matched by ``average_keys``) keeps, per task, its top k = ⌊min(m, n) / T⌋ singular triplets
   (U_t, s_t, V_t) of τ_t (TSV-C); every other tensor (norms, biases, class token, the patch
   convolution) keeps τ_t whole;
2. the first-pass model θ_MT = θ0 + α·TSV-M(all tasks): per matrix the stacked factors
   [U_1 … U_T] and [V_1; …; V_T] replaced by their orthogonal polar factors, Δ = U⊥ diag(s) V⊥;
   with ``redundancy_threshold`` ε, a task enters a matrix's merge only if the cosine of its rank-k
   update with every task already taken (in pool order) is ≤ ε; the other tensors get the mean of
   the τ_t.

Inference, per image:
1. pass 1 runs θ_MT up to block ``router_layer``; z = the CLS token at the input of that block's
   first MLP layer (its ``ln_2`` output);
2. residuals r_t = ‖z − V_tᵀ V_t z‖₂ with V_t that layer's stored right singular vectors of task t;
   coefficients c = softmax(zscore(−r) / temperature) over tasks (z-score: mean 0, unbiased std,
   + 1e-6, as the authors' code);
3. Ω = {t : c_t > threshold}, at most the ``max_tasks`` largest, the argmax if empty;
4. pass 2 runs θ_Ω = θ0 + α·TSV-M(Ω) (no redundancy filter; other tensors: the mean of Ω's τ_t).
   Images with the same Ω share one model (cached, ``cache_size`` models).
Oracle task id t: Ω = {t} (θ0 + α times t's rank-k update and t's other τ), one pass.

The head is the evaluated task's zero-shot head, as for every model in fusion_bench's tables; the
paper also picks the head by routing (largest max-logit among Ω's heads): see docs/methods/routed/mass.md.

Run: ``fusion_bench method=routed/mass``
Memory: θ0 + the stored factors (≈ 1.3–2 × the matrices, whatever T) + T × the non-matrix
tensors, + θ_MT and up to ``cache_size`` second-pass models while evaluating.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import RoutedMethod, RoutedModel, key_progress
from fusion_bench.method.routed import Tower, check_layer, mlp_inputs
from fusion_bench.spectral import polar_factor, top_singular_triplets
from fusion_bench.tensor_ops import expert_tensor, is_excluded, parallel_map


@dataclass(frozen=True)
class Mass(RoutedMethod):
    # block whose MLP input routes (0-based; negative counts from the end). null: max(0, L − 3),
    # 9 of 12 as the authors for B/32 and B/16 (tiny8: 3 of 6); for L/14 it gives 21 of 24 where
    # the authors use 20: set router_layer=20 there
    router_layer: int | None = None
    threshold: float = 0.2  # η: tasks with a coefficient above it are selected (authors' router)
    max_tasks: int = 3  # K: at most this many tasks per image (a cap: ≥ N = no cap; authors: 3)
    temperature: float = 1.0  # of the softmax over the z-scored −residuals (authors' MassGate)
    scaling_factor: float = 1.0  # α in θ0 + α Δ (the authors' code: 1)
    # cosine above which a task's rank-k update is left out of θ_MT's matrix (authors' latest
    # config: 0.3; null = plain TSV-M, as their first release)
    redundancy_threshold: float | None = 0.3
    average_keys: list[str] = field(default_factory=lambda: ["*text_projection*"])
    cache_size: int = 4  # second-pass models kept (one per distinct Ω; the authors keep 6–10)

    def __post_init__(self):
        if not 0.0 <= self.threshold < 1.0:
            raise FusionBenchError(
                f"method.threshold={self.threshold}: the selection threshold compares softmax "
                "coefficients, so it must be in [0, 1) (paper: 0.2)."
            )
        if self.max_tasks < 1:
            raise FusionBenchError(
                f"method.max_tasks={self.max_tasks}: at least one task must be selected per image "
                "(paper: 3)."
            )
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise FusionBenchError(
                f"method.temperature={self.temperature} must be positive (paper: 1)."
            )
        if not math.isfinite(self.scaling_factor):
            raise FusionBenchError(f"method.scaling_factor={self.scaling_factor} must be finite.")
        ratio = self.redundancy_threshold
        if ratio is not None and not -1.0 <= ratio <= 1.0:
            raise FusionBenchError(
                f"method.redundancy_threshold={ratio} is a cosine: give a value in [-1, 1] "
                "(authors: 0.3), or null to keep every task in the first-pass model."
            )
        if self.cache_size < 1:
            raise FusionBenchError(f"method.cache_size={self.cache_size} must be at least 1.")

    def build(self, pool, data, context) -> MassModel:
        names = list(pool.expert_names)
        if not names:
            raise FusionBenchError("MASS needs at least one expert in the model pool.")
        pretrained, n = pool.pretrained(), len(names)
        experts = {name: pool.expert(name) for name in names}
        factors: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        deltas: dict[str, Tensor] = {}
        for key in key_progress("MASS: per-task singular components")(list(pretrained)):
            base = pretrained[key]
            if not base.is_floating_point():
                continue
            base = base.float()
            if self.compressed(key, base.shape):
                k = min(base.shape) // n
                if k == 0:
                    raise FusionBenchError(
                        f"MASS keeps ⌊rank / experts⌋ = ⌊{min(base.shape)} / {n}⌋ = 0 singular "
                        f"vectors per task for '{key}' {tuple(base.shape)}: merge fewer experts, "
                        f"or add '{key}' to method.average_keys."
                    )

                def compress(name, key=key, base=base, k=k):
                    tau = expert_tensor(experts[name], key, base, name).double() - base.double()
                    return top_singular_triplets(tau, k)

                triplets = parallel_map(compress, names)
                factors[key] = tuple(
                    torch.stack([t[i] for t in triplets]).float() for i in range(3)
                )
            else:
                deltas[key] = torch.stack(
                    [expert_tensor(experts[name], key, base, name) - base for name in names]
                )
        return MassModel(self, pool, names, factors, deltas)

    def compressed(self, key: str, shape) -> bool:
        return len(shape) == 2 and not is_excluded(key, self.average_keys)

    def load(self, pool, expert_names, state) -> MassModel:
        factors: dict[str, list] = defaultdict(lambda: [None, None, None])
        deltas, tower = {}, {}
        for name, tensor in state.items():
            part, _, rest = name.partition(".")
            if part in ("u", "s", "v"):
                factors[_key(rest)]["usv".index(part)] = tensor
            elif part == "delta":
                deltas[_key(rest)] = tensor
            elif name.startswith("tower.encoder."):
                tower[name.removeprefix("tower.encoder.")] = tensor
        model = MassModel(
            self, pool, list(expert_names), {k: tuple(v) for k, v in factors.items()}, deltas
        )
        try:
            model.tower.encoder.load_state_dict(tower, strict=True)
        except RuntimeError as e:
            raise FusionBenchError(
                "The saved MASS model does not fit this model pool's image tower (another "
                f"architecture?): {str(e).splitlines()[0]} Give the pool it was built from."
            ) from None
        return model

    def models_held(self, n_experts: int) -> float:
        # θ0 + factors (~1–2 towers) + T non-matrix τ (small) + θ_MT + cached second-pass models
        return 3.0 + self.cache_size


def coefficients(z: Tensor, v: Tensor, temperature: float) -> Tensor:
    """softmax(zscore(−r) / temperature) over tasks, r_t = ‖z − V_tᵀ V_t z‖₂; ``z`` (B, D), ``v``
    (T, k, D) with orthonormal rows per task. Float64 inside; (B, T) in ``z``'s dtype."""
    v64, z64 = v.to(torch.float64), z.to(torch.float64)
    projected = torch.einsum("tkd,bd->btk", v64, z64)
    residual = (z64[:, None, :] - torch.einsum("btk,tkd->btd", projected, v64)).norm(dim=-1)
    logits = -residual
    if logits.shape[1] > 1:  # the authors' code standardises across tasks (unbiased std + 1e-6)
        logits = (logits - logits.mean(dim=1, keepdim=True)) / (
            logits.std(dim=1, keepdim=True) + 1e-6
        )
    return torch.softmax(logits / temperature, dim=1).to(z.dtype)


def select(coefficients: Tensor, threshold: float, max_tasks: int) -> list[tuple[int, ...]]:
    """Ω per row: the tasks whose coefficient exceeds ``threshold``, at most the ``max_tasks``
    largest, else the argmax; sorted task indices."""
    chosen = []
    for row in coefficients:
        order = torch.argsort(row, descending=True).tolist()
        above = [t for t in order if row[t] > threshold][:max_tasks]
        chosen.append(tuple(sorted(above or order[:1])))
    return chosen


def tsvm(u: Tensor, s: Tensor, v: Tensor, tasks: list[int]) -> Tensor:
    """Δ = polar([U_t]) diag([s_t]) polar([V_t]) over ``tasks`` (float64): TSV-M of stored
    factors ``u`` (T, m, k), ``s`` (T, k), ``v`` (T, k, n)."""
    u_cat = torch.cat([u[t] for t in tasks], dim=1).to(torch.float64)
    s_cat = torch.cat([s[t] for t in tasks]).to(torch.float64)
    v_cat = torch.cat([v[t] for t in tasks], dim=0).to(torch.float64)
    (u_orth, _), (v_orth, _) = polar_factor(u_cat), polar_factor(v_cat)
    return (u_orth * s_cat) @ v_orth


def non_redundant(u: Tensor, s: Tensor, v: Tensor, tasks, eps: float | None) -> list[int]:
    """``tasks`` in order, leaving out one whose rank-k update Δ_t has cosine > ``eps`` with one
    already kept (⟨Δ_t, Δ_a⟩ = Σ (diag(s_t) U_tᵀ U_a diag(s_a)) ⊙ (V_t V_aᵀ), ‖Δ_t‖ = ‖s_t‖).
    ``eps`` None keeps every task."""
    if eps is None:
        return list(tasks)
    kept: list[int] = []
    for t in tasks:
        st, norm_t = s[t].double(), float(s[t].double().norm())
        redundant = False
        for a in kept:
            sa, norm_a = s[a].double(), float(s[a].double().norm())
            gram = st[:, None] * (u[t].double().T @ u[a].double()) * sa
            inner = float((gram * (v[t].double() @ v[a].double().T)).sum())
            if norm_t > 0 and norm_a > 0 and inner / (norm_t * norm_a) > eps:
                redundant = True
                break
        if not redundant:
            kept.append(t)
    return kept


def _safe(key: str) -> str:  # buffer names cannot hold dots
    return key.replace(".", "/")


def _key(name: str) -> str:
    return name.replace("/", ".")


class _Store(nn.Module):
    """A bag of persistent buffers (saved with the routed model, counted as its storage)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for key, tensor in tensors.items():
            self.register_buffer(_safe(key), tensor)

    def get(self, key: str) -> Tensor:
        return getattr(self, _safe(key))


class _Stop(Exception):
    """Raised by the routing hook: nothing after the routing layer is needed in pass 1."""


class MassModel(RoutedModel):
    extra_forward_passes = 1  # pass 1 (θ_MT up to the routing block), then θ_Ω

    def __init__(self, method: Mass, pool, expert_names, factors, deltas):
        super().__init__(expert_names)
        self.method = method
        self.tower = Tower(pool)
        blocks = mlp_inputs(self.tower.encoder)
        layer = (
            max(0, len(blocks) - 3)
            if method.router_layer is None
            else check_layer(method.router_layer, len(blocks), "router_layer")
        )
        self.router_module = blocks[layer]
        self.router_key = f"{self.router_module}.weight"
        if self.router_key not in factors:
            raise FusionBenchError(
                f"MASS routes on '{self.router_key}', which method.average_keys excludes from "
                "the per-task singular components: remove it from average_keys."
            )
        self.u = _Store({k: f[0] for k, f in factors.items()})
        self.s = _Store({k: f[1] for k, f in factors.items()})
        self.v = _Store({k: f[2] for k, f in factors.items()})
        self.delta = _Store(deltas)
        self.matrix_keys, self.other_keys = list(factors), list(deltas)
        self._first: dict[str, Tensor] | None = None
        self._models: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()

    # -- routing --------------------------------------------------------------------------------
    def routing_features(self, images: Tensor) -> Tensor:
        """z (B, D): the CLS token at the routing block's MLP input, under θ_MT."""
        found = []

        def hook(module, inputs):
            x = inputs[0]
            found.append(x[:, 0] if x.shape[0] == images.shape[0] else x[0])
            raise _Stop

        handle = self.tower.encoder.get_submodule(self.router_module).register_forward_pre_hook(
            hook
        )
        try:
            self.tower(images, self.first_pass_model())
        except _Stop:
            pass
        finally:
            handle.remove()
        return found[0]

    def coefficients(self, z: Tensor) -> Tensor:
        """(B, T) routing coefficients of the features ``z`` (B, D)."""
        return coefficients(z, self.v.get(self.router_key), self.method.temperature)

    def select(self, coefficients: Tensor) -> list[tuple[int, ...]]:
        return select(coefficients, self.method.threshold, self.method.max_tasks)

    # -- models ---------------------------------------------------------------------------------
    def first_pass_model(self) -> dict[str, Tensor]:
        """θ_MT: θ0 + α TSV-M over all tasks with the redundancy filter (built once)."""
        if self._first is None:
            self._first = self.build_model(tuple(range(len(self.expert_names))), first_pass=True)
        return self._first

    def merged(self, tasks: tuple[int, ...]) -> dict[str, Tensor]:
        """θ_Ω for the task indices ``tasks`` (least recently used of ``cache_size`` kept)."""
        if tasks in self._models:
            self._models.move_to_end(tasks)
            return self._models[tasks]
        self._models[tasks] = model = self.build_model(tasks)
        while len(self._models) > self.method.cache_size:
            self._models.popitem(last=False)
        return model

    def build_model(self, tasks: tuple[int, ...], first_pass: bool = False) -> dict[str, Tensor]:
        alpha = self.method.scaling_factor
        theta0 = self.tower.pretrained()
        out: dict[str, Tensor] = {}
        for key in self.other_keys:
            delta = self.delta.get(key)[list(tasks)].mean(dim=0)
            out[key] = theta0[key].detach() + alpha * delta

        def merge_matrix(key: str) -> Tensor:
            u, s, v = (store.get(key) for store in (self.u, self.s, self.v))
            eps = self.method.redundancy_threshold if first_pass else None
            kept = non_redundant(u, s, v, tasks, eps)
            base = theta0[key].detach()
            if not kept:
                return base
            return base + alpha * tsvm(u, s, v, kept).to(base.dtype)

        out.update(zip(self.matrix_keys, parallel_map(merge_matrix, self.matrix_keys), strict=True))
        return out

    def _apply(self, fn, recurse=True):  # .to(device) etc.: cached models are rebuilt there
        self._first, self._models = None, OrderedDict()
        return super()._apply(fn, recurse)

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, images: Tensor, task: str | None = None) -> Tensor:
        if task is not None:
            return self.tower(images, self.merged((self.expert_index(task),)))
        coefficients = self.coefficients(self.routing_features(images))
        self.last_routing = coefficients
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, tasks in enumerate(self.select(coefficients)):
            groups[tasks].append(i)
        out: Tensor | None = None
        for tasks, rows in groups.items():
            index = torch.tensor(rows, device=images.device)
            features = self.tower(images[index], self.merged(tasks))
            if out is None:
                out = features.new_empty((images.shape[0], *features.shape[1:]))
            out[index] = features
        assert out is not None
        return out
