"""fusion_bench: deep model merging of fine-tuned CLIP-ViT classifiers.

Importing the package is cheap (no torch); the Python API is loaded on first use:

    import fusion_bench
    merged = fusion_bench.merge("task_arithmetic", "pre.safetensors", ["a.safetensors"], scaling_factor=0.3)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["evaluate", "merge"]


def __getattr__(name: str):
    if name in __all__:
        from fusion_bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'fusion_bench' has no attribute {name!r}")
