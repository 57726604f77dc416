"""Packed rows against padded rows: training steps per second of the tiny preset on its own data, in one run.

    python benchmarks/bench_packing.py                        # the tiny SFT preset, 20 batches of 32, all cores
    python benchmarks/bench_packing.py --batches 40 --threads 1
    python benchmarks/bench_packing.py --help

Both sides train the same model on the same batches of the default SFT mix (scene conversations and OCR
strings): `padded` pads every sample to the longest of its batch (data.collate), `packed` lays several samples
in each row of --max-length tokens with block-diagonal attention (data.pack). Before timing, the loss and the
gradients of one batch are compared: packing changes how the batch is laid out, not what is computed.

Timing: one full optimizer step (forward, backward, the preset's optimizer) per batch, warm-up steps first, then
the sides alternate batch by batch so that drift (other processes, clock changes) hits both alike; medians are
reported.
"""

import argparse
import statistics
import time

import torch

from nanovlm import train_utils as tu
from nanovlm import vlm_train as vt
from nanovlm.data import VLMDataset, collate, load_data, pack


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20, help="timed batches per side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=160, help="tokens per packed row")
    p.add_argument("--data-dir", default=vt.SYNTHETIC)
    p.add_argument("--n-synthetic", type=int, default=20000, help="if the data must be generated first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train_args = vt.resolve_args(vt.build_parser("", "sft").parse_args(
        ["--data-dir", args.data_dir, "--n-synthetic", str(args.n_synthetic)]))
    # build_model generates the synthetic data first if it is not there
    model, tok = vt.build_model(train_args, tu.setup_distributed("cpu"))
    samples = load_data(train_args.data, seed=0)
    ds = VLMDataset(samples, tok, model.image_processor(), args.max_length, system=train_args.system)
    n_batches = args.batches + 2
    groups = [[ds[i * args.batch_size + j] for j in range(args.batch_size)] for i in range(n_batches)]
    sides = {"padded": [collate(g, tok.endoftext) for g in groups],
             "packed": [pack(g, tok.endoftext, args.max_length) for g in groups]}

    def loss_of(b):
        return model(**vt.to_device(b, "cpu"))["loss"]

    # Same function: loss and gradients of the first batch, padded vs packed.
    params = [p for p in model.parameters() if p.requires_grad]
    la, lb = loss_of(sides["padded"][0]), loss_of(sides["packed"][0])
    ga, gb = torch.autograd.grad(la, params), torch.autograd.grad(lb, params)
    grad_diff = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-6)) for a, b in zip(ga, gb)
                    if a.abs().max() > 1e-6)
    print(f"loss padded {la.item():.6f} packed {lb.item():.6f}; largest relative gradient difference {grad_diff:.1e}")
    if abs(la.item() - lb.item()) > 1e-5 * abs(la.item()) or grad_diff > 1e-4:
        raise SystemExit("packed and padded batches compute different losses or gradients: not comparable")

    opt = vt.make_vlm_optimizer(vt.setup_trainable(model, train_args), train_args)
    times = {name: [] for name in sides}
    tokens = {name: [] for name in sides}
    for i in range(n_batches):
        for name, batches in sides.items():
            b = batches[i]
            t = time.perf_counter()
            loss_of(b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:   # the first two are warm-up
                times[name].append(time.perf_counter() - t)
                tokens[name].append(b["input_ids"].numel())
    real = sum(len(x["input_ids"]) for g in groups[2:] for x in g) / len(groups[2:])
    print(f"{args.batches} batches of {args.batch_size} samples ({real:.0f} real tokens a batch), "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'side':8} {'rows x length':>14} {'padding':>8} {'s/step':>8} {'steps/s':>8}")
    for name in sides:
        shape = sides[name][2]["input_ids"].shape
        pad = 1 - real / statistics.mean(tokens[name])
        med = statistics.median(times[name])
        print(f"{name:8} {f'{shape[0]} x {shape[1]}':>14} {pad:8.0%} {med:8.3f} {1 / med:8.2f}")
    ratio = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed / padded steps per second: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
