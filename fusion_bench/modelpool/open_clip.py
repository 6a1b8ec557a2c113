"""open_clip model pool: a zero-shot open_clip CLIP + fine-tuned image towers as state-dict files.

The pretrained model is an open_clip architecture name (``ViT-B-32`` ...) with either a pretrained
tag (``openai``, ``laion2b_s34b_b79k`` ..., fetched through open_clip's own download code) or a
checkpoint file of the full CLIP. Experts are state dicts of the image tower in any of the common
layouts: task_vectors / TALL-masks ``ImageEncoder`` files (``model.visual.*`` keys), full open_clip
state dicts (``visual.*``), or bare ``model.visual.state_dict()`` files (the canonical layout,
which is also what this pool writes).

Run: ``fusion_bench modelpool=open_clip_b32 suite=ta8``
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion_bench.checkpoint import LazyStateDict, files_fingerprint, save_safetensors
from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.base import (
    ZeroShotClassifier,
    cache_key,
    resolve_experts,
    unknown_expert,
)
from fusion_bench.paths import resolve_path


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "model."):
        key = key.removeprefix(prefix)
    return key


def visual_keys(keys: Sequence[str]) -> dict[str, str]:
    """Stored keys -> canonical image-tower keys. A file with any ``visual.`` key is a whole-CLIP
    layout (keep only the image tower); otherwise its keys already are image-tower keys."""
    stripped = {k: _strip_wrappers(k) for k in keys}
    if any(s.startswith("visual.") for s in stripped.values()):
        return {
            k: s.removeprefix("visual.") for k, s in stripped.items() if s.startswith("visual.")
        }
    return stripped


def full_clip_keys(keys: Sequence[str]) -> dict[str, str]:
    return {k: _strip_wrappers(k) for k in keys}


class OpenCLIPModelPool:
    """Pretrained open_clip CLIP + fine-tuned image towers, one per task."""

    family = "open_clip"

    def __init__(
        self,
        model_name: str,
        pretrained: str,
        finetuned: dict[str, str] | str,
        tasks: list[str] | None = None,
        model_config: str | None = None,
        allow_unsafe_pickle: bool = False,
        check_finite: bool = True,
    ):
        self.model_name = model_name
        self.pretrained_location = pretrained
        self.model_config = model_config
        self.expert_locations = {
            name: resolve_path(loc) for name, loc in resolve_experts(finetuned, tasks).items()
        }
        self.expert_names = list(self.expert_locations)
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.check_finite = check_finite

    # -- files -------------------------------------------------------------------------------
    @cached_property
    def _open_clip(self):
        import open_clip

        if self.model_config is not None:
            config = Path(resolve_path(self.model_config))
            if not config.is_file():
                raise FusionBenchError(
                    f"open_clip model config '{config}' does not exist; fix modelpool.model_config."
                )
            open_clip.add_model_config(config)
        if self.model_name not in open_clip.list_models():
            from fusion_bench.errors import did_you_mean

            raise FusionBenchError(
                f"open_clip has no architecture '{self.model_name}'."
                f"{did_you_mean(self.model_name, open_clip.list_models())} For a custom "
                "architecture, set modelpool.model_config to its JSON file."
            )
        return open_clip

    @cached_property
    def _pretrained_file(self) -> Path:
        local = Path(resolve_path(self.pretrained_location))
        if local.is_file():
            return local
        if local.is_dir():
            raise FusionBenchError(
                f"modelpool.pretrained '{local}' is a directory; the open_clip pool reads one file "
                "with the full CLIP state dict (or an open_clip pretrained tag such as 'openai'): "
                "point it at the file inside."
            )
        if "/" in self.pretrained_location or local.suffix:
            raise FusionBenchError(
                f"Pretrained checkpoint '{local}' does not exist. Check modelpool.pretrained "
                "(a file of the full CLIP state dict, or an open_clip pretrained tag)."
            )
        open_clip = self._open_clip
        tags = [t for m, t in open_clip.list_pretrained() if m == self.model_name]
        if self.pretrained_location not in tags:
            raise FusionBenchError(
                f"'{self.pretrained_location}' is not an open_clip pretrained tag of "
                f"{self.model_name} (tags: {tags}) nor an existing file."
            )
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained_location)
        try:
            path = open_clip.download_pretrained(cfg)
        except Exception as e:
            raise FusionBenchError(
                f"Cannot fetch open_clip weights {self.model_name}/{self.pretrained_location} "
                f"({type(e).__name__}; offline?). Fix: run the same command once on a machine "
                "with network (fills the cache), or download the checkpoint and set "
                "modelpool.pretrained to the file."
            ) from None
        if not path:
            raise FusionBenchError(
                f"open_clip found no weights for {self.model_name}/{self.pretrained_location}."
            )
        return Path(path)

    def _lazy(self, path: Path, name: str, key_map=visual_keys) -> LazyStateDict:
        return LazyStateDict(
            [path],
            key_map=key_map,
            allow_unsafe_pickle=self.allow_unsafe_pickle,
            check_finite=self.check_finite,
            name=name,
        )

    def pretrained(self) -> LazyStateDict:
        return self._lazy(self._pretrained_file, f"pretrained ({self.pretrained_location})")

    def expert(self, name: str) -> LazyStateDict:
        if name not in self.expert_locations:
            raise unknown_expert(name, self.expert_names)
        return self._lazy(
            Path(self.expert_locations[name]), f"{name} ({self.expert_locations[name]})"
        )

    # -- modules -----------------------------------------------------------------------------
    @cached_property
    def _skeleton(self):
        """(randomly initialised CLIP, eval transform): built once, copied per encoder. The
        weights are loaded from the pool's checkpoints afterwards, so open_clip's "No pretrained
        weights loaded ... initialized randomly" warning (and its INFO lines on the root logger)
        would only mislead: they are filtered out of this one call."""
        root = logging.getLogger()
        quiet = _QuietOpenClip()
        root.addFilter(quiet)
        try:
            model, _, preprocess = self._open_clip.create_model_and_transforms(
                self.model_name, pretrained=None
            )
        finally:
            root.removeFilter(quiet)
        return model.eval(), preprocess

    def build_encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        encoder = copy.deepcopy(self._skeleton[0].visual)
        state = self.pretrained() if state_dict is None else state_dict
        encoder.load_state_dict({k: state[k] for k in state}, strict=True)
        return encoder.eval()

    @cached_property
    def _logit_scale(self) -> float:
        extras = self._lazy(
            self._pretrained_file,
            "pretrained",
            key_map=lambda keys: {
                k: "logit_scale" for k in keys if _strip_wrappers(k) == "logit_scale"
            },
        )
        return float(extras["logit_scale"].float().exp())

    def classifier(self, encoder: nn.Module) -> ZeroShotClassifier:
        return ZeroShotClassifier(
            encoder=encoder,
            features=lambda enc, images: enc(images),
            zero_shot_head=self._zero_shot_head,
            preprocess=self._skeleton[1],
            logit_scale=self._logit_scale,
            head_cache_key=cache_key(
                self.family, self.model_name, files_fingerprint([self._pretrained_file])
            ),
        )

    def _zero_shot_head(
        self, classnames: Sequence[str], templates: Sequence[str], device: torch.device
    ) -> Tensor:
        """open_clip's own prompt ensembling over the pretrained text tower."""
        model = copy.deepcopy(self._skeleton[0])
        full = self._lazy(self._pretrained_file, "pretrained", key_map=full_clip_keys)
        model.load_state_dict({k: full[k] for k in full}, strict=True)
        tokenizer = self._open_clip.get_tokenizer(self.model_name)
        formatters = [lambda c, t=t: t.format(c=c) for t in templates]
        return self._open_clip.build_zero_shot_classifier(
            model.to(device),
            tokenizer,
            classnames,
            formatters,
            num_classes_per_batch=10,
            device=device,
            use_tqdm=False,
        )

    # -- output ------------------------------------------------------------------------------
    def save(self, state_dict: Mapping[str, Tensor], path: Path, card: str) -> None:
        """``model.safetensors`` with the image tower (canonical keys) + a model card."""
        save_safetensors(
            state_dict,
            path / "model.safetensors",
            {"format": "pt", "open_clip_model": self.model_name},
        )
        (path / "README.md").write_text(card)

    def describe(self) -> dict:
        return {
            "family": self.family,
            "model_name": self.model_name,
            "pretrained": self.pretrained_location,
            "experts": dict(self.expert_locations),
        }


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's INFO lines and its random-initialisation warning (see ``_skeleton``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        return (
            record.levelno >= logging.WARNING and "No pretrained weights" not in record.getMessage()
        )
