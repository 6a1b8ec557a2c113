"""Per-call cost of the spectral kernel (``fusion_bench/spectral.py``) on one thread, on task
matrices built like the synthetic pools' (a rank-8 update plus dense noise): the Gram product, the
eigen-decomposition, a top-k (k = r/8, TSV-M with 8 tasks), a polar factor (Iso-C), and the
polar factor of 8 tasks' stacked top-k singular vectors (TSV-M). Medians of ``--repeat`` calls.

Run: ``python benchmarks/spectral_kernel.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fusion_bench import spectral


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def task_matrix(m: int, n: int) -> torch.Tensor:
        low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
        return (torch.randn(m, n, generator=g) * 2e-4 + low * 2e-3 / 8**0.5).double()

    rows = {}
    for m, n in [(768, 768), (3072, 768)]:
        a = task_matrix(m, n)
        k = min(m, n) // 8
        stacked = torch.cat(
            [spectral.top_singular_triplets(task_matrix(m, n), k)[0] for _ in range(8)], 1
        )
        s = torch.linalg.svdvals(a)
        rows[f"{m}x{n}"] = {
            "condition": float(s[0] / s[-1]),
            "gram_s": timed(lambda a=a: a.T @ a, args.repeat),
            "eigh_s": timed(lambda a=a: torch.linalg.eigh(a.T @ a), args.repeat),
            "top_k_s": timed(lambda a=a, k=k: spectral.top_singular_triplets(a, k), args.repeat),
            "polar_s": timed(lambda a=a: spectral.polar_factor(a), args.repeat),
            "polar_stacked_u_s": timed(lambda u=stacked: spectral.polar_factor(u), args.repeat),
            "svd_s": timed(lambda a=a: spectral.svd(a), args.repeat),
        }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
