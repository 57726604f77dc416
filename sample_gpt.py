"""Continue token sequences with, evaluate, or export a GPT checkpoint from train_gpt.py (sample.py is the VLM's).

    python sample_gpt.py --ckpt out/gpt/last --tokens "<IMG> c_1 c_40 ... </IMG> <CLS>"    # continue tokens
    python sample_gpt.py --ckpt out/gpt/last --tokens "<IMG>" --max-new-tokens 20 --temperature 0.8 --top-k 50
    python sample_gpt.py --ckpt out/gpt/last --eval out/digits/test.jsonl                  # accuracy on a file
    python sample_gpt.py --ckpt out/gpt/last --eval out/digits/test.jsonl --index 3        # one sample
    python sample_gpt.py --ckpt out/old/last --export-hf out/old/hf   # for transformers (train_gpt.py writes OUT/hf)
"""

import argparse
import time

import torch

from nanovlm import codebook
from nanovlm import train_utils as tu
from nanovlm.cli import run_cli
from nanovlm.gpt import GPT


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by train_gpt.py")
    p.add_argument("--tokens", default=None, help="space-separated prompt tokens to continue")
    p.add_argument("--max-new-tokens", type=int, default=3, help="tokens to generate (stops early at <EOS>)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: the smallest set with this probability")
    p.add_argument("--eval", default=None, help="a .jsonl of sequences to classify: prints the accuracy at <CLS>")
    p.add_argument("--index", type=int, default=None, help="with --eval, show this one sample only")
    p.add_argument("--export-hf", default=None, metavar="DIR", help="write the checkpoint for transformers "
                   "(GPT2LMHeadModel config + safetensors, tokenizer.json) to DIR")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    return p.parse_args(argv)


def evaluate_file(model, vocab, path, max_length, device, index=None):
    """Classification accuracy at <CLS> over a .jsonl (or one sample of it, printed)."""
    seqs = codebook.read_jsonl(path, vocab)
    if index is not None:
        if not 0 <= index < len(seqs):
            raise SystemExit(f"--index {index}: {path} has samples 0..{len(seqs) - 1}")
        seqs = seqs[index:index + 1]
    class_ids = codebook.class_token_ids(vocab)
    right, t0 = 0, time.time()
    for i in range(0, len(seqs), 256):
        x, y = (t.to(device) for t in codebook.collate(seqs[i:i + 256], max_length))
        with torch.no_grad():
            logits, _ = model(x)                                                       # (B, T, V)
        pred, true = codebook.class_predictions(logits.float(), x, y, class_ids)
        right += int((pred == true).sum())
        if index is not None:
            print(f"sample {index}: predicted <CLS_{int(pred[0])}>, label <CLS_{int(true[0])}>")
    print(f"accuracy {right / len(seqs):.4f} ({right}/{len(seqs)}) on {path} in {time.time() - t0:.1f}s")


def main(argv=None):
    args = get_args(argv)
    device = tu.setup_distributed(args.device).device  # single process: just picks the device
    model = GPT.from_checkpoint(args.ckpt, device).eval()
    vocab = codebook.load_vocab(tu.checkpoint_dir(args.ckpt) / "vocab.json")
    if args.export_hf:
        model.save_hf(args.export_hf, **codebook.HF_TOKEN_IDS)
        codebook.save_tokenizer(vocab, args.export_hf)
        print(f"wrote {args.export_hf}: GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained read it")
    elif args.eval:
        evaluate_file(model, vocab, args.eval, tu.read_config(args.ckpt)["max_length"], device, args.index)
    elif args.tokens:
        ids = codebook.encode(args.tokens, vocab, "--tokens")
        g = torch.Generator(device=device).manual_seed(args.seed)
        new = model.generate(torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_id=codebook.EOS, generator=g)
        itos = {i: t for t, i in vocab.items()}
        print(" ".join(itos[i] for i in new[0].tolist()))
    else:
        raise SystemExit('give --tokens "<IMG> c_1 ...", --eval FILE.jsonl or --export-hf DIR')


if __name__ == "__main__":
    run_cli(main)
