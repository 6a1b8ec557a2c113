"""A pool of independently trained image towers: models that share an architecture family (the
open_clip ViT, widths may differ) but **no** pretrained start, for fusion by alignment
(``method=fusion/*``: weight matching, activation matching, OT fusion, PLeaS).

The base pool (``base``: an open_clip pool config with ``finetuned: {}``) gives the text tower,
zero-shot heads, preprocessing and the checkpoint format; ``models`` maps a name to each tower's
checkpoint (its image tower state dict, the open_clip pool's key layout). A member whose
architecture is not the base's (another width or head count) names its open_clip JSON config in
``model_configs``. There is no common pretrained image tower, so ``pretrained()`` is an error
naming the methods that apply (task-vector methods would compute nonsense here).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/ot_fusion``
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fusion_bench.checkpoint import LazyStateDict
from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.base import ZeroShotClassifier, unknown_expert
from fusion_bench.paths import resolve_path

FUSION_METHODS = (
    "fusion/vanilla_average, fusion/weight_matching, fusion/activation_matching, "
    "fusion/ot_fusion, fusion/pleas, fusion/parent, simple_ensemble"
)


class IndependentModelPool:
    """Towers trained from different initialisations, evaluated with a base pool's text tower."""

    family = "independent"
    experts_option = "modelpool.models"  # what error messages name
    shared_init = False

    def __init__(
        self,
        base: Any,
        models: dict[str, str],
        tasks: list[str] | None = None,
        model_configs: dict[str, str] | None = None,
    ):
        from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

        if not isinstance(base, OpenCLIPModelPool):
            raise FusionBenchError(
                "modelpool.base of an independent pool must be an open_clip pool "
                "(_target_: fusion_bench.modelpool.open_clip.OpenCLIPModelPool): the fusion "
                f"methods align open_clip ViT towers; got {type(base).__name__}."
            )
        if base.expert_names:
            raise FusionBenchError(
                f"modelpool.base has fine-tuned experts {base.expert_names}; in an independent "
                "pool the models are modelpool.models. Set modelpool.base.finetuned={} ."
            )
        if not isinstance(models, Mapping):
            raise FusionBenchError(
                f"modelpool.models must be a mapping {{name: checkpoint}}, got {models!r}."
            )
        unknown = sorted(set(model_configs or {}) - set(models))
        if unknown:
            raise FusionBenchError(
                f"modelpool.model_configs names {unknown}, which are not in modelpool.models "
                f"({sorted(models)})."
            )
        self.base = base
        self.model_locations = {name: resolve_path(loc) for name, loc in models.items()}
        self.model_configs = {n: resolve_path(c) for n, c in (model_configs or {}).items()}
        self.expert_names = list(self.model_locations)
        self.tasks = list(tasks or [])  # what the models classify: data for alignment/fine-tuning

    # -- the models --------------------------------------------------------------------------
    def pretrained(self) -> LazyStateDict:
        raise FusionBenchError(
            "This model pool's towers were trained from different initialisations: there is no "
            "common pretrained image tower, so task vectors (and every method built on them) "
            f"do not exist here. Methods for this pool: {FUSION_METHODS}."
        )

    def expert(self, name: str) -> LazyStateDict:
        if name not in self.model_locations:
            raise unknown_expert(name, self.expert_names)
        path = Path(self.model_locations[name])
        if not path.is_file():
            raise FusionBenchError(
                f"Model '{name}': checkpoint '{path}' does not exist; fix modelpool.models.{name}."
            )
        return self.base._lazy(path, f"{name} ({path})")

    def vision_config(self, name: str) -> dict:
        """Model ``name``'s open_clip vision config (its model_configs entry, else the base's)."""
        if name not in self.model_configs:
            return dict(self._base_config["vision_cfg"])
        path = Path(self.model_configs[name])
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FusionBenchError(
                f"modelpool.model_configs.{name}: cannot read open_clip config '{path}' ({e})."
            ) from None
        if "vision_cfg" not in config or config.get("embed_dim") != self._base_config.get(
            "embed_dim"
        ):
            raise FusionBenchError(
                f"modelpool.model_configs.{name} ('{path}') is not an open_clip config with the "
                f"base model's embed_dim {self._base_config.get('embed_dim')}: the towers must "
                "map into the same image-text space."
            )
        return dict(config["vision_cfg"])

    def spec(self, name: str):
        """Model ``name``'s :class:`~fusion_bench.method.fusion.tower.TowerSpec` (heads and
        activation from its config, checked against the checkpoint's width and tokens)."""
        from fusion_bench.method.fusion.tower import TowerSpec

        cfg = self.vision_config(name)
        state = self.expert(name)
        if "conv1.weight" in state and state.shape("conv1.weight")[0] != cfg["width"]:
            raise FusionBenchError(
                f"Model '{name}' has width {state.shape('conv1.weight')[0]} but its config says "
                f"{cfg['width']}: give its open_clip config in modelpool.model_configs.{name}."
            )
        heads = cfg["width"] // cfg.get("head_width", 64)
        spec = TowerSpec.of(state, heads, f"Model '{name}'", self._quick_gelu(name))
        grid = cfg["image_size"] // cfg["patch_size"]
        if spec.tokens != 1 + grid * grid:
            raise FusionBenchError(
                f"Model '{name}' has {spec.tokens} position embeddings, but its config's image "
                f"size {cfg['image_size']} and patch {cfg['patch_size']} give {1 + grid * grid} "
                "tokens: the checkpoint is of another image size."
            )
        return spec

    def _quick_gelu(self, name: str) -> bool:
        """Whether model ``name`` uses QuickGELU (its own config's flag, else the base's)."""
        if name in self.model_configs:
            config = json.loads(Path(self.model_configs[name]).read_text())
            if "quick_gelu" in config:
                return bool(config["quick_gelu"])
        return bool(self._base_config.get("quick_gelu", False))

    def check_members(self) -> None:
        """At least two models, each an open_clip ViT tower whose checkpoint matches its config,
        all of one architecture up to width (the fusion methods' precondition)."""
        if len(self.expert_names) < 2:
            raise FusionBenchError(
                f"Fusion needs at least two models; modelpool.models has {self.expert_names}. "
                "Add models (e.g. +modelpool.models.other=path.safetensors)."
            )
        specs = {}
        for name in self.expert_names:
            specs[name] = self.spec(name)
        first, ref = next(iter(specs.items()))
        for name, spec in specs.items():
            diff = ref.same_up_to_width(spec)
            if diff:
                raise FusionBenchError(
                    f"Models '{first}' and '{name}' differ beyond width ({', '.join(diff)}): "
                    "fusion aligns neurons of towers with the same layers, patches, tokens, "
                    "head size and output dimension."
                )

    # -- modules -----------------------------------------------------------------------------
    @cached_property
    def _base_config(self) -> dict:
        config = self.base._open_clip.get_model_config(self.base.model_name)
        if config is None:
            raise FusionBenchError(f"open_clip has no config for '{self.base.model_name}'.")
        return config

    def build_encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        """An image tower shaped like ``state_dict``: the base's architecture with the width,
        heads and MLP width of the weights (a member's config where one has that width)."""
        import open_clip.model as oc

        if state_dict is None:
            return self.pretrained()  # the clear error
        width = state_dict["conv1.weight"].shape[0]
        cfg = dict(self._base_config["vision_cfg"])
        for name in self.expert_names:  # a member of that width gives its own head size
            member = self.vision_config(name)
            if member["width"] == width:
                cfg = member
                break
        cfg = copy.deepcopy(cfg)
        cfg["width"] = width
        hidden = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        cfg["mlp_ratio"] = hidden / width
        encoder = oc._build_vision_tower(
            self._base_config["embed_dim"],
            oc.CLIPVisionCfg(**cfg),
            quick_gelu=self._base_config.get("quick_gelu", False),
        )
        try:
            encoder.load_state_dict({k: state_dict[k] for k in state_dict}, strict=True)
        except RuntimeError as e:
            raise FusionBenchError(
                f"These weights do not fit an open_clip tower of width {width}, MLP width "
                f"{hidden} ({str(e).splitlines()[0]}): every block must have the same MLP width."
            ) from None
        return encoder.eval()

    @property
    def preprocess(self):
        """PIL image -> (3, H, W) tensor, as for evaluation."""
        return self.base._skeleton[1]

    def classifier(self, encoder: nn.Module) -> ZeroShotClassifier:
        return self.base.classifier(encoder)

    def save(self, state_dict: Mapping[str, Tensor], path: Path, card: str) -> None:
        """The fused tower in the open_clip pool's format. Reload it as a member of this pool:
        ``+modelpool.models.fused=DIR/model.safetensors method=fusion/parent
        method.name=fused`` (the architecture is read from the weights)."""
        self.base.save(state_dict, path, card)

    def describe(self) -> dict:
        base = {k: v for k, v in self.base.describe().items() if k != "experts"}
        return {
            "family": self.family,
            "base": base,
            "models": dict(self.model_locations),
            **({"model_configs": dict(self.model_configs)} if self.model_configs else {}),
        }
