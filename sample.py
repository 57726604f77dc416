"""Generate from a checkpoint; the mode follows the checkpoint's config.json "model_type".

GPT checkpoints (train_gpt.py):
    python sample.py --ckpt out/gpt/best --tokens "<IMG> c_1 c_40 ... </IMG> <CLS>"           # continue tokens
    python sample.py --ckpt out/gpt/best --tokens "<IMG>" --max-new-tokens 20 --temperature 0.8 --top-k 50
    python sample.py --ckpt out/gpt/best --data out/digits/test.jsonl                        # accuracy on a file
    python sample.py --ckpt out/gpt/best --data out/digits/test.jsonl --index 3              # one sample
"""

import argparse
import json
import time

import torch

from nanovlm import train_utils as tu


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Generate from a nanovlm checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: the smallest set with this probability")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (GPT default 3)")
    # GPT mode
    p.add_argument("--tokens", default=None, help="GPT: space-separated prompt tokens to continue")
    p.add_argument("--data", default=None, help="GPT: a .jsonl of sequences to classify (prints accuracy)")
    p.add_argument("--index", type=int, default=None, help="GPT: with --data, show this one sample only")
    return p.parse_args(argv)


def load_gpt(ckpt, device):
    from nanovlm import codebook
    from nanovlm.gpt import GPT, GPTConfig
    config = tu.read_config(ckpt)
    model = GPT(GPTConfig(**{**config["gpt"], "dropout": 0.0}))
    tu.load_checkpoint(ckpt, model, device=device)
    vocab = codebook.load_vocab(tu.checkpoint_dir(ckpt) / "vocab.json")
    return model.to(device).eval(), vocab, config


def sample_gpt(args, device):
    from nanovlm import codebook
    model, vocab, config = load_gpt(args.ckpt, device)
    itos = {i: t for t, i in vocab.items()}
    class_ids = codebook.class_token_ids(vocab)
    if args.data:
        seqs = codebook.read_jsonl(args.data, vocab)
        if args.index is not None:
            seqs = seqs[args.index:args.index + 1]
        right, t0 = 0, time.time()
        for i in range(0, len(seqs), 256):
            x, y = (t.to(device) for t in codebook.collate(seqs[i:i + 256], config["max_length"]))
            with torch.no_grad():
                logits, _ = model(x)
            pred, true = codebook.class_predictions(logits.float(), x, y, class_ids)
            right += int((pred == true).sum())
            if args.index is not None:
                print(f"sample {args.index}: predicted <CLS_{int(pred[0])}>, label <CLS_{int(true[0])}>")
        print(f"accuracy {right / len(seqs):.4f} ({right}/{len(seqs)}) on {args.data} in {time.time() - t0:.1f}s")
        return
    if not args.tokens:
        raise SystemExit("GPT mode needs --tokens \"<IMG> c_1 ...\" or --data FILE.jsonl")
    ids = codebook.encode(args.tokens, vocab, "--tokens")
    g = torch.Generator(device=device).manual_seed(args.seed)
    new = model.generate(torch.tensor([ids], device=device), args.max_new_tokens or 3,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_id=codebook.EOS, generator=g)
    print(" ".join(itos[i] for i in new[0].tolist()))


def main(argv=None):
    args = get_args(argv)
    device = tu.setup_distributed(args.device).device  # single process: just picks the device
    torch.manual_seed(args.seed)
    model_type = tu.read_config(args.ckpt).get("model_type")
    if model_type == "gpt":
        sample_gpt(args, device)
    else:
        raise SystemExit(f"{args.ckpt}: unknown model_type {model_type!r} in config.json (known: gpt)")


if __name__ == "__main__":
    main()
