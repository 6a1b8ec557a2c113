"""DOP: continual merging by Dual Orthogonal Projection, a gradient-based, multi-objective
merge of the running model and each new expert (FusionBench's ``ContinualDOPForCLIP``, from the
authors of OPCM; the defaults are its ``method/dop/dop.yaml``).

The first expert is the merged model. For every later expert t and every 2-D linear weight, with
W_0 the pretrained weight, W_m the current merged weight and W_t the new expert's:

1. for each of the two, i ∈ {m, t}: the thin SVD of its task matrix W_i − W_0 = U_i diag(s_i) V_iᵀ,
   kept up to the split rank r_i (the first index at which the cumulative share of the singular
   values reaches ``svd_epsilon``);
2. the objective of i: L_i(W) = ‖diag(s_i) U_iᵀ (W − W_i)‖² + ‖(W − W_i) V_i diag(s_i)‖² (``uv``;
   ``u`` or ``v`` keeps one term): W should agree with W_i on W_i's principal left and right
   subspaces, weighted by their singular values;
3. W starts at (W_m + W_t)/2 and takes ``num_steps`` Adam steps (``lr``) on c_m L_m + c_t L_t. With
   ``mgda``: each step, the gradients are divided by their losses and (c_m, c_t) is the
   minimum-norm point of their convex hull (MGDA, closed form for two objectives, clipped to
   [0.001, 0.999]), smoothed with ``ema`` (β = ``ema_beta``, starting at (``alpha``, 1 − ``alpha``));
   without it (c_m, c_t) = (``alpha``, 1 − ``alpha``).

Every other parameter (biases, LayerNorms, embeddings, 2-D keys in ``average_keys``) is the average
of the merged model and the new expert.

Run: ``fusion_bench method=continual/dop`` (the sequential protocol: ``sequence.*``)
Memory: θ0 (lazy) + the merged model's update (1 image tower) + per key being optimised: W, its
Adam moments and the two SVD bases (a window of 2·threads keys at a time). Time: ``num_steps``
Adam steps per 2-D weight per expert after the first, each a few matrix products the size of the
weight — made for a GPU (``fabric.accelerator=cuda``); on a CPU it suits small towers (tiny8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, SequentialMerge, key_progress
from fusion_bench.method.continual import RunningUpdate
from fusion_bench.spectral import svd
from fusion_bench.tensor_ops import StateDict, is_excluded

SPACES = ("uv", "u", "v")


@dataclass(frozen=True)
class DOP(SequentialMerge[RunningUpdate]):
    lr: float = 1e-4  # Adam's learning rate on each merged weight
    num_steps: int = 200  # Adam steps per weight and expert
    mgda: bool = True  # balance the two objectives by MGDA (else: alpha, 1 − alpha)
    alpha: float = 0.8  # the merged model's weight (the EMA's start with mgda)
    ema: bool = True  # smooth the MGDA weights over the steps
    ema_beta: float = 0.999
    svd_epsilon: float = 0.99999  # share of the singular values whose subspace is kept
    svd_proj_space: str = "uv"  # uv | u | v: which side(s) of the subspace the objective reads
    # 2-D keys that are not linear weights: averaged
    average_keys: list[str] = field(default_factory=lambda: ["*embedding*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha={self.alpha} is not in [0, 1]")
        if not 0.0 <= self.svd_epsilon <= 1.0:
            problems.append(f"svd_epsilon={self.svd_epsilon} is not in [0, 1]")
        if self.svd_proj_space not in SPACES:
            problems.append(f"svd_proj_space='{self.svd_proj_space}' is not one of {list(SPACES)}")
        if self.num_steps < 0 or self.lr < 0 or not 0.0 <= self.ema_beta <= 1.0:
            problems.append("num_steps and lr must be ≥ 0 and ema_beta in [0, 1]")
        if problems:
            raise FusionBenchError("DOP: " + "; ".join(problems) + ". Fix the method.* values.")

    def start(self, pretrained: StateDict, context: Context | None = None) -> RunningUpdate:
        return RunningUpdate(pretrained, device=context.device if context is not None else "cpu")

    def absorb(self, state: RunningUpdate, name: str, expert: StateDict) -> RunningUpdate:
        device = state.device

        def combine(key: str, tau: Tensor, previous: Tensor | None):
            if previous is None:  # the first expert
                return tau
            if tau.dim() == 2 and not is_excluded(key, self.average_keys):
                return lambda: self.optimize(previous, tau, device)  # in parallel windows
            return (previous + tau) / 2

        state.absorb(name, expert, self.exclude_keys, combine, key_progress(f"dop: {name}"))
        return state

    def merged(self, state: RunningUpdate) -> dict[str, Tensor]:
        return state.model(1.0, self.exclude_keys)

    # -- the optimisation of one weight (in task-vector coordinates: W − W_0) -------------------
    def optimize(self, merged_tau: Tensor, task_tau: Tensor, device) -> Tensor:
        targets = [merged_tau.to(device), task_tau.to(device)]
        bases = [self.subspace(t) for t in (merged_tau, task_tau)]
        bases = [tuple(b.to(device) for b in basis) for basis in bases]
        weight = torch.nn.Parameter((targets[0] + targets[1]) / 2)
        optimizer = torch.optim.Adam([weight], lr=self.lr)
        coefficients = [self.alpha, 1.0 - self.alpha]
        with torch.enable_grad():
            for _ in range(self.num_steps):
                losses = [
                    self.objective(weight - t, b) for t, b in zip(targets, bases, strict=True)
                ]
                if self.mgda:
                    grads = [
                        torch.autograd.grad(loss, weight, retain_graph=True)[0]
                        / (loss.detach() if loss.detach() > 0 else 1.0)
                        for loss in losses
                    ]
                    gamma = min_norm_two(*grads)
                    solution = [gamma, 1.0 - gamma]
                    if self.ema:
                        beta = self.ema_beta
                        coefficients = [
                            beta * c + (1 - beta) * s
                            for c, s in zip(coefficients, solution, strict=True)
                        ]
                    else:
                        coefficients = solution
                total = coefficients[0] * losses[0] + coefficients[1] * losses[1]
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
        return weight.detach().to("cpu", torch.float32)

    def subspace(self, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(U_r, s_r, V_r) of the task matrix, r from ``svd_epsilon``, float32."""
        u, s, vh = svd(tau)
        total = s.sum()
        if total <= 0:
            r = 0
        else:
            r = int(
                torch.searchsorted(s.cumsum(0) / total, torch.tensor(self.svd_epsilon).double())
            )
        r = min(r, s.numel())
        return u[:, :r].float(), s[:r].float(), vh[:r].T.float()

    def objective(self, delta: Tensor, basis: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        u, s, v = basis
        loss = delta.new_zeros(())
        if self.svd_proj_space in ("uv", "u"):
            loss = loss + (s[:, None] * (u.T @ delta)).square().sum()
        if self.svd_proj_space in ("uv", "v"):
            loss = loss + ((delta @ v) * s).square().sum()
        return loss


def min_norm_two(g1: Tensor, g2: Tensor) -> float:
    """γ minimising ‖γ g1 + (1 − γ) g2‖², clipped to [0.001, 0.999] at the ends as the reference
    MGDA solver does."""
    v11, v12, v22 = float((g1 * g1).sum()), float((g1 * g2).sum()), float((g2 * g2).sum())
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)
