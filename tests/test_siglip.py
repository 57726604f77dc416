"""Our SigLIP ViT and preprocessing against transformers' SigLIP on checkpoints in the official format."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from conftest import randomize
from nanovlm.siglip import SiglipViT, preprocess_image

VISION = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, layer_norm_eps=1e-6)


def vision_reference(tmp_path, full=False):
    torch.manual_seed(0)
    if full:  # a SiglipModel checkpoint: vision_model.* plus a text tower, logit_scale, logit_bias
        text = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=text, attn_implementation="eager"))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**VISION, attn_implementation="eager"))
    randomize(model, std=0.1).eval().save_pretrained(tmp_path)
    return model.vision_model if full else model


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_fp32_parity(tmp_path, full, backend):
    ref = vision_reference(tmp_path, full)
    ours = SiglipViT.from_pretrained(tmp_path, attn_backend=backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(pixel_values=x).last_hidden_state).abs().max() <= 1e-5


def test_position_interpolation_matches(tmp_path):
    ref = vision_reference(tmp_path)
    ours = SiglipViT.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 48, 40)  # a 6 x 5 grid instead of the trained 4 x 4
    with torch.no_grad():
        want = ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert (ours(x) - want).abs().max() <= 1e-5


def test_bf16_parity(tmp_path):
    vision_reference(tmp_path)
    ref = SiglipVisionModel.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = SiglipViT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x).float(), ref(pixel_values=x.bfloat16()).last_hidden_state.float()
    assert (a - b).abs().max() / b.abs().max() < 2e-2


def test_round_trip_through_transformers(tmp_path):
    ref = vision_reference(tmp_path / "ref")
    SiglipViT.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "ours")
    back = SiglipVisionModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (back(pixel_values=x).last_hidden_state - ref(pixel_values=x).last_hidden_state).abs().max() <= 1e-5


def real_looking_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:410]
    photo = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, (xx + yy) % 256], -1)       # smooth gradients
    photo = np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8)    # plus sensor noise
    yield Image.fromarray(photo)                                                        # 410 x 300 RGB
    yield Image.fromarray(photo[:90, :50]).convert("L")                                 # small, grayscale
    rgba = np.concatenate([photo[:224, :224], rng.integers(0, 256, (224, 224, 1), dtype=np.uint8)], -1)
    yield Image.fromarray(rgba, "RGBA")                                                 # with alpha
    yield Image.fromarray(photo).convert("P")                                           # palette


def test_preprocessing_matches_siglip_image_processor():
    from transformers import SiglipImageProcessor
    proc = SiglipImageProcessor(size={"height": 224, "width": 224})
    for image in real_looking_images():
        want = proc(images=image, return_tensors="pt")["pixel_values"][0]
        got = preprocess_image(image, 224)
        assert got.shape == want.shape == (3, 224, 224)
        assert (got - want).abs().max() <= 1e-6
