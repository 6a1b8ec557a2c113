"""Test helpers shared by fusion_bench's tests and by anyone adding a method."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def assert_state_dict_close(
    actual: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """Same keys, and every tensor close (compared in float32)."""
    assert set(actual) == set(expected), f"keys differ: {sorted(set(actual) ^ set(expected))}"
    for key in expected:
        torch.testing.assert_close(
            actual[key].float(),
            expected[key].float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def as_experts(state_dicts) -> dict:
    """Experts for a method's ``merge(pretrained, experts)``: a list of state dicts named ``#0``,
    ``#1``, ... (as ``fusion_bench.merge`` names a list of experts)."""
    return {f"#{i}": sd for i, sd in enumerate(state_dicts)}


def experts_around(make_state, scale: float, n: int = 3) -> tuple[dict, list[dict]]:
    """(θ0, experts) for the maths tests: θ0 = ``make_state(0)``, expert i = θ0 +
    ``make_state(i, scale)`` on the floating tensors (integer buffers are θ0's), i = 1..n."""
    pre = make_state(0)
    experts = []
    for i in range(1, n + 1):
        tau = make_state(i, scale)
        experts.append({k: v + tau[k] if v.is_floating_point() else v for k, v in pre.items()})
    return pre, experts
