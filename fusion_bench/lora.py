"""LoRA experts as PEFT adapters: reading them, and the low-rank factors the LoRA methods merge.

A LoRA expert of a pretrained image tower changes some 2-D weights W0 (m × n) by
ΔW = s · B A (B: m × r, A: r × n, s = lora_alpha / r, or lora_alpha / √r with rsLoRA). PEFT
(``peft.PeftModel.save_pretrained``) writes it as a directory with

- ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``target_modules`` ...;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r × n) and
  ``...lora_B.weight`` (m × r) per adapted module.

:class:`LoRAAdapter` maps those onto the pool's canonical image-tower keys (the weight each module
owns: ``<module>.weight`` of an ``nn.Linear``), with the scaling folded into B, and reads each
pair of factors only when its key is looked up.
The files are read here, not through ``peft.PeftModel.from_pretrained``: that would build a
wrapped model per expert and load every factor at once, while a merge reads one weight's
factors at a time; the tests check the result against PEFT's own ``merge_and_unload``. PEFT is
needed to train adapters (``scripts/build_tiny8.py``, the tests), not to merge them.

Everything PEFT can express that is not a plain ``s·BA`` update of a 2-D weight (DoRA magnitudes,
trained biases, ``modules_to_save``, a text-tower module, and PEFT's ``nn.MultiheadAttention``
layer, which applies its out_proj update twice) is refused with the reason: merging it as if it
were plain LoRA would silently give another model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fusion_bench.checkpoint import LazyStateDict
from fusion_bench.errors import FusionBenchError

ADAPTER_CONFIG = "adapter_config.json"
# init_lora_weights values with which PEFT rewrites W0 (W0 − B·A at initialisation): such an
# adapter, unless saved converted (then init_lora_weights is true), is relative to another W0.
REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Prefixes of a whole-CLIP layout (open_clip: ``visual.``; Hugging Face CLIPModel and
# CLIPVisionModel: ``vision_model.``): the image tower's modules, prefix dropped.
IMAGE_TOWER_PREFIXES = ("visual.", "vision_model.")
TEXT_TOWER_PREFIX = "text_model."  # Hugging Face CLIPModel's text tower


@dataclass(frozen=True)
class LowRank:
    """ΔW = B @ A of one weight: B (m × r) with the LoRA scaling folded in, A (r × n)."""

    B: Tensor
    A: Tensor

    def full(self) -> Tensor:
        return self.B @ self.A


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's per-module override (``rank_pattern`` / ``alpha_pattern``): the first pattern that
    matches the module's full name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


class LoRAAdapter(Mapping[str, LowRank]):
    """One PEFT LoRA adapter directory, as canonical weight key -> :class:`LowRank` (lazy).

    ``tower_shapes``: the pool's canonical image-tower keys and shapes (what the adapter must fit).
    """

    def __init__(
        self,
        directory: str | Path,
        name: str,
        tower_shapes: Mapping[str, tuple[int, ...]],
        check_finite: bool = True,
    ):
        self.directory = Path(directory)
        self.name = name
        config = read_adapter_config(self.directory, name)
        weights = adapter_weights_file(self.directory, name)
        self._file = LazyStateDict(
            [weights], check_finite=check_finite, name=f"{name} LoRA adapter ({weights})"
        )
        self.base_model = config.get("base_model_name_or_path")
        modules = self._modules(list(self._file), weights)
        self._factors: dict[str, tuple[str, str, float]] = {}
        for module, (key_a, key_b, peft_name) in modules.items():
            key = canonical_weight_key(module, tower_shapes, name)
            r_a, n = self._file.shape(key_a)
            m, r_b = self._file.shape(key_b)
            if tuple(tower_shapes[key]) != (m, n) or r_a != r_b:
                raise FusionBenchError(
                    f"LoRA adapter '{name}': module '{module}' has factors B {m}×{r_b} and A "
                    f"{r_a}×{n}, which do not fit '{key}' {tuple(tower_shapes[key])} of the pool's "
                    "pretrained model: the adapter was trained on another base model (e.g. "
                    "another width). Use adapters of the pool's base model."
                )
            # PEFT matches rank_pattern / alpha_pattern on the module's name in the model it
            # wrapped (with a whole-CLIP prefix such as vision_model., if there was one)
            r = int(pattern_value(config.get("rank_pattern") or {}, peft_name, config["r"]))
            if r != r_a:
                raise FusionBenchError(
                    f"LoRA adapter '{name}': module '{module}' has rank {r_a} in "
                    f"{weights.name} but rank {r} in {ADAPTER_CONFIG}: the two files do not "
                    "belong together. Re-save the adapter with PEFT."
                )
            alpha = pattern_value(
                config.get("alpha_pattern") or {}, peft_name, config["lora_alpha"]
            )
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            if key in self._factors:
                raise FusionBenchError(
                    f"LoRA adapter '{name}' adapts '{key}' twice (modules {module!r} and another)."
                )
            self._factors[key] = (key_a, key_b, float(scale))

    def _modules(self, keys: list[str], weights: Path) -> dict[str, tuple[str, str, str]]:
        """{image-tower module name: (lora_A key, lora_B key, PEFT's module name)}; other keys
        refused."""
        pairs: dict[str, dict[str, str]] = {}
        for key in keys:
            match = re.fullmatch(
                r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key
            )
            if match is None:
                raise FusionBenchError(
                    f"LoRA adapter '{self.name}' holds '{key}', which is not a LoRA factor pair "
                    "of a Linear layer (DoRA magnitudes, trained biases, modules_to_save and "
                    "embedding LoRA change the model beyond ΔW = B·A of a 2-D weight, which the "
                    "LoRA pool merges). Save the adapter with use_dora=False, bias='none', no "
                    "modules_to_save, on Linear modules only."
                )
            pairs.setdefault(match.group(1), {})[match.group(2)] = key
        if not pairs:
            raise FusionBenchError(f"LoRA adapter '{self.name}': {weights} holds no LoRA factor.")
        modules = {}
        whole_model = any(m.startswith(IMAGE_TOWER_PREFIXES) for m in pairs)
        for module, found in pairs.items():
            if set(found) != {"A", "B"}:
                raise FusionBenchError(
                    f"LoRA adapter '{self.name}': module '{module}' has lora_{''.join(found)} "
                    "but not its partner factor; the file is incomplete. Re-save the adapter."
                )
            image = module
            for prefix in IMAGE_TOWER_PREFIXES:
                image = image.removeprefix(prefix)
            if (whole_model and image == module) or module.startswith(TEXT_TOWER_PREFIX):
                raise FusionBenchError(
                    f"LoRA adapter '{self.name}' adapts '{module}', a module of the text tower. "
                    "fusion_bench merges image towers and builds zero-shot heads with the "
                    "pretrained text tower, so this expert cannot be evaluated as trained. Use "
                    "adapters on the image tower only."
                )
            modules[image] = (found["A"], found["B"], module)
        return modules

    def __getitem__(self, key: str) -> LowRank:
        if key not in self._factors:
            raise KeyError(key)
        key_a, key_b, scale = self._factors[key]
        A, B = self._file[key_a], self._file[key_b]
        return LowRank(B=B.to(torch.float32) * scale, A=A.to(torch.float32))

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __contains__(self, key: object) -> bool:
        return key in self._factors

    def __repr__(self) -> str:
        return f"LoRAAdapter({self.name!r}, {len(self)} weights, {self.directory})"


def read_adapter_config(directory: Path, name: str) -> dict:
    if not directory.is_dir():
        raise FusionBenchError(
            f"LoRA adapter '{name}': '{directory}' is not a directory. A PEFT adapter is a "
            f"directory with {ADAPTER_CONFIG} and adapter_model.safetensors "
            "(peft_model.save_pretrained(path)); fix modelpool.adapters."
        )
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FusionBenchError(
            f"LoRA adapter '{name}': '{directory}' has no {ADAPTER_CONFIG}; it is not a PEFT "
            "adapter directory (peft_model.save_pretrained(path) writes one)."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FusionBenchError(f"LoRA adapter '{name}': {path} is not valid JSON ({e}).") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise FusionBenchError(
            f"LoRA adapter '{name}': {path} is a PEFT '{kind}' adapter; the LoRA pool reads LoRA "
            "adapters (peft_type LORA) only."
        )
    refused = {
        "use_dora": "DoRA's magnitude vector is not a low-rank update",
        "fan_in_fan_out": "transposed (Conv1D) weights are not CLIP's layout",
    }
    for option, why in refused.items():
        if config.get(option):
            raise FusionBenchError(
                f"LoRA adapter '{name}': {option}=true is not supported ({why})."
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(REWRITES_BASE):
        raise FusionBenchError(
            f"LoRA adapter '{name}': init_lora_weights={init!r} rewrites the base weights at "
            "initialisation, so B·A is relative to a modified W0, not to the pool's pretrained "
            "model. Save it converted to a plain LoRA (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion), which writes init_lora_weights=true."
        )
    for option in ("layer_replication", "target_parameters"):
        if config.get(option):
            raise FusionBenchError(
                f"LoRA adapter '{name}': {option}={config[option]!r} is not supported (the "
                "LoRA pool merges ΔW = s·B·A of the base model's own Linear weights)."
            )
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise FusionBenchError(
            f"LoRA adapter '{name}' trains biases or modules_to_save besides the LoRA factors; "
            "the LoRA pool merges ΔW = B·A only. Train with bias='none' and no modules_to_save."
        )
    if "r" not in config or "lora_alpha" not in config:
        raise FusionBenchError(f"LoRA adapter '{name}': {path} lacks 'r' or 'lora_alpha'.")
    return config


def adapter_weights_file(directory: Path, name: str) -> Path:
    for candidate in ADAPTER_WEIGHTS:
        if (directory / candidate).is_file():
            return directory / candidate
    raise FusionBenchError(
        f"LoRA adapter '{name}': '{directory}' has {ADAPTER_CONFIG} but no "
        f"{' or '.join(ADAPTER_WEIGHTS)}; the adapter's weights are missing."
    )


def canonical_weight_key(
    module: str, tower_shapes: Mapping[str, tuple[int, ...]], name: str
) -> str:
    """The image-tower weight a PEFT-adapted ``nn.Linear`` owns (``<module>.weight``)."""
    if ".base_layer." in module or f"{module}.in_proj_weight" in tower_shapes:
        raise FusionBenchError(
            f"LoRA adapter '{name}' adapts '{module}', an nn.MultiheadAttention (open_clip's "
            "fused attention). PEFT's LoRA layer for it applies the out_proj update twice "
            "(peft <= 0.21.2; huggingface/peft PR #3774), so the adapter does not mean "
            "W0 + s·B·A and merging it as such would give another model. Train LoRA on the "
            "nn.Linear modules (open_clip: mlp.c_fc, mlp.c_proj; Hugging Face CLIP: q_proj, "
            "k_proj, v_proj, out_proj, fc1, fc2)."
        )
    key = f"{module}.weight"
    if key in tower_shapes and len(tower_shapes[key]) == 2:
        return key
    raise FusionBenchError(
        f"LoRA adapter '{name}' adapts module '{module}', which the pool's pretrained image tower "
        f"has no 2-D weight for ('{key}'): the adapter was trained on another architecture. Use "
        "adapters of the pool's base model."
    )
