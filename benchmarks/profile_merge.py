"""cProfile of one ``merge_once.py`` run: where a method's time goes (the profiles quoted in
docs/benchmarks.md). Same arguments as ``merge_once.py``; prints the top functions by own time.

Run: ``python benchmarks/profile_merge.py ties_merging ~/.cache/fusion_bench/bench/b32 8 /tmp/out``
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_once  # noqa: E402


def main() -> None:
    profiler = cProfile.Profile()
    profiler.runcall(merge_once.main, sys.argv[1:])
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
