"""Draw the lessons' figures into lessons/figures/ (small palette PNGs), on the CPU, in a few seconds.

    python lessons/make_figures.py                    # rewrite lessons/figures/*.png
    python lessons/make_figures.py --out-dir /tmp/f   # somewhere else (tests/test_lessons.py does this)
    python lessons/make_figures.py --only grpo_toy    # one figure

Everything is deterministic (fixed seeds, one thread). A figure that shows a training run does not train
anything itself: it runs the lesson's own python blocks (run_lesson) and plots the history they recorded, so
the picture is exactly what a reader who runs the lesson gets.
"""

import argparse
import io
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent
BLOCK_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text):
    return [m.group(1) for m in BLOCK_RE.finditer(text)]


def run_lesson(path, workdir):
    """Run every ```python block of a lesson, in order, in one fresh namespace with `workdir` as the working
    directory; return the namespace. A failing block raises, naming the lesson and the block."""
    path = Path(path)
    blocks = python_blocks(path.read_text())
    namespace = {"__name__": f"lesson_{path.stem}"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for i, src in enumerate(blocks, start=1):
            try:
                exec(compile(src, f"{path.name}:block{i}", "exec"), namespace)
            except Exception as e:
                raise RuntimeError(f"{path.name}, python block {i} failed: {type(e).__name__}: {e}\n"
                                   f"--- block {i} ---\n{src}") from e
    finally:
        os.chdir(cwd)
    return namespace


def lesson(stem):
    """The namespace of lessons/<stem>.md after running it (in a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run_lesson(LESSONS / f"{stem}.md", tmp)


# ---------------------------------------------------------------------------------------------------------------
# Figures: one function each, returning a matplotlib figure.

def attention_masks(plt):
    """Lesson 1: the masks attention() applies, read off its weights (zero q and k, identity values)."""
    from nanovlm.attention import KVCache, Packing, attention

    def weights(T, **kw):
        zeros = torch.zeros(1, T, 1, 4)
        return attention(zeros, zeros, torch.eye(T)[None, :, None, :], backend="math", **kw)[0, :, 0]

    T = 8
    left_padded = Packing.from_mask(torch.tensor([[0] * 3 + [1] * 5]))
    packed = Packing.from_mask(torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]]))
    cache = KVCache(n_layers=1, batch_size=1, max_len=T, n_kv_heads=1, head_dim=4)
    cache.advance(6)                                             # 6 tokens already cached, 2 new ones
    cache.begin(2)
    panels = [("causal", weights(T, causal=True) > 0, "query t sees keys 0..t"),
              ("causal + padding (3 pads, left)", weights(T, causal=True, packing=left_padded) > 0,
               "the padding is a run of its own"),
              ("packed: samples 1 1 1 2 2 2 2 0", weights(T, causal=True, packing=packed) > 0,
               "block-diagonal: samples apart"),
              ("KV cache: 6 cached, 2 new", cache.visible[0], "bottom-right aligned")]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    for ax, (title, mask, note) in zip(axes, panels):
        ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1.25, aspect="equal")
        ax.set_title(f"{title}\n{note}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_xticks(range(mask.shape[1]))
        ax.set_yticks(range(mask.shape[0]))
        ax.set_xticks([x - 0.5 for x in range(1, mask.shape[1])], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, mask.shape[0])], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(labelsize=7, which="both", length=0)
    axes[0].set_ylabel("query position", fontsize=8)
    axes[3].set_yticklabels(["6", "7"])
    fig.tight_layout()
    return fig


def rope_angles(plt):
    """Lesson 2: cos(m theta_i) per plane and position, and the score of one q, k pair against the offset."""
    from nanovlm.qwen2 import apply_rope, rope_cos_sin
    D, base, T = 64, 10000.0, 128
    cos, _ = rope_cos_sin(torch.arange(T)[None], D, base, torch.float32)          # (1, T, D)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.35, 1]})
    im = a.imshow(cos[0, :, :D // 2].T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    a.set_xlabel("position m")
    a.set_ylabel("plane i (frequency base^(-2i/D))")
    a.set_title(f"cos(m * theta_i), D = {D}, base = {base:g}")
    fig.colorbar(im, ax=a, fraction=0.04)

    def at(x, pos):
        c, s = rope_cos_sin(torch.tensor([[pos]]), D, base, torch.float32)
        return apply_rope(x.view(1, 1, 1, D), c, s).view(D)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(D, generator=g)
    k = q + 0.5 * torch.randn(D, generator=g)                    # a key similar to the query
    offsets = list(range(0, 64))
    for m, style in ((0, "-"), (40, "--")):
        b.plot(offsets, [float(at(q, m) @ at(k, m + d)) for d in offsets], style, label=f"query at m = {m}")
    b.set_xlabel("offset n - m")
    b.set_ylabel("<R(m) q, R(n) k>")
    b.set_title("one q, k pair: the score depends on n - m only")
    b.legend(frameon=False)
    fig.tight_layout()
    return fig


def vlm_shapes(plt):
    """Lesson 4: one synthetic scene from pixels to the LM's input sequence, shapes read off the real modules."""
    import random
    from matplotlib.patches import Rectangle
    from nanovlm.projector import Projector, ProjectorConfig, pixel_shuffle
    from nanovlm.siglip import SiglipConfig, SiglipViT, preprocess_image
    from nanovlm.synthetic import random_scene

    size, patch, f, width = 96, 16, 2, 128                       # the tiny preset's image, patch and widths
    image, _ = random_scene(random.Random(3), size)
    vit = SiglipViT(SiglipConfig(image_size=size, patch_size=patch, hidden_size=width, intermediate_size=4 * width,
                                 num_hidden_layers=1, num_attention_heads=4))
    projector = Projector(ProjectorConfig(vision_hidden=width, lm_hidden=width, shuffle_factor=f))
    with torch.no_grad():
        states = vit(preprocess_image(image, size)[None])         # (1, 36, 128)
        shuffled = pixel_shuffle(states, f)                       # (1, 9, 512)
        tokens = projector(states)                                # (1, 9, 128)
    side, g = size // patch, size // patch // f
    colours = plt.get_cmap("tab10")

    def block_of(i):                                              # patch i (raster order) -> its 2x2 block
        return (i // side) // f * g + (i % side) // f

    fig = plt.figure(figsize=(12, 4.4))
    grid = fig.add_gridspec(2, 4, height_ratios=[3.2, 0.9], hspace=0.15, wspace=0.25)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image)
    for k in range(1, side):
        ax.axhline(k * patch - 0.5, color="0.5", lw=0.6)
        ax.axvline(k * patch - 0.5, color="0.5", lw=0.6)
    ax.set_title(f"image 3 x {size} x {size}\n{side} x {side} patches of {patch} x {patch}")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)

    def draw_grid(ax, n, label_of, colour_of, title):
        for i in range(n * n):
            r, c = divmod(i, n)
            ax.add_patch(Rectangle((c, n - 1 - r), 0.94, 0.94, color=colours(colour_of(i)), alpha=0.35))
            ax.text(c + 0.47, n - 1 - r + 0.47, label_of(i), ha="center", va="center", fontsize=7 if n > 4 else 8)
        ax.set_xlim(0, n)
        ax.set_ylim(0, n)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title)

    draw_grid(fig.add_subplot(grid[0, 1]), side, str, block_of,
              f"ViT: {tuple(states.shape[1:])}\none token per patch")
    members = {b: [i for i in range(side * side) if block_of(i) == b] for b in range(g * g)}
    draw_grid(fig.add_subplot(grid[0, 2]), g, lambda b: "{} {}\n{} {}".format(*members[b]), lambda b: b,
              f"pixel shuffle f={f}: {tuple(shuffled.shape[1:])}\n4 neighbours side by side")
    draw_grid(fig.add_subplot(grid[0, 3]), g, lambda b: f"img {b}", lambda b: b,
              f"projector MLP: {tuple(tokens.shape[1:])}\nthe LM's width")

    ax = fig.add_subplot(grid[1, :])
    seq = (["<|im_start|>", "user", "\\n", "<|vision_start|>"] + [f"pad {b}" for b in range(g * g)]
           + ["<|vision_end|>", "\\n", "What", " colour", " ...", "<|im_end|>"])
    x = 0.0
    for tok in seq:
        w = 0.55 + 0.085 * len(tok)
        is_img = tok.startswith("pad")
        ax.add_patch(Rectangle((x, 0), w - 0.08, 1, color=colours(int(tok[4:])) if is_img else "0.85",
                               alpha=0.35 if is_img else 1.0))
        ax.text(x + (w - 0.08) / 2, 0.5, tok, ha="center", va="center", fontsize=7)
        x += w
    ax.set_xlim(0, x)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    ax.set_title(f"the LM's input: {g * g} image-pad slots, their embeddings overwritten by the {g * g} projected "
                 f"tokens, in order   (SigLIP-224: 196 x 768 -> 49 x 3072 -> 49 x 896)", fontsize=9)
    return fig


def overfit_one_batch(plt):
    """Lesson 6: the loss of the lesson's own run, memorising one batch of the tiny VLM."""
    ns = lesson("06_cross_entropy")
    losses, shuffled = ns["losses"], ns["shuffled"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.semilogy(range(len(losses)), losses, label="training loss (one batch of 8, AdamW lr 1e-2)")
    ax.axhline(math.log(64), color="0.5", ls="--", lw=1, label="log V = log 64: uniform guessing")
    ax.scatter([len(losses) - 1], [shuffled], color="C3", zorder=3, label="after training, images shuffled")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("The tiny VLM memorises one batch, reading the answers from the images")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def lr_schedule(plt):
    """Lesson 7: train_utils.lr_at, linear warmup then cosine, to a floor of 10% and to 0."""
    from nanovlm.train_utils import lr_at
    T, w, base = 1000, 50, 1.0
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    for floor, style in ((0.1, "-"), (0.0, "--")):
        ax.plot(range(T + 1), [lr_at(t, T, base, w, floor) for t in range(T + 1)], style,
                label=f"min_lr_ratio = {floor}")
    ax.axvline(w, color="0.7", lw=0.8)
    ax.text(w + 8, 0.05, f"end of warmup ({w} steps)", fontsize=8, color="0.4")
    ax.set_xlabel("step (of 1000)")
    ax.set_ylabel("lr / base lr")
    ax.set_title("lr_at: linear warmup, then a cosine down to the floor")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def newton_schulz(plt):
    """Lesson 8: the quintic p(s) of muon.py, and p applied five times to each normalised singular value."""
    from nanovlm.muon import NS_COEFFICIENTS
    a, b, c = NS_COEFFICIENTS
    p = lambda s: a * s + b * s ** 3 + c * s ** 5
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    s = torch.linspace(0, 1.2, 500, dtype=torch.float64)
    left.plot(s.numpy(), p(s).numpy(), label="p(s) = a s + b s^3 + c s^5")
    left.plot(s.numpy(), s.numpy(), color="0.6", ls=":", label="s")
    left.axhline(1, color="0.8", lw=0.8)
    left.scatter([1.0], [p(1.0)], color="C3", zorder=3)
    left.annotate(f"p(1) = {p(1.0):.3f}", (1.0, p(1.0)), xytext=(0.62, 0.35), fontsize=8,
                  arrowprops=dict(arrowstyle="->", color="0.4"))
    left.set_xlabel("singular value s (after dividing G by its Frobenius norm)")
    left.set_ylabel("after one step")
    left.set_title(f"one Newton-Schulz step: steep at 0 (slope {a}), not 1 at 1")
    left.legend(frameon=False, fontsize=8)
    grid = torch.logspace(-6, 0, 2000, dtype=torch.float64)
    after = grid.clone()
    for k in range(1, 6):
        after = p(after)
        if k in (1, 3, 5):
            right.semilogx(grid.numpy(), after.numpy(), label=f"{k} step{'s' if k > 1 else ''}", lw=1.8 if k == 5 else 1.0)
    right.axhspan(0.68, 1.21, color="C2", alpha=0.12, label="[0.68, 1.21]")
    right.axvline(1.5e-3, color="0.5", ls="--", lw=0.8)
    right.text(1.7e-3, 0.15, "1.5e-3", fontsize=8, color="0.35")
    right.set_xlabel("normalised singular value before (log scale)")
    right.set_ylabel("after k steps")
    right.set_title("five steps put every value above ~1.5e-3 in [0.68, 1.21]")
    right.legend(frameon=False, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def sampling(plt):
    """Lesson 10: the lesson's logits under each knob, and informative GRPO groups against the temperature."""
    ns = lesson("10_sampling")
    z, kept, answers, right = ns["z"], ns["kept_distribution"], ns["answers"], ns["right"]
    fig, (left, rt) = plt.subplots(1, 2, figsize=(11, 3.4))
    variants = [("T = 1", kept(z)), ("T = 0.5", kept(z, temperature=0.5)), ("T = 2", kept(z, temperature=2.0)),
                ("top-k 3", kept(z, top_k=3)), ("top-p 0.8", kept(z, top_p=0.8))]
    width = 0.16
    for j, (label, probs) in enumerate(variants):
        left.bar((torch.arange(len(z)) + (j - 2) * width).numpy(), probs.numpy(), width, label=label)
    left.set_xticks(range(len(z)))
    left.set_xticklabels([f"tok {i}\nz={v:g}" for i, v in enumerate(z.tolist())], fontsize=8)
    left.set_ylabel("probability")
    left.set_title("one next-token distribution, five ways to sample it")
    left.legend(frameon=False, fontsize=8)
    temps = torch.logspace(-1.5, 1, 200)
    for G in (4, 8, 16):
        p = torch.stack([(answers / T).softmax(-1)[right] for T in temps])
        rt.semilogx(temps.numpy(), (1 - p ** G - (1 - p) ** G).numpy(), label=f"G = {G}")
    rt.axvline(1.0, color="0.7", lw=0.8)
    rt.set_xlabel("sampling temperature T")
    rt.set_ylabel("P(group not flat)")
    rt.set_title("right answer = the model's 2nd choice: groups teach only when sampled warm")
    rt.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def grpo_toy(plt):
    """Lesson 11: the lesson's toy runs (grpo vs dr_grpo): reward, KL, entropy, clip fraction, lengths."""
    ns = lesson("11_grpo")
    runs = {k: v[0] for k, v in ns["runs"].items()}
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.1))
    panels = [("reward", "mean reward of the samples"), ("kl", "KL(pi || start)"),
              ("entropy", "policy entropy (nats)"), ("clip", "clipped fraction of tokens")]
    for ax, (key, title) in zip(axes, panels):
        for (loss_type, hist), colour in zip(runs.items(), ("C0", "C1")):
            ax.plot(hist[key], color=colour, label=loss_type, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    ax = axes[4]
    for (loss_type, hist), colour in zip(runs.items(), ("C0", "C1")):
        ax.plot(hist["len_right"], color=colour, label=f"{loss_type}: right answers")
        ax.plot(hist["len_wrong"], color=colour, ls="--", label=f"{loss_type}: wrong answers")
    ax.set_title("expected length (tokens)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(frameon=False, fontsize=7)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def flat_groups(plt):
    """Lesson 11: P(flat group) = p^G + (1-p)^G, with groups sampled and counted by frac_zero_std_groups."""
    from nanovlm.grpo import frac_zero_std_groups
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    p = torch.linspace(0, 1, 201, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for G, colour in ((4, "C0"), (8, "C1"), (16, "C2")):
        ax.plot(p.numpy(), (p ** G + (1 - p) ** G).numpy(), color=colour, label=f"G = {G}")
        qs = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
        sampled = [frac_zero_std_groups((torch.rand(4000 * G, generator=g) < q).float(), G) for q in qs]
        ax.scatter(qs, sampled, color=colour, s=12, zorder=3)
    ax.set_xlabel("p = probability that a sampled answer is right")
    ax.set_ylabel("P(flat group): no signal")
    ax.set_title("p^G + (1-p)^G; dots: 4000 sampled groups each")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


FIGURES = {
    "attention_masks": attention_masks,
    "rope_angles": rope_angles,
    "vlm_shapes": vlm_shapes,
    "overfit_one_batch": overfit_one_batch,
    "lr_schedule": lr_schedule,
    "newton_schulz": newton_schulz,
    "sampling": sampling,
    "grpo_toy": grpo_toy,
    "flat_groups": flat_groups,
}


def save_small_png(fig, path, colors=48):
    """Render at 100 dpi and store as a palette PNG: flat-colour plots lose nothing visible and shrink ~3x."""
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08, metadata={"Software": None})
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(LESSONS / "figures"), help="where the PNGs go")
    p.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or FIGURES:
        torch.manual_seed(0)
        fig = FIGURES[name](plt)
        save_small_png(fig, out / f"{name}.png")
        plt.close(fig)
        print(f"{out / name}.png  {(out / f'{name}.png').stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
