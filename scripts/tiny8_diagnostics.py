"""Three diagnostics of how CLIP-like a tiny8 build's fine-tuning is (issue 17), on the shipped
artefacts (or another build's, with Hydra overrides for the pool):

- relative size of each task vector, ‖θ_t − θ0‖ / ‖θ0‖ over the image tower;
- linearity: the share of an expert's validation gain over zero-shot kept at half its task
  vector, (acc(θ0 + ½τ_t) − acc(θ0)) / (acc(θ_t) − acc(θ0)) on its own task;
- orthogonality: the cosine between every pair of task vectors (mean and max |cos|);
- low rank: the share of an expert's validation gain kept when each of its 2-D task matrices is
  truncated to its top ⌊min(m, n) / T⌋ singular triplets (T experts: the rank TSV-M gives each
  task), and the share of the task matrices' squared Frobenius norm those triplets hold. The TSV
  paper (Gargiulo et al., CVPR 2025) reports about 99 % of CLIP's accuracy kept at about 10 % of
  the size; the merges that split the spectrum between tasks rely on it.

    python scripts/tiny8_diagnostics.py [hydra overrides, e.g. modelpool=...]

About a minute on 2 CPU cores (32 validation evaluations).
"""

from __future__ import annotations

import itertools
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fusion_bench.method.tsv_m import TsvM
from fusion_bench.paths import config_dir
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.tensor_ops import is_excluded

AVERAGED = TsvM().average_keys  # 2-D keys TSV-M averages instead of compressing (its default)


def low_rank_task_vector(
    theta0: dict[str, torch.Tensor], expert: dict[str, torch.Tensor], n_tasks: int
) -> tuple[dict[str, torch.Tensor], float]:
    """θ0 + τ with every 2-D task matrix (but ``AVERAGED``) cut to its top ⌊min(m, n) / n_tasks⌋
    singular triplets, other tensors whole; and the share of the 2-D task matrices' squared
    Frobenius norm the kept triplets hold."""
    state, kept, total = {}, 0.0, 0.0
    for key, base in theta0.items():
        tau = expert[key].double() - base.double()
        if base.dim() == 2 and not is_excluded(key, AVERAGED):
            k = min(base.shape) // n_tasks
            u, s, vh = top_singular_triplets(tau, k)
            kept, total = kept + float((s**2).sum()), total + float((tau**2).sum())
            tau = (u * s) @ vh
        state[key] = (base.double() + tau).to(base.dtype)
    return state, (kept / total if total > 0 else float("nan"))


def main(overrides: list[str]) -> None:
    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose(
            "config", ["suite=tiny8", "taskpool.splits=[validation]", "logger=none", *overrides]
        )
    pool = instantiate(cfg.modelpool, _convert_="all")
    taskpool = instantiate(cfg.taskpool, _convert_="all")
    theta0 = {k: v.float() for k, v in pool.pretrained().items()}
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    norm0 = torch.sqrt(sum((theta0[k] ** 2).sum() for k in keys))
    taus, rows = {}, []
    for task in pool.expert_names:
        expert = pool.expert(task)
        taus[task] = torch.cat([(expert[k].float() - theta0[k]).flatten() for k in keys])
        states = [
            {k: theta0[k] + alpha * (expert[k].float() - theta0[k]) for k in keys}
            for alpha in (0.0, 0.5, 1.0)
        ]
        low_rank, energy = low_rank_task_vector(
            {k: theta0[k] for k in keys}, expert, len(pool.expert_names)
        )
        accs = []
        for state in [*states, low_rank]:
            classifier = pool.classifier(pool.build_encoder(state))
            metrics = taskpool.evaluate(classifier, tasks=[task])
            accs.append(metrics[f"validation/{task}/acc"])
        gain = accs[2] - accs[0]
        kept, kept_low = (
            (acc - accs[0]) / gain if gain > 0 else float("nan") for acc in (accs[1], accs[3])
        )
        rel = float(taus[task].norm() / norm0)
        rows.append((task, rel, accs, kept, kept_low, energy))
    print(
        "| task | ‖τ‖/‖θ0‖ | val acc θ0 | θ0+½τ | θ0+τ | gain kept at ½τ | θ0+τ, rank r/T "
        "| gain kept at rank r/T | ‖τ‖² in rank r/T |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for task, rel, accs, kept, kept_low, energy in rows:
        print(
            f"| {task.removeprefix('tiny8_')} | {rel:.3f} | {100 * accs[0]:.1f} | "
            f"{100 * accs[1]:.1f} | {100 * accs[2]:.1f} | {100 * kept:.0f} % | "
            f"{100 * accs[3]:.1f} | {100 * kept_low:.0f} % | {100 * energy:.0f} % |"
        )
    cos = [
        float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0))
        for a, b in itertools.combinations(taus, 2)
    ]
    mean_rel = sum(r[1] for r in rows) / len(rows)
    mean_kept = sum(r[3] for r in rows) / len(rows)
    mean_low = sum(r[4] for r in rows) / len(rows)
    mean_energy = sum(r[5] for r in rows) / len(rows)
    print(
        f"\nmean ‖τ‖/‖θ0‖ {mean_rel:.3f}; mean gain kept at ½τ {100 * mean_kept:.0f} %; "
        f"task-vector cosine mean {sum(cos) / len(cos):.3f}, max |cos| "
        f"{max(abs(c) for c in cos):.3f} over {len(cos)} pairs; at rank r/T "
        f"(T = {len(rows)}) mean gain kept {100 * mean_low:.0f} %, ‖τ‖² kept {100 * mean_energy:.0f} %"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
