"""Both pool families load their real checkpoint formats into one canonical layout."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
from fusion_bench.modelpool.open_clip import OpenCLIPModelPool
from fusion_bench.testing import assert_state_dict_close


def test_hf_transformers4_and_5_layouts_load_the_same(hf_pool_files, tmp_path):
    expert_dir = hf_pool_files["experts"]["mnist"]
    flat = load_file(f"{expert_dir}/model.safetensors")
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    # transformers-4 CLIPVisionModel: `vision_model.` prefix and a saved position_ids buffer
    legacy = {f"vision_model.{k}": v for k, v in flat.items()}
    legacy["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    save_file(legacy, legacy_dir / "model.safetensors")
    (legacy_dir / "config.json").write_text(open(f"{expert_dir}/config.json").read())
    pool = CLIPVisionModelPool(
        hf_pool_files["pretrained"], {"new": expert_dir, "old": str(legacy_dir)}
    )
    assert_state_dict_close(dict(pool.expert("old")), dict(pool.expert("new")))
    # the pretrained full CLIPModel maps onto the same keys
    assert set(pool.pretrained()) == set(pool.expert("new"))


def test_hf_pytorch_bin_experts(hf_pool_files, tmp_path):
    expert_dir = hf_pool_files["experts"]["eurosat"]
    state = load_file(f"{expert_dir}/model.safetensors")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text(open(f"{expert_dir}/config.json").read())
    pool = CLIPVisionModelPool(hf_pool_files["pretrained"], {"bin": str(bin_dir)})
    assert_state_dict_close(dict(pool.expert("bin")), state)


def test_open_clip_expert_layouts(open_clip_pool_files, tmp_path):
    f = open_clip_pool_files
    canonical = load_file(f["experts"]["mnist"])
    # task_vectors' ImageEncoder state dict: `model.visual.*` plus text-tower keys
    full = load_file(f["pretrained"])
    tv_layout = {f"model.{k}": v for k, v in full.items() if not k.startswith("visual.")}
    tv_layout.update({f"model.visual.{k}": v for k, v in canonical.items()})
    torch.save(tv_layout, tmp_path / "tv.pt")
    pool = OpenCLIPModelPool(
        f["model_name"],
        f["pretrained"],
        {"a": f["experts"]["mnist"], "b": str(tmp_path / "tv.pt")},
        model_config=f["config"],
    )
    assert_state_dict_close(dict(pool.expert("b")), dict(pool.expert("a")))
    assert set(pool.pretrained()) == set(canonical)


def test_save_and_reload_open_clip(open_clip_pool_files, tmp_path):
    f = open_clip_pool_files
    pool = OpenCLIPModelPool(
        f["model_name"], f["pretrained"], f["experts"], model_config=f["config"]
    )
    state = dict(pool.expert("mnist"))
    pool.save(state, tmp_path, card="# card")
    reloaded = OpenCLIPModelPool(
        f["model_name"],
        f["pretrained"],
        {"m": str(tmp_path / "model.safetensors")},
        model_config=f["config"],
    )
    assert_state_dict_close(dict(reloaded.expert("m")), state)
    encoder = pool.build_encoder(state)
    assert encoder(torch.zeros(1, 3, 16, 16)).shape == (1, 16)


def test_hf_encoder_matches_from_pretrained(hf_pool_files):
    from transformers import CLIPVisionModel

    pool = CLIPVisionModelPool(hf_pool_files["pretrained"], hf_pool_files["experts"])
    ours = pool.build_encoder(pool.expert("mnist"))  # meta device + assign, no random init
    reference = CLIPVisionModel.from_pretrained(hf_pool_files["experts"]["mnist"]).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values=images).pooler_output, reference(pixel_values=images).pooler_output
        )
