"""Generate from a VLM checkpoint (train_sft.py, train_pretrain.py, train_grpo.py), the SigLIP VLM's or
Qwen2.5-VL's (a run's, or an official directory such as a local Qwen2.5-VL-3B-Instruct); GPT ones: sample_gpt.py.

    python sample.py --ckpt out/sft --image data/synthetic/images/val/000001.png --prompt "Where is the yellow triangle?"
    python sample.py --ckpt out/sft --image photo.jpg                          # chat about the image
    python sample.py --ckpt out/sft --eval data/synthetic/sft_val.json          # exact match + text accuracy
    python sample.py --ckpt out/sft --eval data/synthetic/sft_val.json --num-samples 8 --temperature 1  # + pass@8
    python sample.py --ckpt out/sft --eval data/synthetic/ocr_val.jsonl --max-new-tokens 48 --out preds.jsonl
    python sample.py --ckpt out/sft --image chart.png --prompt "What is the total?" --temperature 0.7 --top-p 0.9
"""

import argparse
import json

import torch

from nanovlm import train_utils as tu
from nanovlm.cli import run_cli


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Generate from a nanovlm checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="VLM: the weights' dtype for generation (auto: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: the smallest set with this probability")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 64; --eval: 32)")
    # VLM mode
    p.add_argument("--image", default=None, help="VLM: image file the prompt is about")
    p.add_argument("--prompt", default=None, help="VLM: the question (none: interactive chat)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="VLM: > 1 discourages repeats")
    p.add_argument("--eval", default=None, help="VLM: score answers on a dataset file (JSON/JSONL)")
    p.add_argument("--image-root", default=None, help="VLM: image paths in --eval are relative to this")
    p.add_argument("--limit", type=int, default=None, help="VLM: evaluate only the first N samples")
    p.add_argument("--show", type=int, default=5, help="VLM: print this many evaluated answers")
    p.add_argument("--out", default=None, help="VLM: with --eval, write one JSON line per sample (question, "
                   "reference, prediction, scores) to this file")
    p.add_argument("--num-samples", type=int, default=0, help="VLM: with --eval, also sample this many answers "
                   "per question at --temperature (> 0) and report pass@k and their mean exact score")
    return p.parse_args(argv)


def sample_vlm(args, device):
    """Answer --prompt about --image (streamed as it is generated), chat, or score a dataset (--eval)."""
    from nanovlm.data import load_data, load_images
    from nanovlm.evaluate import evaluate_answers, format_report
    from nanovlm.numeric import WithNumericHead, decode_numeric, split_numbers
    from nanovlm.tokenizer import IMAGE_TAG, Tokenizer
    from nanovlm.vlm import load_vlm
    ckpt = tu.checkpoint_dir(args.ckpt)
    model = load_vlm(ckpt, dtype=tu.resolve_dtype(device, args.dtype)).to(device)   # the SigLIP VLM or Qwen2.5-VL
    tok = Tokenizer.from_dir(ckpt)
    if args.eval:
        if args.num_samples and args.temperature <= 0:
            raise SystemExit(f"--num-samples {args.num_samples} samples answers: give a --temperature > 0 (e.g. 1)")
        samples = load_data(args.eval, args.image_root)
        records = [] if args.out else None
        report = evaluate_answers(model, tok, samples, max_new_tokens=args.max_new_tokens or 32, limit=args.limit,
                                  show=args.show, num_samples=args.num_samples, temperature=args.temperature,
                                  top_p=args.top_p or 1.0, records=records,
                                  generator=torch.Generator(device=device).manual_seed(args.seed))
        print(f"{args.eval}, {min(args.limit or len(samples), len(samples))} samples:\n{format_report(report)}")
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            print(f"predictions: {args.out} ({len(records)} lines)")
        return
    g = torch.Generator(device=device).manual_seed(args.seed)
    processor = model.image_processor()
    paths = [args.image] if args.image else []
    pixels = {k: v.to(device) for k, v in load_images(paths, processor, args.image).items()}
    counts = [processor.image_tokens(p) for p in paths]   # LM tokens of the image (Qwen2.5-VL: by its size)
    messages = []

    def answer(prompt):
        if paths and not messages and IMAGE_TAG not in prompt:
            prompt = f"{IMAGE_TAG}\n{prompt}"   # the image goes before the first question
        messages.append({"role": "user", "content": prompt})
        # numbers in the conversation become <num> + value when the model has the numeric head
        numeric = isinstance(model, WithNumericHead)
        history, values = split_numbers(messages, numeric, where="prompt")
        ids, _ = tok.encode_chat(history, counts, add_generation_prompt=True, system=model.cfg.system_prompt,
                                 where="prompt")
        new, printed = [], ""

        def stream(row, token_id):
            nonlocal printed
            new.append(token_id)
            text = tok.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):   # wait for the rest of a multi-byte character
                print(text[len(printed):], end="", flush=True)
                printed = text
        kw = dict(max_new_tokens=args.max_new_tokens or 64, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, generator=g, on_token=stream)
        if numeric:   # the head's values, rendered into the text as <num><v>
            (out,), (preds,) = model.generate_numbers([ids], num_values=values, **pixels, **kw)
            print(flush=True)
            text, predictions = decode_numeric(tok, out, preds)
            print(f"numbers: {predictions}\nanswer: {text}")
        else:
            (out,) = model.generate([ids], **pixels, **kw)
            print(flush=True)
            text = tok.decode(out, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})

    if args.prompt is not None:
        answer(args.prompt)
        return
    print(f"chatting with {args.ckpt}{f' about {args.image}' if args.image else ''} (empty line or Ctrl-D quits)")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        answer(prompt)


def main(argv=None):
    args = get_args(argv)
    device = tu.setup_distributed(args.device).device  # single process: just picks the device
    torch.manual_seed(args.seed)
    model_type = tu.read_config(args.ckpt).get("model_type")
    if model_type == "gpt":
        raise SystemExit(f"{args.ckpt} is a GPT checkpoint: python sample_gpt.py --ckpt {args.ckpt} --tokens ... "
                         "(or --eval FILE.jsonl)")
    elif model_type in ("vlm", "qwen2_5_vl"):
        sample_vlm(args, device)
    else:
        raise SystemExit(f"{args.ckpt}: unknown model_type {model_type!r} in config.json (known: gpt, vlm, "
                         "qwen2_5_vl)")


if __name__ == "__main__":
    run_cli(main)
