#!/usr/bin/env python
"""Realism analysis of the built tiny8 checkpoints (issue 6, Part B).

Works directly on the state dicts in fusion_bench/data/tiny8/ (analysis only: the framework has the
official merging implementations). Reports, per task and averaged over the 8 tasks (test accuracy):
zero-shot, experts, simple average, task arithmetic (lambda chosen on the validation splits) and
TIES-merging (top-20% trim, sign election, disjoint mean, lambda chosen on validation), plus
diagnostics: pairwise task-vector cosines, linearity (accuracy of theta0 + 0.5 tau_t on task t).

    .venv/bin/python scripts/tiny8_realism.py [--label NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tiny8 as B  # noqa: E402

LAMBDAS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def main(argv=None):
    import torch
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--label", default="current")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="/tmp/tiny8_cache")
    ap.add_argument("--topk", type=float, default=0.2)
    ap.add_argument(
        "--out", default=None, help="checkpoint folder (default fusion_bench/data/tiny8)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.out:
        B.OUT = Path(args.out).resolve()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, preprocess, tokenizer = B.load_pretrained()
    scale = model.logit_scale.exp().item()
    theta0 = {k: v.clone().float() for k, v in model.visual.state_dict().items()}
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    tasks = B.TASKS
    heads = {t: B.zero_shot_head(model, tokenizer, t) for t in tasks}
    data = {
        t: {s: B.load_split_tensors(t, s, preprocess, args.cache) for s in ("validation", "test")}
        for t in tasks
    }
    taus = {}
    for t in tasks:
        sd = load_file(str(B.OUT / "experts" / f"{t}.safetensors"))
        taus[t] = {k: sd[k].float() - theta0[k] for k in keys}

    def acc_all(sd, split, only=None):
        model.visual.load_state_dict(sd)
        return {
            t: B.evaluate(model.visual, heads[t], scale, *data[t][split]) for t in (only or tasks)
        }

    def combine(vec, lam):
        return {k: (theta0[k] + lam * vec[k]) if k in vec else theta0[k] for k in theta0}

    res = {}
    res["zero-shot"] = acc_all(theta0, "test")
    res["experts"] = {t: acc_all(combine(taus[t], 1.0), "test", [t])[t] for t in tasks}
    tsum = {k: sum(taus[t][k] for t in tasks) for k in keys}
    res["simple average"] = acc_all(combine(tsum, 1.0 / len(tasks)), "test")

    def select(vec, name):
        best, curve = None, []
        for lam in LAMBDAS:
            v = float(np.mean(list(acc_all(combine(vec, lam), "validation").values())))
            curve.append((lam, v))
            if best is None or v > best[1]:
                best = (lam, v)
        res[name] = acc_all(combine(vec, best[0]), "test")
        res[name]["_lambda"] = best[0]
        res[name]["_val_curve"] = curve

    select(tsum, "task arithmetic")
    # TIES: trim each task vector to its top-k% magnitudes (over the whole flattened vector), elect signs
    # by the sign of the summed trimmed vectors, average the agreeing entries (disjoint mean).
    flat = {t: torch.cat([taus[t][k].flatten() for k in keys]) for t in tasks}
    trimmed = []
    for t in tasks:
        v = flat[t]
        k = int(args.topk * v.numel())
        thr = v.abs().kthvalue(v.numel() - k + 1).values
        trimmed.append(torch.where(v.abs() >= thr, v, torch.zeros_like(v)))
    T = torch.stack(trimmed)
    sign = torch.sign(T.sum(0))
    agree = (torch.sign(T) == sign[None]) & (T != 0)
    merged = (T * agree).sum(0) / agree.sum(0).clamp(min=1)
    ties, off = {}, 0
    for k in keys:
        n = theta0[k].numel()
        ties[k] = merged[off : off + n].view_as(theta0[k])
        off += n
    select(ties, "TIES")

    # diagnostics
    names = list(tasks)
    cos = np.zeros((8, 8))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            cos[i, j] = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
    off_diag = cos[~np.eye(8, dtype=bool)]
    half = {t: acc_all(combine(taus[t], 0.5), "test", [t])[t] for t in tasks}
    base_norm = torch.cat([theta0[k].flatten() for k in keys]).norm().item()
    norms = {t: flat[t].norm().item() / base_norm for t in tasks}  # ||tau_t|| / ||theta_0||

    order = ["zero-shot", "simple average", "task arithmetic", "TIES", "experts"]
    print(f"\n tiny8 realism [{args.label}] (test accuracy %, lambda on validation)")
    print(f" {'method':<16}" + "".join(f"{t[:8]:>9}" for t in tasks) + f"{'avg':>8}")
    summary = {}
    for m in order:
        r = res[m]
        avg = float(np.mean([r[t] for t in tasks]))
        summary[m] = avg
        lam = f"  (lambda={r['_lambda']})" if "_lambda" in r else ""
        print(
            f" {m:<16}" + "".join(f"{100 * r[t]:>9.1f}" for t in tasks) + f"{100 * avg:>8.1f}{lam}"
        )
    print(
        f" {'expert@0.5':<16}"
        + "".join(f"{100 * half[t]:>9.1f}" for t in tasks)
        + f"{100 * np.mean(list(half.values())):>8.1f}"
    )
    print(
        f" task-vector cosine (off-diagonal): mean {off_diag.mean():.3f}, max {off_diag.max():.3f}"
    )
    print(
        " relative task-vector norms ||tau||/||theta0||: "
        + ", ".join(f"{t} {norms[t]:.3f}" for t in tasks)
    )
    print(
        " TA val curve: "
        + " ".join(f"{lam}:{100 * v:.1f}" for lam, v in res["task arithmetic"]["_val_curve"])
    )
    print(
        " TIES val curve: "
        + " ".join(f"{lam}:{100 * v:.1f}" for lam, v in res["TIES"]["_val_curve"])
    )
    print(f" ({time.time() - t0:.0f}s)")
    if args.json:
        out = {
            "label": args.label,
            "summary": summary,
            "per_task": {m: {t: res[m][t] for t in tasks} for m in order},
            "lambda": {m: res[m].get("_lambda") for m in order},
            "half_linearity": half,
            "cos_mean": float(off_diag.mean()),
            "cos_max": float(off_diag.max()),
            "norms": norms,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
