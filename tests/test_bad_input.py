"""Bad input gives one clear FusionBenchError naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fusion_bench.checkpoint import LazyStateDict
from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
from fusion_bench.modelpool.open_clip import OpenCLIPModelPool
from fusion_bench.runner import validate_pool


def test_missing_file(tmp_path):
    with pytest.raises(FusionBenchError, match="does not exist"):
        LazyStateDict([tmp_path / "nope.safetensors"])


def test_corrupted_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(FusionBenchError, match="corrupted or truncated"):
        lazy = LazyStateDict([path])
        lazy["w"]
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FusionBenchError, match="corrupted or truncated"):
        LazyStateDict([path])


def test_corrupted_torch_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(FusionBenchError, match="bad.pt"):
        LazyStateDict([path])


@pytest.mark.parametrize("data", [bytes(range(256)) * 16, b"\x80\x02garbage"])
def test_random_bytes_are_not_called_a_pickle_to_allow(tmp_path, data):
    """Bytes that are no checkpoint are corrupted, not 'a pickle needing allow_unsafe_pickle'."""
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(FusionBenchError, match="not a torch checkpoint") as err:
        LazyStateDict([path])
    message = str(err.value)
    assert "allow_unsafe_pickle" not in message and "weights_only" not in message
    assert "\n" not in message and "\x1b" not in message


def test_a_directory_given_for_a_checkpoint_file(tmp_path):
    with pytest.raises(FusionBenchError, match="is a directory.*point it at the file inside"):
        LazyStateDict([tmp_path])


def test_nan_in_weights(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(FusionBenchError, match="NaN or Inf"):
        LazyStateDict([path])["w"]
    assert torch.isnan(LazyStateDict([path], check_finite=False)["w"]).any()
    save_file({"w": torch.tensor([1.0, float("-inf")])}, path)
    with pytest.raises(FusionBenchError, match="NaN or Inf"):
        LazyStateDict([path])["w"]


def test_huge_finite_weights_are_not_flagged(tmp_path):
    # their float32 sum overflows to inf, so the cheap check must fall back to the exact one
    path = tmp_path / "huge.safetensors"
    save_file({"w": torch.full((4,), 3e38)}, path)
    assert LazyStateDict([path])["w"].isfinite().all()


class _Pickled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


def test_pickled_module_needs_opt_in(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(_Pickled(), path)
    with pytest.raises(FusionBenchError, match="allow_unsafe_pickle") as err:
        LazyStateDict([path])
    assert "_Pickled" in str(err.value)  # names the object that needs full unpickling ...
    assert "\x1b" not in str(err.value)  # ... in plain text (torch's message has bold codes)
    lazy = LazyStateDict([path], allow_unsafe_pickle=True)
    assert set(lazy) == {"lin.weight", "lin.bias"}


def test_plain_torch_state_dict_loads_weights_only(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert torch.equal(LazyStateDict([path])["a"], torch.ones(2))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = CLIPVisionModelPool("someone/not-cached-model-xyz", {"mnist": "someone/x_mnist"})
    with pytest.raises(FusionBenchError, match="huggingface-cli download someone/not-cached"):
        pool.pretrained()


def test_architecture_mismatch(hf_pool_files, tmp_path):
    from transformers import CLIPVisionModel

    from tests.conftest import tiny_hf_config

    other = CLIPVisionModel(tiny_hf_config(hf_pool_files["vocab_size"], patch_size=4).vision_config)
    other.save_pretrained(tmp_path / "b16_like")
    pool = CLIPVisionModelPool(hf_pool_files["pretrained"], {"mnist": str(tmp_path / "b16_like")})
    with pytest.raises(FusionBenchError, match="different architecture"):
        validate_pool(pool)


def test_wrong_family(hf_pool_files, open_clip_pool_files):
    f = open_clip_pool_files
    pool = OpenCLIPModelPool(
        f["model_name"],
        f["pretrained"],
        {"mnist": hf_pool_files["experts"]["mnist"] + "/model.safetensors"},
        model_config=f["config"],
    )
    with pytest.raises(FusionBenchError, match="lacks"):
        validate_pool(pool)


def test_open_clip_pool_given_directories(open_clip_pool_files, tmp_path):
    """A directory where the open_clip pool wants a file says so (not 'does not exist')."""
    f = open_clip_pool_files
    pool = OpenCLIPModelPool(
        f["model_name"], str(tmp_path), {"mnist": str(tmp_path)}, model_config=f["config"]
    )
    with pytest.raises(FusionBenchError, match="is a directory.*point it at the file inside"):
        pool.pretrained()
    with pytest.raises(FusionBenchError, match="is a directory.*point it at the file inside"):
        pool.expert("mnist")


def test_template_without_placeholder():
    with pytest.raises(FusionBenchError, match="placeholder"):
        CLIPVisionModelPool("x", "no-placeholder-here", tasks=["mnist"])


def test_unknown_expert(hf_pool_files):
    pool = CLIPVisionModelPool(hf_pool_files["pretrained"], hf_pool_files["experts"])
    with pytest.raises(FusionBenchError, match="Did you mean 'mnist'"):
        pool.expert("mnistt")


def test_safetensors_positioned_reads_round_trip_and_truncation_after_open(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "w": torch.randn(64, 64),
    }
    save_file(tensors, path)
    lazy = LazyStateDict([path])
    for key, value in tensors.items():
        assert lazy[key].dtype == value.dtype and torch.equal(lazy[key], value), key
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # the file shrinks after it was opened
    with pytest.raises(FusionBenchError, match="corrupted or truncated"):
        lazy["w"]


def test_silent_wrong_merges_are_refused(tmp_path):
    """Issue 11, bug 6: an extra tensor (e.g. an extra block) would be dropped, an integer tensor
    cast; both must be errors, not a merge."""
    import fusion_bench

    pre = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    extra = {**pre, "blocks.12.w": torch.ones(4, 4)}
    with pytest.raises(FusionBenchError, match="lacks.*blocks.12.w|blocks.12.w"):
        fusion_bench.merge("task_arithmetic", pre, [extra])
    quantised = {"w": torch.ones(4, 4, dtype=torch.int8), "b": torch.zeros(4)}
    with pytest.raises(FusionBenchError, match="int8"):
        fusion_bench.merge("task_arithmetic", pre, [quantised])


def test_an_empty_pool_is_an_error_except_for_the_zero_shot_model(
    open_clip_cli_args, tmp_path, capsys
):
    from tests.test_cli import run_cli

    args = [a for a in open_clip_cli_args if not a.startswith("modelpool.finetuned")]
    code, _, err = run_cli(
        [
            *args,
            "modelpool.finetuned={}",
            "modelpool.tasks=[]",
            "logger=none",
            f"hydra.run.dir={tmp_path}/a",
        ],
        capsys,
    )
    assert code == 2 and "no fine-tuned expert" in err
    code, out, err = run_cli(
        [
            *args,
            "modelpool.finetuned={}",
            "modelpool.tasks=[]",
            "method=pretrained",
            "logger=none",
            "fast_dev_run=true",
            f"hydra.run.dir={tmp_path}/b",
        ],
        capsys,
    )
    assert code == 0, err
