"""Answer accuracy of a VLM on a dataset: generate each sample's last answer and compare it to the reference.

    report = evaluate_answers(model, tokenizer, samples)
    print(format_report(report))

Used by train_sft.py at the end of training and by `python sample.py --ckpt DIR --eval FILE`. Two scores per
sample, averaged per question type (the sample's "qtype" column, "all" when absent):
  exact  the answer equals the reference after stripping spaces (case-sensitive: "KQX" is not "kqx")
  text   1 - edit distance / max(len) (rewards.text_accuracy): partial credit for a nearly right string
Numbers written <num><v> are fed to a model with the numeric head as values (its answers are rendered back to
<num><v>), and to a model without one as the plain digits it was trained on.
"""

from collections import defaultdict

import torch
from tqdm import tqdm

from nanovlm.data import load_image
from nanovlm.numeric import decode_numeric, parse_numbers, strip_numbers
from nanovlm.rewards import text_accuracy


@torch.no_grad()
def evaluate_answers(model, tokenizer, samples, batch_size=32, max_new_tokens=32, limit=None, show=0):
    """Greedy answers to every sample's final assistant turn, with the chat template and image size the model
    was trained with (model.cfg). Returns {qtype: {"n", "exact", "text"}} plus "all"."""
    model.eval()
    image_size, system = model.cfg.image_size, model.cfg.system_prompt
    device = next(model.parameters()).device
    samples = samples[:limit] if limit else samples
    scores = defaultdict(lambda: {"n": 0, "exact": 0.0, "text": 0.0})
    shown = 0
    for i in tqdm(range(0, len(samples), batch_size), desc="evaluate", unit="batch", leave=False):
        chunk = samples[i:i + batch_size]
        prompts, pixels, refs, values = [], [], [], []
        numeric = getattr(model, "numeric", None) is not None
        for s in chunk:
            if not s["messages"] or s["messages"][-1]["role"] != "assistant":
                raise ValueError(f"{s['where']}: evaluation needs a conversation ending with an assistant answer")
            messages = []
            for m in s["messages"][:-1]:
                if numeric:   # values beside <num> tokens, as in training; else plain digits
                    text, v = parse_numbers(m["content"], s["where"])
                else:
                    text, v = strip_numbers(m["content"], s["where"]), []
                messages.append({**m, "content": text})
                values += v
            ids, _ = tokenizer.encode_chat(messages, model.cfg.image_tokens, add_generation_prompt=True,
                                           system=system)
            prompts.append(ids)
            pixels += [load_image(p, image_size, s["where"]) for p in s["images"]]
            ref = s["messages"][-1]["content"].strip()
            refs.append(ref if numeric else strip_numbers(ref, s["where"]))
        pixel_values = torch.stack(pixels).to(device) if pixels else None
        if numeric:
            outs, preds = model.generate(prompts, pixel_values, max_new_tokens=max_new_tokens, num_values=values)
        else:
            outs = model.generate(prompts, pixel_values, max_new_tokens=max_new_tokens)
        for k, (s, out, ref) in enumerate(zip(chunk, outs, refs)):
            pred = (decode_numeric(tokenizer, out, preds[k])[0] if numeric
                    else tokenizer.decode(out, skip_special_tokens=True)).strip()
            for key in (s.get("qtype", "all"), "all") if s.get("qtype") else ("all",):
                scores[key]["n"] += 1
                scores[key]["exact"] += float(pred == ref)
                scores[key]["text"] += text_accuracy(pred, ref)
            if shown < show:
                print(f"  {s['where']}: {s['messages'][-2]['content'].replace(chr(10), ' ')!r} -> {pred!r} "
                      f"(reference {ref!r})")
                shown += 1
    return {k: {"n": v["n"], "exact": v["exact"] / v["n"], "text": v["text"] / v["n"]} for k, v in scores.items()}


def format_report(report):
    rows = [f"{'question type':<16}{'n':>6}{'exact':>9}{'text acc':>10}"]
    for key in sorted(report, key=lambda k: (k == "all", k)):
        r = report[key]
        rows.append(f"{key:<16}{r['n']:>6}{r['exact']:>9.1%}{r['text']:>10.1%}")
    return "\n".join(rows)
