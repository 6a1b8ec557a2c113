"""Peak memory of the streaming merges does not grow with the number of experts.

Task arithmetic, TIES and the continual merges (OPCM, continual task arithmetic: experts absorbed
one at a time) merge 4 and then 16 experts of a small model (1M float32 parameters,
4 MiB per expert, safetensors files) through ``fusion_bench.merge`` on file paths, each in a fresh
Python process, which reports how far the merge raised its peak RSS. A method that held every
expert would need 12 × 4 = 48 MiB more for 16 experts than for 4; the test allows a tenth of that
(4.8 MiB; measured: under 0.5 MiB). It also catches checkpoint pages kept mapped: before each
tensor was read through a short-lived mapping, the pages of every expert read counted in RSS
(measured: +1 MiB per MiB of expert read).

The peak is the kernel's VmHWM, reset to the current RSS (``/proc/self/clear_refs``) once the
imports are done, not ``ru_maxrss``: a child started with vfork + exec inherits its parent's
(pytest's) peak in ``ru_maxrss``, which hid the merge entirely, and it cannot be reset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

N_KEYS, SHAPE = 8, (256, 512)  # 8 × 131072 floats = 1M parameters = 4 MiB per expert
EXPERT_MIB = N_KEYS * SHAPE[0] * SHAPE[1] * 4 / 2**20
# Everything a run imports is imported before the first measurement, so the delta is the merge.
PROBE = """
import json, sys
import torch, fusion_bench.api, fusion_bench.method.task_arithmetic, fusion_bench.method.ties_merging
import fusion_bench.method.continual.opcm, fusion_bench.method.continual.task_arithmetic
import fusion_bench.modelpool.clip_vision, fusion_bench.modelpool.open_clip, tqdm.auto

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

method, pretrained, experts = sys.argv[1], sys.argv[2], sys.argv[3:]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = kib("VmRSS")
fusion_bench.api.merge(method, pretrained, experts)
print(json.dumps({"before_kib": before, "peak_kib": kib("VmHWM")}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, list[str]]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("memory")
    g = torch.Generator().manual_seed(0)
    numel = SHAPE[0] * SHAPE[1]

    def model(flat: torch.Tensor) -> dict:  # one tensor drawn per model, then split into keys
        return {
            f"blocks.{i}.weight": flat[i * numel : (i + 1) * numel].view(SHAPE)
            for i in range(N_KEYS)
        }

    pre = torch.randn(N_KEYS * numel, generator=g)
    save_file(model(pre), root / "pretrained.safetensors")
    experts = []
    for e in range(16):
        path = root / f"expert{e}.safetensors"
        save_file(model(pre + 0.01 * torch.randn(N_KEYS * numel, generator=g)), path)
        experts.append(str(path))
    return str(root / "pretrained.safetensors"), experts


def merge_mib(method: str, pretrained: str, experts: list[str]) -> float:
    """MiB the merge added to the process's peak RSS."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        # One intra-op thread: on a busy shared machine each OpenMP region can stall for a
        # scheduler quantum (measured 20 ms per 512 KiB op with 2 threads, 0.02 ms with 1).
        "OMP_NUM_THREADS": "1",
        # A fixed mmap threshold: freed blocks above 128 KiB go back to the OS, so RSS measures
        # what the merge holds, not glibc's heap fragmentation (which otherwise added 4-6 MiB
        # at 16 experts, measured).
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, method, pretrained, *experts],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return (rss["peak_kib"] - rss["before_kib"]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize(
    "method",
    ["task_arithmetic", "ties_merging", "continual/opcm", "continual/task_arithmetic"],
)
def test_peak_rss_does_not_grow_with_experts(method, checkpoints):
    pretrained, experts = checkpoints
    few, many = merge_mib(method, pretrained, experts[:4]), merge_mib(method, pretrained, experts)
    growth = many - few
    print(f"{method}: merge peak +{few:.1f} MiB (4 experts), +{many:.1f} MiB (16 experts)")
    assert growth < 0.1 * 12 * EXPERT_MIB, (few, many)
