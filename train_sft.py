"""Stage 2: instruction tuning. The projector and the LM learn to answer questions about images.

Offline, on the embedded default (tiny model from scratch, synthetic data generated on first use, CPU):
    python train_sft.py
    python sample.py --ckpt out/sft --image data/synthetic/images/val/000000.png --prompt "What shape is in the center?"

Real weights (GPUs), after stage 1 (train_pretrain.py):
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset qwen2.5-0.5b-siglip --init-from out/pretrain \
        --data llava_v1_5_mix665k.json --image-root images/ --out-dir out/sft

Resume an interrupted run exactly: add --resume (same flags, same --out-dir).
Every flag: python train_sft.py --help
"""

from nanovlm.cli import run_cli
from nanovlm.data import load_data
from nanovlm.evaluate import evaluate_answers, format_report
from nanovlm.vlm_train import build_parser, train


def main(argv=None):
    parser = build_parser(__doc__, stage="sft")
    parser.add_argument("--eval-answers", type=int, default=500,
                        help="after training, answer this many validation questions and print accuracy (0: skip)")
    args = parser.parse_args(argv)
    model, tok, args = train(args)
    if args.eval_answers and args.val_data and getattr(model, "cfg", None) is not None:
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        samples = load_data(args.val_data, args.image_root)
        report = evaluate_answers(model, tok, samples, limit=args.eval_answers, show=5)
        print(f"\nheld-out answers ({args.val_data}):\n{format_report(report)}")
        print(f"\ncheckpoint: {args.out_dir}   try: python sample.py --ckpt {args.out_dir} --image IMAGE --prompt TEXT")


if __name__ == "__main__":
    run_cli(main)
