"""Evaluate a saved routed model: the directory ``merged_model_save_path`` wrote for a routed
method (``config.json``: the method's ``_target_`` and hyper-parameters, the expert names, the
pool it was built from; ``model.safetensors``: the routed model's ``state_dict()``; a card).

The method named in ``config.json`` rebuilds the model from the saved tensors
(``RoutedMethod.load``); the pool given on the command line supplies the architecture, the text
tower and the zero-shot heads, so it must be the pool's architecture the model was built from.

Run: ``fusion_bench method=routed/checkpoint method.path=outputs/mass modelpool=tiny8``
Memory: what the routed model stores (its ``costs.stored_parameters`` in the report).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import RoutedMethod, RoutedModel

FORMAT = "fusion_bench.routed"
VERSION = 1


def write_routed(routed: RoutedModel, method: RoutedMethod, pool: Any, directory: Path, card: str):
    """Fill ``directory`` with the routed model (the runner writes it atomically)."""
    from fusion_bench.checkpoint import save_safetensors

    cls = type(method)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "method": {"_target_": f"{cls.__module__}.{cls.__qualname__}", **asdict(method)},
        "experts": routed.expert_names,
        "modelpool": pool.describe(),
    }
    state = {k: v.detach().cpu() for k, v in routed.state_dict().items()}
    save_safetensors(
        state, directory / "model.safetensors", {"format": "pt", "fusion_bench": FORMAT}
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").write_text(card)


def read_routed(path: str | Path, pool: Any) -> RoutedModel:
    """The routed model saved at ``path``, rebuilt on ``pool``'s architecture."""
    from hydra.utils import instantiate

    from fusion_bench.checkpoint import LazyStateDict

    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FusionBenchError(
            f"'{directory}' is not a saved routed model (no config.json). Give the directory "
            "that merged_model_save_path wrote for a routed method (method=routed/...)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise FusionBenchError(
            f"{config_file} is not valid JSON ({e}): the save is corrupted."
        ) from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise FusionBenchError(
            f"{config_file} is not a fusion_bench routed model of format version {VERSION} "
            f"(format {config.get('format')!r}, version {config.get('version')!r})."
        )
    method = instantiate(config["method"], _convert_="all")
    if getattr(method, "kind", None) != "routed":
        raise FusionBenchError(
            f"{config_file} names {config['method']['_target_']}, not a routed method."
        )
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FusionBenchError(f"'{directory}' has config.json but no model.safetensors.")
    state = LazyStateDict([weights], name=str(weights))  # clear errors for a corrupted file
    return method.load(pool, list(config["experts"]), {k: state[k] for k in state})


@dataclass(frozen=True)
class RoutedCheckpoint(RoutedMethod):
    path: str | None = None  # a directory written by merged_model_save_path for a routed method

    def build(self, pool, data, context):
        if not self.path:
            raise FusionBenchError(
                "method=routed/checkpoint needs method.path: the directory a routed method saved "
                "with merged_model_save_path."
            )
        return read_routed(self.path, pool)

    def models_held(self, n_experts: int) -> float:
        return 0.0  # what the saved model stores; reported in costs
