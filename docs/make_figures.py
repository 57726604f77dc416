"""Draw README's figure from a trained checkpoint: held-out scenes with a question and the model's answer, beside
the run's loss curve. Written as a small palette PNG into docs/figures/.

    python train_sft.py                          # the quickstart run: out/sft
    python docs/make_figures.py                  # -> docs/figures/quickstart.png
    python docs/make_figures.py --ckpt out/sft --data data/synthetic/sft_val.json --out docs/figures/quickstart.png

The answers are the model's greedy answers, computed here (nanovlm.evaluate, as sample.py --eval does); the loss
curve is the run's own metrics.jsonl. Nothing is typed in by hand.
"""

import argparse
import io
import json
from pathlib import Path

import torch
from PIL import Image

from nanovlm.data import load_data
from nanovlm.evaluate import evaluate_answers
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM


def draw(ckpt, data, out, n=4, seed=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    torch.manual_seed(seed)
    model, tok = VLM.from_pretrained(ckpt).eval(), Tokenizer.from_dir(ckpt)
    samples = [s for s in load_data(data) if s["images"] and s.get("qtype") != "text"][:n]
    records = []
    evaluate_answers(model, tok, samples, records=records)
    answers = [r["prediction"] for r in records]
    rows = [json.loads(line) for line in (Path(ckpt) / "metrics.jsonl").read_text().splitlines() if line.strip()]

    fig = plt.figure(figsize=(11, 3.2))
    grid = fig.add_gridspec(1, n + 2, width_ratios=[1] * n + [0.15, 2.2])
    for k, (s, answer) in enumerate(zip(samples, answers)):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(Image.open(s["images"][0]).convert("RGB"), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        question = s["messages"][-2]["content"].replace("<image>", "").strip()
        reference = s["messages"][-1]["content"].strip()
        verdict = "right" if answer == reference else f"wrong: {reference}"
        ax.set_title(_wrap(question, 22), fontsize=8)
        ax.set_xlabel(f"{answer!r}\n({verdict})", fontsize=8, color="green" if answer == reference else "red")
    ax = fig.add_subplot(grid[0, n + 1])
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training and validation loss", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_small_png(fig, out)
    plt.close(fig)
    return answers


def _wrap(text, width):
    words, lines = text.split(), [""]
    for w in words:
        if len(lines[-1]) + len(w) + 1 > width and lines[-1]:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    return "\n".join(lines)


def save_small_png(fig, path, colors=64):
    """Render at 100 dpi and store as a palette PNG: flat colours lose nothing visible and the file stays small."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                                  dither=Image.Dither.NONE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/sft", help="a VLM checkpoint with its metrics.jsonl (a training run's --out-dir)")
    p.add_argument("--data", default="data/synthetic/sft_val.json", help="held-out questions to show")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures" / "quickstart.png"))
    p.add_argument("--n", type=int, default=4, help="scenes to show")
    args = p.parse_args(argv)
    answers = draw(args.ckpt, args.data, args.out, args.n)
    print(f"wrote {args.out} (answers: {answers})")


if __name__ == "__main__":
    main()
