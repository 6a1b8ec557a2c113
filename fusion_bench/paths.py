"""Where fusion_bench finds its own files: configs, embedded data, caches."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_PREFIX = "fusion_bench:"  # "fusion_bench:tiny8/x" = a file shipped in fusion_bench/data/


def config_dir() -> Path:
    """``conf/`` of a checkout (editable install), else the copy packed into the wheel."""
    for candidate in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"fusion_bench configs not found next to {PACKAGE_DIR}: broken install")


def resolve_path(location: str) -> str:
    """Expand ``fusion_bench:<path>`` (data shipped with the package) and ``~``; other strings
    (hub ids, absolute or relative paths) are returned unchanged apart from ``~``."""
    if location.startswith(PACKAGE_PREFIX):
        return str(PACKAGE_DIR / "data" / location[len(PACKAGE_PREFIX) :])
    return os.path.expanduser(location)


def cache_dir() -> Path:
    """Cache root: $FUSION_BENCH_CACHE, else $XDG_CACHE_HOME/fusion_bench, else ~/.cache/..."""
    if "FUSION_BENCH_CACHE" in os.environ:
        return Path(os.environ["FUSION_BENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "fusion_bench"
