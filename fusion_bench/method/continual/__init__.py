"""Continual (sequential) merging: experts arrive one at a time and are absorbed into a running
merged update without the earlier experts; the merged model is available after every step.

Every method here is of kind ``sequential`` (:class:`fusion_bench.method.base.SequentialMerge`)
and keeps a :class:`RunningUpdate`: θ0 (read lazily) and one float32 running update (one image
tower), so memory does not grow with the number of experts. The runner's sequential protocol
(``sequence.*`` in ``conf/config.yaml``) orders the experts and evaluates after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.tensor_ops import (
    StateDict,
    expert_tensor,
    map_keys,
    mergeable_keys,
    parallel_map,
)


@dataclass
class RunningUpdate:
    """What a continual merge keeps between experts."""

    pretrained: StateDict  # θ0, read key by key
    update: dict[str, Tensor] = field(default_factory=dict)  # the running update, float32
    seen: list[str] = field(default_factory=list)  # expert names absorbed so far, in order
    norms: list[float] = field(default_factory=list)  # ‖τ_t‖ of each expert (absorb(norm=True))
    device: torch.device | str = "cpu"  # where optimising methods (DOP) work

    def absorb(
        self,
        name: str,
        expert: StateDict,
        exclude_keys: Iterable[str],
        combine: Callable[[str, Tensor, Tensor | None], Tensor | Callable[[], Tensor]],
        progress=None,
        norm: bool = False,
    ) -> None:
        """For every mergeable key: τ = θ_t − θ0, then ``update[key] = combine(key, τ, update[key]
        or None)``; with ``norm``, also records ‖τ‖ over all keys in ``norms`` (OPCM needs it; the
        others skip its float64 pass over every tensor). ``combine`` may return a thunk instead of
        a tensor (e.g. a projection built on an SVD): thunks run in windows of 2·threads keys
        spread over torch's threads (:func:`~fusion_bench.tensor_ops.parallel_map`)."""
        keys = list(mergeable_keys(self.pretrained, list(exclude_keys)))
        window = 2 * torch.get_num_threads()
        pending: list[tuple[str, Callable[[], Tensor]]] = []

        def flush() -> None:
            results = parallel_map(lambda item: item[1](), pending)
            for (key, _), value in zip(pending, results, strict=True):
                self.update[key] = value
            pending.clear()

        squares = 0.0
        for key in progress(keys) if progress is not None else keys:
            base = self.pretrained[key].to(torch.float32)
            tau = expert_tensor(expert, key, base, name) - base
            if norm:
                squares += float(tau.double().square().sum())
            value = combine(key, tau, self.update.get(key))
            if callable(value):
                pending.append((key, value))
                if len(pending) >= window:
                    flush()
            else:
                self.update[key] = value
        flush()
        if norm:
            self.norms.append(squares**0.5)
        self.seen.append(name)

    def model(self, scale: float = 1.0, exclude_keys: Iterable[str] = ()) -> dict[str, Tensor]:
        """θ0 + scale · update (keys without an update: θ0)."""
        return map_keys(
            self.pretrained,
            lambda key, base: base + scale * self.update[key] if key in self.update else base,
            list(exclude_keys),
        )

    def update_norm(self) -> float:
        return sum(float(u.double().square().sum()) for u in self.update.values()) ** 0.5
