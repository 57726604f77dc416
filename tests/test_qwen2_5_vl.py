"""Qwen2.5-VL against transformers: the image processor, the vision tower's windows and 2-D positions, MRoPE
positions, logits, loss, greedy generation, and checkpoints both ways (tiny random models written by
transformers' save_pretrained in the official layout)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from conftest import randomize
from nanovlm.lora import apply_lora, merge_lora
from nanovlm.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, preprocess_images, smart_resize
from nanovlm.qwen2_5_vl_vision import patch_positions, window_order

IMG, VIDEO, VS, VE, PAD = 90, 91, 92, 93, 0   # token ids in the tiny vocabulary
VOCAB = 96


def hf_config(tied):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    # 3 blocks, the middle one full attention; 14-pixel patches and 112-pixel windows as in the real models.
    vision = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=112)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VIDEO,
                            vision_start_token_id=VS, vision_end_token_id=VE, tie_word_embeddings=tied,
                            attn_implementation="eager")


@pytest.fixture(scope="module", params=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    """(directory written by transformers, the transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    ref = randomize(Qwen2_5_VLForConditionalGeneration(hf_config(request.param == "tied")), std=0.1).eval()
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied1")
    torch.manual_seed(1)
    ref = randomize(Qwen2_5_VLForConditionalGeneration(hf_config(True)), std=0.1, seed=1).eval()
    ref.save_pretrained(path)
    return path, ref


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


# Images (w x h): 84x140 -> 6x10 patches -> 3x5 LM tokens -> two windows of up to 4x4 tokens, the second cut
# short (padded); 90x60 -> 84x56 pixels, 6x4 patches, 3x2 tokens, one window; 30x30 -> grown to 56x56.
IMAGES = [random_image(84, 140, seed=1), random_image(90, 60, seed=2), random_image(30, 30, seed=3)]


def prompt(n_tokens, *texts):
    """texts[0] <image 0> texts[1] <image 1> ... as token ids, each image as vision_start + pads + vision_end."""
    ids = list(texts[0])
    for n, text in zip(n_tokens, texts[1:]):
        ids += [VS] + [IMG] * n + [VE] + list(text)
    return ids


def batch(rows, left=True):
    """Pad rows to one length (left padding, as transformers' generate wants). -> ids, attention_mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r), 1
    return ids, mask


def reference_logits(ref, ids, pixel_values=None, grid=None, mask=None, **kw):
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                   mm_token_type_ids=(ids == IMG).int(), **kw)


def mixed_batch(model):
    """Row 0: two images (one with padded windows); row 1: one image, shorter (padded); row 2: text only."""
    pv, grid = preprocess_images([IMAGES[0], IMAGES[2], IMAGES[1]])
    n = model.image_tokens(grid)
    rows = [prompt(n[:2], [5, 6], [7, 8], [9, 10, 11]), prompt(n[2:], [12], [13, 14]), [15, 16, 17, 18, 19]]
    return pv, grid, rows


# ---- the image processor ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,mode,limits", [
    ((37, 53), "RGB", {}),                                 # odd sizes
    ((5, 7), "RGB", {}),                                   # tiny: grown to min_pixels
    ((600, 30), "RGB", {}),                                # wide
    ((30, 450), "RGBA", {}),                               # tall, transparency over white
    ((1000, 900), "L", {}),                                # over max_pixels, grey
    ((300, 200), "RGB", {"min_pixels": 200 * 200}),        # min limit
    ((300, 200), "RGB", {"max_pixels": 100 * 100}),        # max limit
    ((841, 233), "RGB", {"min_pixels": 28 * 28, "max_pixels": 64 * 28 * 28}),
])
def test_processor_equals_transformers(size, mode, limits):
    images = [random_image(*size, mode=mode), random_image(size[1], size[0], seed=1)]
    ref = Qwen2VLImageProcessorPil(**limits)(images, return_tensors="pt")
    pixel_values, grid = preprocess_images(images, **limits)
    assert pixel_values.dtype == torch.float32 and pixel_values.shape[1] == 3 * 2 * 14 * 14
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.equal(pixel_values, ref["pixel_values"])


def test_processor_palette_image_with_transparency():
    img = random_image(40, 30).convert("P")
    img.info["transparency"] = 0
    ref = Qwen2VLImageProcessorPil()([img], return_tensors="pt")
    assert torch.equal(preprocess_images([img])[0], ref["pixel_values"])


def test_smart_resize_equals_transformers():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 100)) * 28 * 28
        hi = lo + int(rng.integers(0, 2000)) * 28 * 28
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


# ---- the vision tower's bookkeeping -------------------------------------------------------------------------

GRIDS = torch.tensor([[1, 18, 10], [1, 4, 6], [1, 16, 16], [2, 10, 22], [1, 2, 2]])


def test_window_order_and_patch_positions_equal_transformers():
    index, cu = get_vision_window_index(GRIDS, spatial_merge_size=2, window_size=112, patch_size=14)
    order, lengths = window_order(GRIDS, merge=2, window=4)
    assert torch.equal(order, index)
    assert torch.equal(torch.cat([torch.zeros(1), (lengths * 4).cumsum(0)]).int(), cu)
    assert torch.equal(patch_positions(GRIDS, 2), get_vision_position_ids(GRIDS, 2))


def test_vision_tower_and_merger_equal_transformers(checkpoint):
    path, ref = checkpoint
    ours = Qwen25VL.from_pretrained(path)
    pv, grid = preprocess_images(IMAGES)
    with torch.no_grad():
        theirs = ref.model.visual(pv, grid_thw=grid).pooler_output                        # (tokens, 64)
        mine = ours.image_features(pv, grid)
    assert mine.shape == theirs.shape == (sum(ours.image_tokens(grid)), 64)
    assert (mine - theirs).abs().max() <= 1e-5


# ---- the language side: MRoPE, logits, loss ---------------------------------------------------------------------

def test_mrope_positions_equal_get_rope_index(checkpoint):
    path, ref = checkpoint
    ours = Qwen25VL.from_pretrained(path)
    pv, grid, rows = mixed_batch(ours)
    ids, mask = batch(rows)
    theirs, their_deltas = ref.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grid, attention_mask=mask)
    mine, deltas = ours.positions(ids, grid, mask)
    assert torch.equal(mine, theirs)
    assert torch.equal(deltas, their_deltas[:, 0])
    # By hand, row 1 (left-padded): 12, vision_start, a 2x3-token image, vision_end, 13, 14. The image starts at
    # position 2: its token (row i, col j) is at (2, 2 + i, 2 + j); the text goes on at 2 + max(2, 3) = 5.
    real = mine[:, 1, mask[1].bool()]
    assert real[:, :2].tolist() == [[0, 1]] * 3                                      # 12, vision_start
    assert real[:, 2].tolist() == [2, 2, 2] and real[:, 2 + 5].tolist() == [2, 3, 4]  # image tokens (0,0), (1,2)
    assert real[:, -3:].tolist() == [[5, 6, 7]] * 3                                  # vision_end, 13, 14
    assert deltas[1] == 8 - 11                                                       # next position - length


def test_logits_equal_transformers(checkpoint):
    """Tied and untied; a row with two images (padded windows, a full-attention block), a padded row, a
    text-only row."""
    path, ref = checkpoint
    ours = Qwen25VL.from_pretrained(path)
    assert (ours.lm.lm_head is None) == ref.config.tie_word_embeddings
    pv, grid, rows = mixed_batch(ours)
    ids, mask = batch(rows)
    theirs = reference_logits(ref, ids, pv, grid, mask).logits
    with torch.no_grad():
        mine = ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask)
    assert mine.shape == (3, ids.shape[1], VOCAB)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5
    # Each row alone, unpadded, gives the same logits: padding changes nothing.
    with torch.no_grad():
        alone = ours(torch.tensor([rows[1]]), pixel_values=pv[grid[:2].prod(-1).sum():], image_grid_thw=grid[2:])
    assert (alone[0] - mine[1, real[1]]).abs().max() <= 1e-5
    # A batch with no image at all (no pixel_values): MRoPE is plain RoPE.
    ids, mask = batch([rows[2], rows[2][:3]], left=False)
    with torch.no_grad():
        text = ours(ids, attention_mask=mask)
        theirs = ref(input_ids=ids, attention_mask=mask).logits
    assert (text[mask.bool()] - theirs[mask.bool()]).abs().max() <= 1e-5


def test_bf16_close_to_transformers(tied):
    path, _ = tied
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    ours = Qwen25VL.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.vision.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    pv, grid, rows = mixed_batch(ours)
    ids, mask = batch(rows)
    with torch.no_grad():
        mine = ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask)[mask.bool()].float()
    theirs = reference_logits(ref.eval(), ids, pv, grid, mask).logits[mask.bool()].float()
    assert (mine - theirs).abs().max() / theirs.abs().max() < 2e-2      # bf16 keeps 8 bits of mantissa
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_loss_equals_transformers(tied):
    path, ref = tied
    ours = Qwen25VL.from_pretrained(path)
    pv, grid, rows = mixed_batch(ours)
    ids, mask = batch(rows, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100                                           # the prompts are not trained
    theirs = reference_logits(ref, ids, pv, grid, mask, labels=labels).loss
    out = ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask, labels=labels)
    assert out["n_tokens"] == int((labels[:, 1:] != -100).sum())
    assert abs(out["loss"].item() - theirs.item()) <= 1e-5


def test_packed_row_equals_samples_alone(tied):
    """Two samples with images packed in one row (attention_mask 1..1 2..2) compute what each does alone:
    positions restart per sample, attention stays inside it."""
    path, _ = tied
    ours = Qwen25VL.from_pretrained(path)
    pv, grid = preprocess_images(IMAGES[1:])
    n = ours.image_tokens(grid)
    a, b = prompt(n[:1], [5], [6, 7]), prompt(n[1:], [8, 9], [10])
    packed = torch.tensor([a + b])
    seg = torch.tensor([[1] * len(a) + [2] * len(b)])
    with torch.no_grad():
        both = ours(packed, pixel_values=pv, image_grid_thw=grid, attention_mask=seg)[0]
        first = ours(torch.tensor([a]), pixel_values=pv[:grid[0].prod()], image_grid_thw=grid[:1])[0]
        second = ours(torch.tensor([b]), pixel_values=pv[grid[0].prod():], image_grid_thw=grid[1:])[0]
    assert (both - torch.cat([first, second])).abs().max() <= 1e-5


# ---- generation ---------------------------------------------------------------------------------------------

def test_greedy_generation_equals_transformers(tied):
    path, ref = tied
    ours = Qwen25VL.from_pretrained(path)
    ours.cfg.stop_token_ids, ours.cfg.pad_token_id = (1,), PAD
    pv, grid = preprocess_images(IMAGES[:2])
    n = ours.image_tokens(grid)
    rows = [prompt(n[:1], [5, 6], [7]), prompt(n[1:], [8], [9, 10, 11, 12])]   # different lengths
    ids, mask = batch(rows)
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                              mm_token_type_ids=(ids == IMG).int(), max_new_tokens=12, do_sample=False,
                              eos_token_id=1, pad_token_id=PAD, suppress_tokens=[IMG])
    mine = ours.generate(rows, pv, image_grid_thw=grid, max_new_tokens=12)
    for b, row in enumerate(theirs[:, ids.shape[1]:].tolist()):
        expected = row[:row.index(1)] if 1 in row else row
        assert mine[b] == expected
    assert any(len(m) >= 8 for m in mine)            # long enough for positions to matter


# ---- checkpoints --------------------------------------------------------------------------------------------

def test_save_then_transformers_load_same_logits(checkpoint, tmp_path):
    """Tied: one file; untied: shards. transformers reads both, and so do we."""
    path, _ = checkpoint
    ours = Qwen25VL.from_pretrained(path)
    tied = ours.lm.lm_head is None
    ours.save_pretrained(tmp_path, max_shard_bytes=None if tied else 40_000)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"]["type"] == "mrope" and "text_config" not in saved     # the hub's flat form
    if tied:
        keys = set(load_file(tmp_path / "model.safetensors"))
        assert "visual.merger.mlp.0.weight" in keys and "model.layers.1.mlp.up_proj.weight" in keys
        assert "lm_head.weight" not in keys
    else:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
        assert "lm_head.weight" in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    pv, grid, rows = mixed_batch(ours)
    ids, mask = batch(rows)
    with torch.no_grad():
        mine = ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask)
    real = mask.bool()
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert (reference_logits(back, ids, pv, grid, mask).logits[real] - mine[real]).abs().max() <= 1e-5
    again = Qwen25VL.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask), mine)


def test_lora_merged_checkpoint_loads_in_transformers(tied, tmp_path):
    path, ref = tied
    model = Qwen25VL.from_pretrained(path)
    apply_lora(model, ["lm", "vision", "projector"], rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)   # B = 0 would make the merge trivial
    pv, grid, rows = mixed_batch(model)
    ids, mask = batch(rows)
    with torch.no_grad():
        adapted = model(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask)
    with pytest.raises(ValueError, match="merge them first"):
        model.save_pretrained(tmp_path)
    merge_lora(model).save_pretrained(tmp_path)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    real = mask.bool()
    theirs = reference_logits(back, ids, pv, grid, mask).logits
    assert (theirs[real] - adapted[real]).abs().max() <= 1e-5
    base = reference_logits(ref, ids, pv, grid, mask).logits
    assert (base[real] - adapted[real]).abs().max() > 1e-2       # the adapters did change the model


def test_reads_transformers_4_layout_and_nested_config(tied, tmp_path):
    """transformers 4.5x saved `model.language_model.*` / `model.visual.*` keys and a nested text_config with
    `rope_scaling`; the loader takes that too."""
    path, ref = tied
    tensors = load_file(path / "model.safetensors")
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.")
                else k): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["rope_scaling"] = dict(cfg["text_config"].pop("rope_parameters"), type="default")
    cfg["vision_config"]["in_chans"] = cfg["vision_config"].pop("in_channels")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = Qwen25VL.from_pretrained(tmp_path)
    pv, grid, rows = mixed_batch(ours)
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        assert (ours(ids, pixel_values=pv[:grid[:2].prod(-1).sum()], image_grid_thw=grid[:2])
                - reference_logits(ref, ids, pv[:grid[:2].prod(-1).sum()], grid[:2]).logits).abs().max() <= 1e-5


# ---- errors -------------------------------------------------------------------------------------------------

def test_checkpoint_errors_name_the_problem(tied, tmp_path):
    path, _ = tied
    tensors = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "visual.blocks.2.attn.qkv.bias"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \(1\): \['visual.blocks.2.attn.qkv.bias'\]"):
        Qwen25VL.from_pretrained(tmp_path)
    bad = dict(tensors, **{"visual.merger.mlp.2.weight": torch.zeros(64, 64)})
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): \['visual.merger.mlp.2.weight: file \(64, 64\)"):
        Qwen25VL.from_pretrained(tmp_path)
    save_file(dict(tensors, **{"visual.extra.weight": torch.zeros(1)}), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): \['visual.extra.weight'\]"):
        Qwen25VL.from_pretrained(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen2_vl")))
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl', not 'qwen2_5_vl'"):
        Qwen25VL.from_pretrained(tmp_path)


def test_image_token_count_errors(tied):
    path, _ = tied
    ours = Qwen25VL.from_pretrained(path)
    pv, grid = preprocess_images(IMAGES[1:])                        # 6 and 4 tokens
    ok = prompt([6, 4], [5], [6], [7])
    ours(torch.tensor([ok]), pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match=r"\[9\] image-pad tokens per row .* gives \[6, 4\] tokens per image"):
        ours(torch.tensor([prompt([5, 4], [5], [6], [7])]), pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="ends inside image 0"):    # 10 in all, but split 4 + 6
        ours(torch.tensor([prompt([4, 6], [5], [6], [7])]), pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="pixel_values has 30 patches but image_grid_thw"):
        ours(torch.tensor([ok]), pixel_values=pv[:30], image_grid_thw=grid)
    with pytest.raises(ValueError, match="together"):
        ours(torch.tensor([ok]), pixel_values=pv)


# ---- real shapes ----------------------------------------------------------------------------------------------

HUB_3B = {  # config.json of Qwen/Qwen2.5-VL-3B-Instruct (the flat hub form)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
HUB_7B = dict(HUB_3B, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
              vision_config=dict(HUB_3B["vision_config"], out_hidden_size=3584))


@pytest.mark.parametrize("hub", [HUB_3B, HUB_7B], ids=["3B", "7B"])
def test_real_shapes_equal_transformers(hub):
    """Every tensor of the real 3B / 7B, by hub name and shape, as transformers builds them (on the meta device)."""
    cfg = Qwen25VLConfig.from_hf(hub)
    with torch.device("meta"):
        ours = Qwen25VL(cfg)
        theirs = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hub))
    state = ours.state_dict()
    mine = {hub_name: tuple(state[k].shape) for k, hub_name in ours.hf_key_map().items()}
    hf = Qwen25VL.hub_layout({k: v for k, v in theirs.state_dict().items()})
    if hub["tie_word_embeddings"]:
        hf.pop("lm_head.weight")                        # transformers keeps the tied head as a second name
    assert mine == {k: tuple(v.shape) for k, v in hf.items()}
    assert cfg.lm.head_dim == 128 and cfg.mrope_section == (16, 24, 24)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in theirs.parameters())
    print(f"{hub['hidden_size']}: {n_params / 1e9:.3f}B parameters")
