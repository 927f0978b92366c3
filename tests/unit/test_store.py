"""The model store: synthetic models, imports from a diffusers folder, listing, clear errors."""

import subprocess
import sys

import pytest

from sdxl_bento.errors import ModelMissing
from sdxl_bento.store import modelstore as store
from sdxl_bento.store.synth import build_pipelines, configs, sdxl_configs


def test_full_preset_has_sdxl_1_0_shapes():
    full = sdxl_configs()
    assert full["base_unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert full["base_unet"]["cross_attention_dim"] == 2048
    assert full["text_encoder_2"]["num_hidden_layers"] == 32
    assert configs("full") == full
    with pytest.raises(ValueError, match="tiny"):
        configs("medium")


def test_synth_saves_base_and_refiner_marked_synthetic(bentoml_home):
    rows = {r.metadata["role"]: r for r in store.list_models() if r.tag.startswith(("sdxl-base:", "sdxl-refiner:"))}
    assert set(rows) == {"base", "refiner"}
    for role, row in rows.items():
        assert row.synthetic and row.metadata["source"] == "synthetic:tiny"
        assert row.metadata["dtype"] == "float32" and row.metadata["diffusers_version"]
        assert (row.path / "model_index.json").is_file()
    assert store.resolve("sdxl-base:latest", "base").tag == rows["base"].tag


def test_import_from_a_local_diffusers_folder(bentoml_home, tmp_path):
    base, _ = build_pipelines("tiny", seed=3)
    base.save_pretrained(tmp_path / "folder")
    tag = store.import_pipeline(str(tmp_path / "folder"), "base", tag="my-folder-model", dtype="float32")
    stored = store.resolve(tag, "base")
    assert stored.metadata == {**stored.metadata, "role": "base", "source": str(tmp_path / "folder"),
                               "synthetic": False, "dtype": "float32"}
    from diffusers import StableDiffusionXLPipeline
    loaded = StableDiffusionXLPipeline.from_pretrained(str(stored.path))
    assert all((a == b).all() for a, b in zip(loaded.unet.parameters(), base.unet.parameters()))


def test_missing_model_names_the_command_that_fixes_it(bentoml_home):
    with pytest.raises(ModelMissing) as info:
        store.resolve("sdxl-nothing:latest", "base")
    assert "sdxl-bento models import stabilityai/stable-diffusion-xl-base-1.0 --role base --tag sdxl-nothing" in str(info.value)
    with pytest.raises(ModelMissing, match="imported as role 'base', not 'refiner'"):
        store.resolve("sdxl-base:latest", "refiner")


def test_bad_sources_get_clear_errors(bentoml_home, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"x")
    for source, message in [(str(tmp_path / "empty"), "no model_index.json"),
                            (str(tmp_path / "model.ckpt"), "must be a .safetensors file"),
                            ("./nowhere/at/all", "no such file or folder")]:
        with pytest.raises(ValueError, match=message):
            store.load_source(source, "base")
    from sdxl_bento.store.loras import import_lora

    with pytest.raises(ValueError, match="no such file or folder, and not a Hugging Face repo id"):
        import_lora("./nowhere/lora.safetensors", "nowhere")
    with pytest.raises(ValueError, match="no such file or folder, and not a Hugging Face repo id"):
        store.import_checker(str(tmp_path / "missing"), "classifier")


def test_cli_lists_models(bentoml_home):
    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "list"], check=True,
                         capture_output=True, text=True).stdout
    assert "sdxl-base:" in out and "sdxl-refiner:" in out and "synthetic:tiny" in out


def test_import_a_single_file_checkpoint_with_the_cli(bentoml_home, tmp_path):
    """A community-style single .safetensors file (made from the tiny model) imported offline with --config."""
    import numpy as np
    import torch

    from sdxl_bento.gpu.engine import BatchKey, Engine, Work
    from sdxl_bento.store.checkpoint import save_single_file

    original, _ = build_pipelines("tiny", seed=5)
    checkpoint = save_single_file(original, tmp_path / "community.safetensors")
    config_pipe, _ = build_pipelines("tiny", seed=6)  # same architecture, other weights: configs only matter
    config_pipe.save_pretrained(tmp_path / "config")
    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "import", str(checkpoint), "--role", "base",
                          "--tag", "community", "--dtype", "float32", "--config", str(tmp_path / "config")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    stored = store.resolve("community:latest", "base")
    assert stored.metadata["source"] == str(checkpoint) and not stored.synthetic
    engine = Engine(stored, device="cpu")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for a, b in zip(getattr(engine.models.base, name).state_dict().values(),
                        getattr(original, name).state_dict().values()):
            assert torch.equal(a, b), name
    key = BatchKey(kind="txt2img", width=256, height=256, steps=2, guidance_scale=5.0, scheduler="euler")
    (image,), = engine.generate([Work(key, "a cat", "", [1])])
    want = original(prompt="a cat", width=256, height=256, num_inference_steps=2, guidance_scale=5.0,
                    generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))
