"""LoRA model pool: experts as PEFT LoRA adapters over a base pool's pretrained image tower.

The base pool (``base``: any pool config, e.g. the open_clip or Hugging Face CLIP pool with
``finetuned: {}``) gives the pretrained tower, the zero-shot heads, evaluation and saving; this
pool adds one PEFT adapter directory per task (``adapters``). Two views of each expert:

- ``expert(name)``: the expanded image tower W0 + s·B A, lazily, key by key, so every method of
  ``conf/method/`` runs on LoRA experts unchanged (a merge of full matrices);
- ``adapter(name)``: the factors (:class:`fusion_bench.lora.LoRAAdapter`), what the LoRA
  methods (``method=lora/*``, kind ``lora_merge``) merge without expanding.

Run: ``fusion_bench modelpool=tiny8_lora method=lora/core_space``
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fusion_bench.checkpoint import LazyStateDict
from fusion_bench.errors import FusionBenchError
from fusion_bench.lora import LoRAAdapter
from fusion_bench.modelpool.base import ZeroShotClassifier, resolve_experts, unknown_expert
from fusion_bench.paths import resolve_path


def adapter_dir(location: str) -> Path:
    """A PEFT adapter directory for a local path or a Hugging Face hub id (cache, or download)."""
    from fusion_bench.modelpool.clip_vision import resolve_hf_dir

    local = Path(location)
    if local.exists():
        return local  # LoRAAdapter names what is missing inside
    return resolve_hf_dir(
        location,
        marker="adapter_config.json",
        patterns=("adapter_config.json", "adapter_model.safetensors"),
        fallback=("adapter_config.json", "adapter_model.bin"),
    )


class ExpandedLoRA(Mapping[str, Tensor]):
    """An expert as a full state dict: the pretrained tensor, plus s·B A where the adapter has a
    factor pair. Lazy like the pretrained mapping it wraps (one key, one product)."""

    def __init__(self, pretrained: LazyStateDict, adapter: LoRAAdapter):
        self.pretrained = pretrained
        self.adapter = adapter

    def __getitem__(self, key: str) -> Tensor:
        base = self.pretrained[key]
        if key not in self.adapter:
            return base
        # float32 (the factors' precision), not the checkpoint's dtype: rounding W0 + s·BA back
        # to a half-precision W0's dtype would add noise of |W0|·2⁻¹¹ to the update
        update = self.adapter[key].full()
        return base.to(update.dtype) + update

    def __iter__(self) -> Iterator[str]:
        return iter(self.pretrained)

    def __len__(self) -> int:
        return len(self.pretrained)

    def __contains__(self, key: object) -> bool:
        return key in self.pretrained

    def shape(self, key: str) -> tuple[int, ...]:
        return self.pretrained.shape(key)

    def __repr__(self) -> str:
        return f"ExpandedLoRA({self.adapter!r})"


class LoRAModelPool:
    """A base pool's pretrained model + one PEFT LoRA adapter per task."""

    family = "lora"
    experts_option = "modelpool.adapters"  # what error messages name

    def __init__(
        self,
        base: Any,
        adapters: dict[str, str] | str,
        tasks: list[str] | None = None,
        check_finite: bool = True,
    ):
        if not hasattr(base, "build_encoder") or not hasattr(base, "pretrained"):
            raise FusionBenchError(
                "modelpool.base must be a model pool config (with a _target_, e.g. "
                "fusion_bench.modelpool.open_clip.OpenCLIPModelPool); got "
                f"{type(base).__name__}."
            )
        if getattr(base, "expert_names", None):
            raise FusionBenchError(
                f"modelpool.base has its own fine-tuned experts {base.expert_names}; in a LoRA "
                "pool the experts are the adapters. Set modelpool.base.finetuned={} ."
            )
        self.base = base
        self.adapter_locations = {
            name: resolve_path(loc)
            for name, loc in resolve_experts(adapters, tasks, self.experts_option).items()
        }
        self.expert_names = list(self.adapter_locations)
        self.check_finite = check_finite
        self._adapters: dict[str, LoRAAdapter] = {}

    def pretrained(self) -> LazyStateDict:
        return self.base.pretrained()

    def adapter(self, name: str) -> LoRAAdapter:
        """Expert ``name``'s LoRA factors (headers read once; tensors on lookup)."""
        if name not in self.adapter_locations:
            raise unknown_expert(name, self.expert_names)
        if name not in self._adapters:
            adapter = LoRAAdapter(
                adapter_dir(self.adapter_locations[name]), name, self._shapes, self.check_finite
            )
            self._check_base(adapter)
            self._adapters[name] = adapter
        return self._adapters[name]

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """The pretrained tower's keys and shapes (from the header, read once for all adapters)."""
        pretrained = self.pretrained()
        return {key: tuple(pretrained.shape(key)) for key in pretrained}

    def _check_base(self, adapter: LoRAAdapter) -> None:
        """Shapes cannot tell ViT-B/16 from ViT-B/32, or OpenAI's weights from LAION's: warn when
        the adapter names a base model (``base_model_name_or_path``) that is not the pool's."""
        named = adapter.base_model
        if not named:
            return
        described = self.base.describe()
        ours = {str(described.get(k)) for k in ("pretrained", "model_name") if described.get(k)}
        ours |= {Path(o).name for o in ours} | {Path(o).stem for o in ours}
        if named not in ours and Path(named).name not in ours:
            warnings.warn(
                f"LoRA adapter '{adapter.name}' was trained on '{named}' (its "
                f"adapter_config.json), but the pool's base model is {sorted(ours)}. If that is "
                "another model, the merged update is applied to weights it was not trained on.",
                stacklevel=2,
            )

    def expert(self, name: str) -> ExpandedLoRA:
        return ExpandedLoRA(self.pretrained(), self.adapter(name))

    def build_encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        return self.base.build_encoder(state_dict)

    def classifier(self, encoder: nn.Module) -> ZeroShotClassifier:
        return self.base.classifier(encoder)

    def save(self, state_dict: Mapping[str, Tensor], path: Path, card: str) -> None:
        """The merged model is a full image tower: saved in the base pool's format."""
        self.base.save(state_dict, path, card)

    def describe(self) -> dict:
        base = {k: v for k, v in self.base.describe().items() if k != "experts"}
        return {"family": self.family, "base": base, "adapters": dict(self.adapter_locations)}
