"""Qwen2.5-VL's image processor: images at (almost) their own resolution, cut into 14x14 patches.

    pixel_values, grid_thw = preprocess_images([Image.open("a.jpg"), Image.open("b.png")])
    # pixel_values (sum of t*h*w, 3*2*14*14) float32; grid_thw (2, 3) = (t, h, w) per image in patches

SigLIP squashes every image to 224x224. Qwen2.5-VL keeps each image near its own size and aspect ratio:
`smart_resize` rounds height and width to multiples of 28 (one LM token covers 2x2 patches of 14 pixels) and
rescales, keeping the aspect ratio, only when the area falls outside [min_pixels, max_pixels]. An image of
h x w pixels (after resizing) becomes (h/14) * (w/14) patches and a quarter as many LM tokens, so a large
image costs more tokens than a small one: min/max_pixels are the knob between detail and sequence length.

Then, as transformers' Qwen2VLImageProcessor: bicubic resize, x / 255, the CLIP mean and std per channel,
and each image repeated to 2 frames (the patch embedding is a 3-D convolution over 2 frames x 14 x 14, made
for video; a still image is a video of two equal frames). The patches are flattened in the order the vision
tower wants them: 2x2 blocks of patches (the future LM tokens) row by row, and within a block its 4 patches
row by row, each patch as (channel, frame, row, column).

Output is equal to transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil,
bit for bit (tests/test_qwen2_5_vl.py).
"""

import math

import numpy as np
import torch
from PIL import Image

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """The (height, width) an image is resized to: multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as well as rounding allows."""
    if min(height, width) < 1:
        raise ValueError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"image of {width}x{height} pixels: aspect ratio {ratio:.0f} is over 200, which "
                         f"Qwen2.5-VL does not accept")
    h, w = round(height / factor) * factor, round(width / factor) * factor   # Python's round: half to even
    if h * w > max_pixels:      # shrink both sides by the same beta, rounding down so the area stays under
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:    # grow, rounding up so the area reaches min_pixels
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def image_grid(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2):
    """(t, h, w) in patches for an image of height x width pixels, without touching its pixels."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def to_rgb(image):
    """RGB, with transparent pixels shown over white (a plain convert("RGB") shows whatever colour they hide)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                      merge_size=2):
    """PIL images -> (pixel_values (sum t*h*w, 3*temporal_patch_size*patch_size**2) float32,
    image_grid_thw (n, 3) int64), the images' patches one after another."""
    if isinstance(images, Image.Image):
        images = [images]
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
    patches, grids = [], []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {i} is a {type(image).__name__}, not a PIL image")
        image = to_rgb(image)
        h, w = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
        image = image.resize((w, h), resample=Image.BICUBIC)
        # x / 255 in float64, then float32; the mean and std in float32: the reference's exact rounding.
        x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)        # (h, w, 3)
        x = ((x - mean) / std).transpose(2, 0, 1)                                        # (3, h, w)
        gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
        x = x.reshape(3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)                     # (gh/m, gw/m, m, m, 3, p, p): blocks, then patches
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))  # the frame, twice
        patches.append(x.reshape(gh * gw, 3 * temporal_patch_size * p * p))
        grids.append((1, gh, gw))
    if not patches:
        raise ValueError("preprocess_images got no images")
    return torch.from_numpy(np.concatenate(patches)), torch.tensor(grids, dtype=torch.long)


class Qwen25VLImages:
    """Images -> Qwen2.5-VL's inputs, as data.py, sampling and GRPO ask for them (the interface of
    siglip.SiglipImages): each image at its own size within [min_pixels, max_pixels], worth as many LM tokens as
    its size gives.

        images = Qwen25VLImages(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        images([pil_a, pil_b])           # {"pixel_values": (sum t*h*w, 1176), "image_grid_thw": (2, 3)}
        images.image_tokens("a.jpg")     # LM tokens for that image, from its header (size) alone

    Both tensors concatenate along dim 0 when samples are batched: the patch rows of each image, then the next
    image's, and one grid row per image, in reading order."""

    def __init__(self, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2,
                 temporal_patch_size=2):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
        self.kw = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size)
        self.temporal_patch_size = temporal_patch_size

    def image_tokens(self, path):
        with Image.open(path) as image:
            width, height = image.size
        t, h, w = image_grid(height, width, **self.kw)
        return t * h * w // self.kw["merge_size"] ** 2

    def __call__(self, images):
        if not images:   # a text-only sample: no patch rows, no grid rows
            return {"pixel_values": torch.zeros(0, 3 * self.temporal_patch_size * self.kw["patch_size"] ** 2),
                    "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
        pixel_values, grid = preprocess_images(images, temporal_patch_size=self.temporal_patch_size, **self.kw)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def __str__(self):
        lo, hi = self.kw["min_pixels"], self.kw["max_pixels"]
        unit = (self.kw["patch_size"] * self.kw["merge_size"]) ** 2
        return f"{-(-lo // unit)}-{hi // unit} tokens per image (min_pixels {lo}, max_pixels {hi})"
