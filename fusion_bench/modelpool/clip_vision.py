"""Hugging Face CLIP model pool: ``openai/clip-vit-*`` + ``tanganke/clip-vit-*_<task>`` experts.

Entries are hub ids or local ``save_pretrained`` directories. The pretrained entry must be a full
``CLIPModel`` (its text tower builds the zero-shot heads, its ``visual_projection`` maps image
features into the joint space); experts may be ``CLIPVisionModel`` or full ``CLIPModel``
checkpoints. Canonical keys are those of transformers-5 ``CLIPVisionModel`` (flat:
``embeddings.*``, ``pre_layrnorm.*``, ``encoder.*``, ``post_layernorm.*``); transformers-4
checkpoints (``vision_model.`` prefix) are mapped onto them.

Run: ``fusion_bench modelpool=clip_vision_b32 suite=ta8``
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion_bench.checkpoint import LazyStateDict, files_fingerprint, find_weight_files
from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.base import (
    ZeroShotClassifier,
    cache_key,
    normalized_head,
    resolve_experts,
    unknown_expert,
)
from fusion_bench.paths import resolve_path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def vision_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map transformers-4 (``vision_model.``-prefixed) and -5 (flat) vision keys to flat keys.
    Text-tower and projection keys of full CLIPModel checkpoints are dropped, and so is the
    ``position_ids`` buffer (a constant that older versions saved)."""
    out = {}
    for key in keys:
        if key.startswith(_NOT_VISION):
            continue
        canonical = key.removeprefix("vision_model.")
        if canonical == "embeddings.position_ids":
            continue
        out[key] = canonical
    return out


def resolve_hf_dir(
    location: str,
    marker: str = "config.json",
    patterns: Sequence[str] = ("*.json", "*.txt", "model*.safetensors*"),
    fallback: Sequence[str] = ("*.json", "*.txt", "*.bin"),
) -> Path:
    """A local directory for a hub id or path; downloads (or reuses the hub cache) when needed.
    ``marker``: the file a directory must have; ``patterns`` the files fetched (``fallback`` when
    they hold no safetensors file). PEFT adapters: ``marker="adapter_config.json"``."""
    local = Path(resolve_path(location))
    if local.exists():
        if not (local / marker).is_file():
            raise FusionBenchError(
                f"'{local}' exists but has no {marker}: point the pool at a directory written "
                "by `save_pretrained` (or at a Hugging Face hub id)."
            )
        return local
    if location.count("/") != 1 or location.startswith((".", "/", "~")):
        raise FusionBenchError(
            f"Model '{location}' is neither an existing directory nor a Hugging Face hub id "
            "(owner/name). Check the path in the model pool config."
        )
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(location, allow_patterns=list(patterns)))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(location, allow_patterns=list(fallback)))
        return path
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {e}".splitlines()[0]
        raise FusionBenchError(
            f"Cannot get '{location}' from the Hugging Face Hub ({why}) and it is not in the local "
            f"cache. Fix: on a machine with network run `huggingface-cli download {location}` "
            "(fills the cache) or save the model with `save_pretrained` and put that directory "
            "in the model pool config."
        ) from None


class CLIPVisionModelPool:
    """Pretrained Hugging Face CLIP + fine-tuned vision towers, one per task."""

    family = "hf_clip"

    def __init__(
        self,
        pretrained: str,
        finetuned: dict[str, str] | str,
        tasks: list[str] | None = None,
        allow_unsafe_pickle: bool = False,
        check_finite: bool = True,
    ):
        self.pretrained_location = pretrained
        self.expert_locations = resolve_experts(finetuned, tasks)
        self.expert_names = list(self.expert_locations)
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.check_finite = check_finite

    # -- state dicts -------------------------------------------------------------------------
    @cached_property
    def _pretrained_dir(self) -> Path:
        return resolve_hf_dir(self.pretrained_location)

    def _lazy(self, directory: Path, name: str, key_map=vision_keys) -> LazyStateDict:
        return LazyStateDict(
            find_weight_files(directory),
            key_map=key_map,
            allow_unsafe_pickle=self.allow_unsafe_pickle,
            check_finite=self.check_finite,
            name=name,
        )

    def pretrained(self) -> LazyStateDict:
        return self._lazy(self._pretrained_dir, f"pretrained ({self.pretrained_location})")

    def expert(self, name: str) -> LazyStateDict:
        if name not in self.expert_locations:
            raise unknown_expert(name, self.expert_names)
        location = self.expert_locations[name]
        return self._lazy(resolve_hf_dir(location), f"{name} ({location})")

    # -- modules -----------------------------------------------------------------------------
    @cached_property
    def vision_config(self):
        from transformers import AutoConfig, CLIPConfig

        config = AutoConfig.from_pretrained(self._pretrained_dir)
        return config.vision_config if isinstance(config, CLIPConfig) else config

    @cached_property
    def _pretrained_extras(self) -> tuple[Tensor, float]:
        """(visual_projection weight, logit scale) of the full pretrained CLIPModel."""
        extras = self._lazy(
            self._pretrained_dir,
            "pretrained",
            key_map=lambda keys: {
                k: k for k in keys if k in ("visual_projection.weight", "logit_scale")
            },
        )
        if "visual_projection.weight" not in extras:
            raise FusionBenchError(
                f"The pretrained entry '{self.pretrained_location}' is a vision-only checkpoint. "
                "It must be a full CLIPModel (e.g. openai/clip-vit-base-patch32): its text tower "
                "builds the zero-shot heads."
            )
        return extras["visual_projection.weight"].float(), float(
            extras["logit_scale"].float().exp()
        )

    def build_encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        from transformers import CLIPVisionModel

        # Built on the meta device and given the tensors (assign=True): no random initialisation
        # (seconds for ViT-L/14) and no second copy of the weights.
        with torch.device("meta"):
            encoder = CLIPVisionModel(self.vision_config)
        state = self.pretrained() if state_dict is None else state_dict
        tensors = {k: state[k].float() if state[k].is_floating_point() else state[k] for k in state}
        encoder.load_state_dict(tensors, strict=True, assign=True)
        # The one non-persistent buffer (never in checkpoints) is rebuilt as transformers does.
        embeddings = encoder.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
        if any(t.is_meta for t in (*encoder.parameters(), *encoder.buffers())):
            raise RuntimeError("CLIPVisionModel gained a buffer that build_encoder does not set")
        return encoder.eval()

    def classifier(self, encoder: nn.Module) -> ZeroShotClassifier:
        projection, logit_scale = self._pretrained_extras

        def features(enc: nn.Module, images: Tensor) -> Tensor:
            pooled = enc(pixel_values=images).pooler_output  # (B, hidden)
            return pooled @ projection.to(pooled.device, pooled.dtype).T  # (B, D)

        return ZeroShotClassifier(
            encoder=encoder,
            features=features,
            zero_shot_head=self._zero_shot_head,
            preprocess=self.preprocess,
            logit_scale=logit_scale,
            head_cache_key=cache_key(
                self.family, files_fingerprint(find_weight_files(self._pretrained_dir))
            ),
        )

    def _zero_shot_head(
        self, classnames: Sequence[str], templates: Sequence[str], device: torch.device
    ) -> Tensor:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(self._pretrained_dir).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self._pretrained_dir)
        max_length = model.config.text_config.max_position_embeddings
        per_class = []
        with torch.no_grad():
            for c in classnames:
                tokens = tokenizer(
                    [t.format(c=c) for t in templates],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                out = model.get_text_features(**tokens)
                per_class.append(out if isinstance(out, Tensor) else out.pooler_output)
        return normalized_head(per_class)

    @cached_property
    def preprocess(self):
        """CLIP's eval transform, read from preprocessor_config.json when present."""
        from torchvision import transforms as T

        size = crop = self.vision_config.image_size
        mean, std = OPENAI_MEAN, OPENAI_STD
        cfg_file = self._pretrained_dir / "preprocessor_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            size_cfg = cfg.get("size", size)
            size = size_cfg.get("shortest_edge", size) if isinstance(size_cfg, dict) else size_cfg
            crop_cfg = cfg.get("crop_size", crop)
            crop = crop_cfg.get("height", crop) if isinstance(crop_cfg, dict) else crop_cfg
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return T.Compose(
            [
                T.Lambda(lambda im: im.convert("RGB")),
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(crop),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    # -- output ------------------------------------------------------------------------------
    def save(self, state_dict: Mapping[str, Tensor], path: Path, card: str) -> None:
        """A ``save_pretrained`` directory, loadable with ``CLIPVisionModel.from_pretrained``."""
        encoder = self.build_encoder(state_dict)
        encoder.save_pretrained(path, safe_serialization=True)
        pre = self._pretrained_dir / "preprocessor_config.json"
        if pre.is_file():
            (path / "preprocessor_config.json").write_text(pre.read_text())
        (path / "README.md").write_text(card)

    def describe(self) -> dict:
        return {
            "family": self.family,
            "pretrained": self.pretrained_location,
            "experts": dict(self.expert_locations),
        }
