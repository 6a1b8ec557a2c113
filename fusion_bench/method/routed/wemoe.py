"""WEMoE: Weight-Ensembling Mixture of Experts (Tang et al., "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", ICML 2024; FusionBench ``we_moe``).

With θ0 the pretrained image tower, τ_t = θ_t − θ0 (t = 1..T) and λ0 = ``init_lambda``:

- everything that is not a transformer-block MLP (attention, LayerNorms, embeddings, the final
  projection) is merged once by task arithmetic: θ0 + λ0 Σ_t τ_t;
- the MLP of **every** block l becomes a weight-ensembling MoE: for an input x, its two linear
  layers (weights and biases) are W(x) = W0 + Σ_t λ_{l,t}(x) τ_t^{MLP}, where W0 is the
  *pretrained* MLP (the task-arithmetic MLP is discarded);
- the coefficients come from a per-block router on the block's MLP input h (the ``ln_2`` output,
  all tokens incl. CLS): r(h) = W2 ReLU(W1 h + b1) + b2 (W1: d×d, W2: T×d; no softmax), computed
  per token and averaged over the tokens of a sample: λ_l(x) = mean_tokens r(h) ∈ R^T;
  W1, W2 ~ N(0, 0.01²), b1 = 0, b2 = λ0, so at initialisation λ ≈ λ0: task arithmetic;
- the routers (the only trainable parameters) are trained by test-time adaptation: Adam, minimising
  the Shannon entropy of the zero-shot predictions on unlabeled test images of every task (a
  batch per task per step, the entropies summed over tasks).

Each linear layer runs per sample: W(x) = W0 + Σ_t λ_t(x) τ_t is formed for a chunk of samples at
a time (≤ ``MERGE_CHUNK`` numbers, one GEMM with the stacked τ), applied with one batched matmul
and dropped; a custom backward re-forms it, so autograd keeps only the layer's input. The
mixing costs T·P per sample (P = the layer's size), not T·S·P as Σ_t λ_t (τ_t x) per token would.

Task-agnostic mode: the routers decide; ``last_routing`` is λ(x) averaged over the blocks, a
(B, T) matrix of raw coefficients (not probabilities; its argmax is scored as routing accuracy).
Oracle mode (``task=<expert>``, not in the paper, which has none): every block uses λ = one-hot
(coefficient 1 for that expert, 0 for the others), i.e. that expert's own MLPs, with the same
task-arithmetic non-MLP weights.

Run: ``fusion_bench method=routed/wemoe``
Memory: the routed model stores the TA tower (with W0 as its MLPs) + T MLP task vectors + the
routers (≈ 1 + 0.65 T towers for CLIP ViTs); building holds one more tower (the TA state dict)
and the routers' gradients and Adam moments; test-time adaptation holds the activations of one
task's batch (the mixing layers keep only their inputs) + ≤ 2 merge chunks (2 × 128 MiB).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.adamerging import entropy, stack_task_vectors, unlabeled_batches
from fusion_bench.method.base import Context, RoutedMethod, RoutedModel, pool_experts
from fusion_bench.method.routed import mlp_inputs
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors

MERGE_CHUNK = 2**25  # numbers of per-sample merged weights formed at once (128 MiB in float32)
ROUTER_STD = 0.01  # std of the routers' weight initialisation (FusionBench models/we_moe.py)


# -- the maths ----------------------------------------------------------------------------------
def mixed_linear(
    x: Tensor, lam: Tensor, weight: Tensor, bias: Tensor, tau_w: Tensor, tau_b: Tensor
) -> Tensor:
    """A linear layer whose parameters are W0 + Σ_t λ_t τ_t (weight and bias alike).

    ``x``: (B, S, in); ``lam``: (B, T) one coefficient vector per sample, or (T,) shared by the
    batch; ``weight`` (out, in), ``bias`` (out,): W0, b0; ``tau_w`` (T, out, in), ``tau_b``
    (T, out): the task vectors (constants: no gradient flows to them). Returns (B, S, out),
    differentiable in ``x`` and ``lam``."""
    if lam.dim() == 1:  # one merged layer for the whole batch: plain autograd
        n_out, n_in = weight.shape
        w = torch.addmm(weight.reshape(1, -1), lam[None].to(tau_w.dtype), tau_w.flatten(1))
        return F.linear(x, w.view(n_out, n_in), bias + lam.to(tau_b.dtype) @ tau_b)
    return _PerSampleLinear.apply(x, lam, weight, bias, tau_w, tau_b)


def _chunks(batch: int, n_out: int, n_in: int) -> list[slice]:
    step = max(1, MERGE_CHUNK // (n_out * n_in))
    return [slice(i, i + step) for i in range(0, batch, step)]


def _merged(weight: Tensor, flat: Tensor, lam: Tensor) -> Tensor:
    """(c, out, in) per-sample weights W0 + Σ_t λ_ct τ_t (one GEMM with the stacked τ)."""
    return torch.addmm(weight.reshape(1, -1), lam, flat).view(-1, *weight.shape)


class _PerSampleLinear(torch.autograd.Function):
    """y_b = x_b W_bᵀ + b_b with W_b = W0 + Σ_t λ_bt τ_t, b_b = b0 + Σ_t λ_bt τ_t^b.

    The per-sample weights are formed a chunk of samples at a time (≤ ``MERGE_CHUNK`` numbers)
    and never kept: the backward pass re-forms them. Saved for backward: x and λ only. Work per
    sample: T·P for the merge + S·P for the product (forward), about twice that backward (P =
    out·in, S tokens), instead of T·S·P for Σ_t λ_t (τ_t x) per token. Runs in the buffers'
    dtype with autocast off."""

    @staticmethod
    def forward(ctx, x, lam, weight, bias, tau_w, tau_b):
        if any(t.requires_grad for t in (weight, bias, tau_w, tau_b)):
            raise FusionBenchError("WEMoE's pretrained MLP and task vectors are constants.")
        ctx.save_for_backward(x, lam, weight, tau_w, tau_b)
        dtype, flat = weight.dtype, tau_w.flatten(1)
        with torch.autocast(x.device.type, enabled=False):
            xs, lams = x.to(dtype), lam.to(dtype)
            b = bias + lams @ tau_b  # (B, out)
            outs = [
                torch.baddbmm(b[sl, None, :], xs[sl], _merged(weight, flat, lams[sl]).mT)
                for sl in _chunks(x.shape[0], *weight.shape)
            ]
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        x, lam, weight, tau_w, tau_b = ctx.saved_tensors
        want_x, want_lam = ctx.needs_input_grad[:2]
        dtype, flat = weight.dtype, tau_w.flatten(1)
        grads_x, grads_lam = [], []
        with torch.autocast(x.device.type, enabled=False):
            xs, lams, grad = x.to(dtype), lam.to(dtype), grad.to(dtype)
            for sl in _chunks(x.shape[0], *weight.shape):
                g = grad[sl]  # (c, S, out)
                if want_x:  # dL/dx_b = g_b W_b
                    grads_x.append(torch.bmm(g, _merged(weight, flat, lams[sl])))
                if want_lam:  # dL/dλ_bt = <τ_t, g_bᵀ x_b> + <τ_t^b, Σ_s g_bs>
                    outer = torch.bmm(g.mT, xs[sl]).flatten(1)  # (c, out·in)
                    grads_lam.append(outer @ flat.T + g.sum(dim=1) @ tau_b.T)
        grad_x = torch.cat(grads_x).to(x.dtype) if want_x else None
        grad_lam = torch.cat(grads_lam).to(lam.dtype) if want_lam else None
        return grad_x, grad_lam, None, None, None, None


class Router(nn.Module):
    """λ(h) ∈ R^T for a block's MLP input h (B, S, d): per-token outputs averaged over tokens.

    ``hidden_layers`` 2: W2 ReLU(W1 h + b1) + b2 (the paper's); 1: W h + b; 0: a learned constant
    (MLP-only layer-wise AdaMerging). The mean over tokens is taken before the last affine map,
    which commutes with it (same λ, S times less work)."""

    def __init__(self, width: int, n_experts: int, hidden_layers: int, device=None):
        super().__init__()
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.bias = nn.Parameter(torch.empty(n_experts, device=device))
        else:
            if hidden_layers == 2:
                self.hidden = nn.Linear(width, width, device=device)
            self.out = nn.Linear(width, n_experts, device=device)

    @torch.no_grad()
    def reset(self, init_lambda: float, generator: torch.Generator | None = None) -> None:
        """Weights ~ N(0, 0.01²), hidden bias 0, output bias λ0 (FusionBench, the paper's code)."""
        if self.hidden_layers == 0:
            self.bias.fill_(init_lambda)
            return
        if self.hidden_layers == 2:
            self.hidden.weight.normal_(0.0, ROUTER_STD, generator=generator)
            self.hidden.bias.zero_()
        self.out.weight.normal_(0.0, ROUTER_STD, generator=generator)
        self.out.bias.fill_(init_lambda)

    def forward(self, h: Tensor) -> Tensor:
        if self.hidden_layers == 0:
            return self.bias.expand(h.shape[0], -1)
        if self.hidden_layers == 2:
            h = F.relu(self.hidden(h))
        return self.out(h.mean(dim=1))


class WeightEnsemblingMLP(nn.Module):
    """A block's MLP (linear, activation, linear) with per-input weights W0 + Σ_t λ_t(x) τ_t.

    Buffers: the pretrained MLP (``w_in``, ``b_in``, ``w_out``, ``b_out``) and the stacked task
    vectors (``tau_*``, expert first); parameters: the router. ``oracle`` (a (T,) λ) bypasses
    the router; ``batch_reduce`` shares the batch-mean λ (FusionBench's adaptation option)."""

    def __init__(
        self,
        inner: nn.Module,
        batch_first: bool,
        pretrained: Sequence[Tensor],
        task_vectors: Sequence[Tensor],
        router: Router,
    ):
        super().__init__()
        self.inner = inner  # what runs between the two linear layers (the activation)
        self.batch_first = batch_first
        for name, value in zip(("w_in", "b_in", "w_out", "b_out"), pretrained, strict=True):
            self.register_buffer(name, value)
        for name, value in zip(
            ("tau_w_in", "tau_b_in", "tau_w_out", "tau_b_out"), task_vectors, strict=True
        ):
            self.register_buffer(name, value)
        self.router = router
        self.oracle: Tensor | None = None
        self.batch_reduce = False
        self.last_lambda: Tensor | None = None  # (B, T) of the last routed forward

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)  # (S, B, d) -> (B, S, d)
        if self.oracle is not None:
            lam = self.oracle
        else:
            lam = self.router(x)  # (B, T)
            self.last_lambda = lam.detach()
            if self.batch_reduce:
                lam = lam.mean(dim=0)
        h = mixed_linear(x, lam, self.w_in, self.b_in, self.tau_w_in, self.tau_b_in)
        y = mixed_linear(self.inner(h), lam, self.w_out, self.b_out, self.tau_w_out, self.tau_b_out)
        return y if self.batch_first else y.transpose(0, 1)


# -- the architecture ---------------------------------------------------------------------------
_MLP = re.compile(r"(?:^|\.)(\d+)\.mlp$")


def block_mlps(encoder: nn.Module) -> list[str]:
    """Module paths of every transformer block's MLP, in block order."""
    mlp_inputs(encoder)  # a clear error for a tower without CLIP ViT blocks
    found = {int(m.group(1)): n for n, _ in encoder.named_modules() if (m := _MLP.search(n))}
    return [found[i] for i in sorted(found)]


def mlp_parts(mlp: nn.Module, path: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """(first linear, what runs between, second linear) of an open_clip ``Sequential(c_fc, gelu,
    [ln], c_proj)`` or a Hugging Face ``CLIPMLP(fc1, activation_fn, fc2)``."""
    if isinstance(mlp, nn.Sequential):
        children = list(mlp.children())
        first, last, inner = children[0], children[-1], nn.Sequential(*children[1:-1])
    elif isinstance(mlp, WeightEnsemblingMLP):
        raise FusionBenchError(f"'{path}' is already a weight-ensembling MoE.")
    else:
        first, last = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        inner = getattr(mlp, "activation_fn", None)
    linears = (first, last)
    if not (all(isinstance(m, nn.Linear) and m.bias is not None for m in linears) and inner):
        raise FusionBenchError(
            f"The MLP '{path}' ({type(mlp).__name__}) is not linear → activation → linear (with "
            "biases) as in open_clip and Hugging Face CLIP ViTs: WEMoE cannot upscale this tower."
        )
    return first, inner, last


def _batch_first(encoder: nn.Module, path: str) -> bool:
    """Whether the block at ``path`` sees (B, S, d) (open_clip transformers may run (S, B, d))."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        flag = getattr(encoder.get_submodule(".".join(parts[:i])), "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return True  # Hugging Face CLIP


# canonical keys of the MLPs' linear layers: open_clip c_fc/c_proj, Hugging Face fc1/fc2
MLP_KEY = re.compile(r"(?:^|\.)\d+\.mlp\.(?:c_fc|c_proj|fc1|fc2)\.(?:weight|bias)$")


def mlp_keys(keys) -> list[str]:
    """The canonical keys WEMoE upscales (every block's two MLP linear layers)."""
    return [k for k in keys if MLP_KEY.search(k)]


def _mlp_keys(mlp: nn.Module, path: str) -> list[str]:
    """Canonical keys of w_in, b_in, w_out, b_out of the MLP at ``path``."""
    first, _, last = mlp_parts(mlp, path)
    names = {id(m): n for n, m in mlp.named_children()}
    return [f"{path}.{names[id(m)]}.{p}" for m in (first, last) for p in ("weight", "bias")]


class WEMoEModel(RoutedModel):
    """The task-arithmetic tower with every block's MLP a :class:`WeightEnsemblingMLP`."""

    extra_forward_passes = 0

    def __init__(self, pool, expert_names: Sequence[str], encoder: nn.Module, paths: list[str]):
        super().__init__(expert_names)
        self.encoder = encoder
        self.paths = list(paths)
        self._features = pool.classifier(encoder).features
        self.tta_history: list[dict[str, float]] = []  # per adaptation step (not saved)

    @property
    def moes(self) -> list[WeightEnsemblingMLP]:
        return [self.encoder.get_submodule(p) for p in self.paths]

    def routers(self) -> list[nn.Parameter]:
        return [p for m in self.moes for p in m.router.parameters()]

    def forward(self, images: Tensor, task: str | None = None) -> Tensor:
        moes = self.moes
        if task is None:
            features = self._features(self.encoder, images)
            # the coefficients of every block, averaged over the blocks: (B, T)
            self.last_routing = torch.stack([m.last_lambda for m in moes]).mean(dim=0)
            return features
        index = self.expert_index(task)
        onehot = torch.zeros(len(self.expert_names), device=images.device)
        onehot[index] = 1.0
        try:
            for m in moes:
                m.oracle = onehot
            return self._features(self.encoder, images)
        finally:
            for m in moes:
                m.oracle = None


def wemoe_encoder(
    pool,
    state: StateDict | None,
    n_experts: int,
    hidden_layers: int,
    task_vectors: dict[str, Tensor] | None = None,
    init_lambda: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, list[str]]:
    """``pool.build_encoder(state)`` with every block's MLP replaced by a weight-ensembling MoE
    made of that MLP (as W0), ``task_vectors`` ({canonical key: (T, *shape)}) and a fresh router.
    Without ``task_vectors`` (reloading) the τ and the routers are empty (meta) tensors that a
    ``load_state_dict(..., assign=True)`` fills."""
    encoder = pool.build_encoder(state).requires_grad_(False)
    paths = block_mlps(encoder)
    for path in paths:
        mlp = encoder.get_submodule(path)
        first, inner, last = mlp_parts(mlp, path)
        pretrained = [t.detach() for m in (first, last) for t in (m.weight, m.bias)]
        if task_vectors is None:
            taus = [torch.empty((n_experts, *t.shape), device="meta") for t in pretrained]
        else:
            taus = [task_vectors.pop(k) for k in _mlp_keys(mlp, path)]
        router = Router(first.in_features, n_experts, hidden_layers, device="meta")
        if task_vectors is not None:
            router = router.to_empty(device="cpu")
            router.reset(init_lambda, generator)
        moe = WeightEnsemblingMLP(inner, _batch_first(encoder, path), pretrained, taus, router)
        parent, _, name = path.rpartition(".")
        setattr(encoder.get_submodule(parent), name, moe)
    return encoder, paths


# -- the method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WEMoE(RoutedMethod):
    init_lambda: float = 0.3  # TA λ for the non-MLP weights and the routers' output bias
    router_hidden_layers: int = 2  # 2: Linear(d,d)-ReLU-Linear(d,T) (the paper's); 1; 0
    lr: float = 1e-4  # Adam (no weight decay, no schedule), FusionBench and the paper's runs
    max_steps: int = 1000  # adaptation steps (0: the routers at their initialisation)
    batch_size: int = 16  # unlabeled test images per task and step
    batch_reduce: bool = False  # adaptation only: share the batch-mean λ (FusionBench: true)
    log_every: int = 10  # steps between tta/* logs
    seed: int = 42  # router initialisation and the order of the test batches

    def __post_init__(self):
        if not math.isfinite(self.init_lambda):
            raise FusionBenchError(
                f"method.init_lambda={self.init_lambda}: give a finite task-arithmetic scale "
                "(the paper's 0.3)."
            )
        if self.router_hidden_layers not in (0, 1, 2):
            raise FusionBenchError(
                f"method.router_hidden_layers={self.router_hidden_layers}: use 2 (Linear-ReLU-"
                "Linear, the paper's), 1 (one linear layer) or 0 (a learned constant per block)."
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FusionBenchError(
                f"method.lr={self.lr}: Adam's learning rate must be a positive number (1e-4)."
            )
        if self.max_steps < 0:
            raise FusionBenchError(
                f"method.max_steps={self.max_steps}: give the number of adaptation steps, >= 0 "
                "(0 keeps the routers at their initialisation, i.e. task arithmetic)."
            )
        if self.batch_size < 1:
            raise FusionBenchError(
                f"method.batch_size={self.batch_size}: give at least 1 image per task and step."
            )
        if self.log_every < 1:
            raise FusionBenchError(f"method.log_every={self.log_every}: give a step count >= 1.")

    def models_held(self, n_experts: int) -> float:
        """The task-arithmetic state dict while the tower is built (1) + the routers' gradients
        and two Adam moments (3 × ≈0.08 towers for CLIP ViTs with the 2-layer router)."""
        return 1.25

    def build(self, pool, data, context: Context) -> WEMoEModel:
        names = list(pool.expert_names)
        if not names:
            raise FusionBenchError("WEMoE needs at least one expert in the model pool.")
        steps = min(self.max_steps, 1) if context.fast_dev_run else self.max_steps
        if steps > 0 and data is None:
            raise FusionBenchError(
                "WEMoE trains its routers on unlabeled test images: give a task pool (data), or "
                "method.max_steps=0 for the routers at their initialisation."
            )
        model = self.initial_model(pool)
        if steps > 0:
            self.adapt(model, pool, data, context, steps)
        return model.requires_grad_(False).eval()

    def initial_model(self, pool) -> WEMoEModel:
        """The routed model before adaptation: TA (λ0) tower, W0 MLPs, τ, fresh routers."""
        names = list(pool.expert_names)
        pretrained, experts = pool.pretrained(), pool_experts(pool)
        upscaled = mlp_keys(pretrained)
        # non-MLP weights: task arithmetic; the MLP keys stay θ0 (W0 of the MoE)
        merged = add_weighted_task_vectors(
            pretrained, experts, [self.init_lambda] * len(names), exclude=upscaled
        )
        taus = stack_task_vectors(pretrained, experts, upscaled)  # key -> (T, *shape)
        generator = torch.Generator().manual_seed(self.seed)
        encoder, paths = wemoe_encoder(
            pool, merged, len(names), self.router_hidden_layers, taus, self.init_lambda, generator
        )
        del merged
        return WEMoEModel(pool, names, encoder, paths)

    def load(self, pool, expert_names: Sequence[str], state: StateDict) -> WEMoEModel:
        encoder, paths = wemoe_encoder(pool, None, len(expert_names), self.router_hidden_layers)
        model = WEMoEModel(pool, expert_names, encoder, paths)
        try:
            model.load_state_dict(dict(state), strict=True, assign=True)
        except RuntimeError as e:
            raise FusionBenchError(
                f"The saved WEMoE model does not fit this pool's architecture with "
                f"{len(expert_names)} experts and router_hidden_layers="
                f"{self.router_hidden_layers} ({str(e).splitlines()[0]}): evaluate it with the "
                "model pool it was built from."
            ) from None
        return model.requires_grad_(False).eval()

    # -- test-time adaptation --------------------------------------------------------------------
    def adapt(self, model: WEMoEModel, pool, data, context: Context, steps: int) -> WEMoEModel:
        """Train ``model``'s routers in place: ``steps`` Adam steps of the summed per-task
        entropies (one batch of each task's unlabeled test images per step; the tasks' backward
        passes run one after the other, which gives the gradient of the sum with T times less
        activation memory)."""
        from tqdm.auto import tqdm

        fabric = context.fabric
        if fabric is None:
            from lightning.fabric import Fabric

            fabric = Fabric(accelerator="cpu", devices=1, loggers=[])
        names = model.expert_names
        model.requires_grad_(False)
        for p in model.routers():
            p.requires_grad_(True)
        base = pool.classifier(model.encoder)
        heads = {t: data.zero_shot_head(base, t, fabric.device) for t in names}  # frozen
        seed = self.seed + 1000 * fabric.global_rank
        batches = {
            t: unlabeled_batches(data, t, base.preprocess, self.batch_size, seed) for t in names
        }
        optimizer = torch.optim.Adam(model.routers(), lr=self.lr)
        wrapped, optimizer = fabric.setup_module(model), fabric.setup_optimizers(optimizer)
        classifier = dataclasses.replace(base, encoder=wrapped, features=lambda m, x: m(x))
        for moe in model.moes:
            moe.batch_reduce = self.batch_reduce
        model.train()
        model.tta_history = []
        try:
            bar = tqdm(range(steps), desc="wemoe", unit="step")
            for step in bar:
                start = time.perf_counter()
                optimizer.zero_grad()
                losses = {}
                for task in names:
                    images = next(batches[task]).to(fabric.device)  # labels are never read
                    with fabric.autocast():
                        loss = entropy(classifier.logits(images, heads[task]))
                    fabric.backward(loss)
                    losses[task] = loss.item()
                optimizer.step()
                record = {
                    "tta/loss": sum(losses.values()),
                    "tta/step_s": time.perf_counter() - start,
                    **{f"tta/{t}/entropy": v for t, v in losses.items()},
                }
                model.tta_history.append(record)
                bar.set_postfix(loss=f"{record['tta/loss']:.4f}")
                if step % self.log_every == 0 or step == steps - 1:
                    fabric.log_dict(record, step=step)
        finally:
            for moe in model.moes:
                moe.batch_reduce = False  # evaluation routes every sample on its own
            model.requires_grad_(False).eval()
        return model
