"""Answer accuracy of a VLM on a dataset: generate each sample's last answer and compare it to the reference.

    report = evaluate_answers(model, tokenizer, samples)
    print(format_report(report))

Used by train_sft.py at the end of training and by `python sample.py --ckpt DIR --eval FILE`. Two scores per
sample, averaged per question type (the sample's "qtype" column, "all" when absent):
  exact  the answer equals the reference after stripping spaces (case-sensitive: "KQX" is not "kqx")
  text   1 - edit distance / max(len) (rewards.text_accuracy): partial credit for a nearly right string
Numbers written <num><v> are fed to a model with the numeric head as values (its answers are rendered back to
<num><v>), and to a model without one as the plain digits it was trained on.

With num_samples=k the model also samples k answers to each question (at `temperature`), and the report adds
  pass@k   some sampled answer is exact
  sampled  the mean exact score of the sampled answers
the headroom reinforcement learning (train_grpo.py) has: GRPO learns only from questions where the k answers
differ, by making the better ones more likely, so pass@k is a rough ceiling for its greedy score.
"""

from collections import defaultdict

import torch
from tqdm import tqdm

from nanovlm.data import load_images
from nanovlm.grpo import repeat_prompts
from nanovlm.numeric import WithNumericHead, decode_numeric, split_numbers, strip_numbers
from nanovlm.rewards import extract_answer, text_accuracy


@torch.no_grad()
def evaluate_answers(model, tokenizer, samples, batch_size=32, max_new_tokens=32, limit=None, show=0,
                     num_samples=0, temperature=1.0, top_p=1.0, generator=None, answer_tags=False, records=None,
                     dist=None):
    """Greedy answers to every sample's final assistant turn, with the chat template and image processing the
    model was trained with (model.cfg, model.image_processor()). Returns {qtype: {"n", "exact", "text"}} plus
    "all"; with num_samples = k > 0 each also has "pass@k" and "sampled" (module docstring).
    answer_tags: score the text inside the answer's last <answer>...</answer> (rewards.extract_answer), for
    prompts that ask for that format. records: a list that gets one dict per sample this process answered (where,
    question, reference, prediction, exact, text; with num_samples the sampled answers too).
    dist (train_utils.Dist): call on every process; each answers every W-th question and the scores are summed
    over the processes (every process gets the whole report). A sharded (FSDP) model needs it: every process
    must take part in every generation, so each runs as many batches, the last ones maybe repeats it ignores."""
    if num_samples and temperature <= 0:
        raise ValueError(f"num_samples={num_samples} samples answers: temperature must be > 0, got {temperature}")
    model.eval()
    system, images = model.cfg.system_prompt, model.image_processor()
    device = next(model.parameters()).device
    samples = samples[:limit] if limit else samples
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.ddp else (1, 0)
    mine = samples[rank::world]
    n_batches = -(-(-(-len(samples) // world)) // batch_size)   # the same on every process
    scores = defaultdict(lambda: {"n": 0, "exact": 0.0, "text": 0.0, "pass": 0.0, "sampled": 0.0})
    shown = 0
    numeric = isinstance(model, WithNumericHead)
    for i in tqdm(range(0, n_batches * batch_size, batch_size), desc="evaluate", unit="batch", leave=False,
                  disable=rank > 0):
        chunk = mine[i:i + batch_size]
        counted = bool(chunk)
        chunk = chunk or samples[:1]   # none left here: answer one question in step with the others, uncounted
        prompts, inputs, refs, values = [], [], [], []
        for s in chunk:
            if not s["messages"] or s["messages"][-1]["role"] != "assistant":
                raise ValueError(f"{s['where']}: evaluation needs a conversation ending with an assistant answer")
            # numbers as values beside <num> tokens for a model with the head, as in training; else plain digits
            messages, sample_values = split_numbers(s["messages"][:-1], numeric, s["where"])
            ids, _ = tokenizer.encode_chat(messages, [images.image_tokens(p) for p in s["images"]],
                                           add_generation_prompt=True, system=system, where=s["where"])
            prompts.append(ids)
            values.append(sample_values)
            inputs.append(load_images(s["images"], images, s["where"]))
            ref = s["messages"][-1]["content"].strip()
            refs.append(ref if numeric else strip_numbers(ref, s["where"]))

        def answers(n, **sampling):
            """n answers to each prompt of the chunk, as n consecutive rows per prompt: (B * n) strings."""
            rows, pixels = repeat_prompts(prompts, inputs, n)
            pixels = {k: v.to(device) for k, v in pixels.items()}
            if not numeric:
                outs = model.generate(rows, **pixels, max_new_tokens=max_new_tokens, **sampling)
                texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outs]
            else:
                nums = [v for vs in values for _ in range(n) for v in vs]
                outs, preds = model.generate_numbers(rows, num_values=nums, **pixels, max_new_tokens=max_new_tokens,
                                                     **sampling)
                texts = [decode_numeric(tokenizer, out, pred)[0].strip() for out, pred in zip(outs, preds)]
            return [extract_answer(t) for t in texts] if answer_tags else texts

        greedy = answers(1)
        if num_samples:
            drawn = answers(num_samples, temperature=temperature, top_p=top_p, generator=generator)
        for k, (s, pred, ref) in enumerate(zip(chunk, greedy, refs) if counted else ()):
            if num_samples:
                sampled = drawn[k * num_samples:(k + 1) * num_samples]
                hits = [float(a == ref) for a in sampled]
            if records is not None:
                records.append({"where": s["where"], "qtype": s.get("qtype"), "question": s["messages"][-2]["content"],
                                "reference": ref, "prediction": pred, "exact": float(pred == ref),
                                "text": text_accuracy(pred, ref), **({"sampled": sampled} if num_samples else {})})
            for key in (s.get("qtype", "all"), "all") if s.get("qtype") else ("all",):
                scores[key]["n"] += 1
                scores[key]["exact"] += float(pred == ref)
                scores[key]["text"] += text_accuracy(pred, ref)
                if num_samples:
                    scores[key]["pass"] += max(hits)
                    scores[key]["sampled"] += sum(hits) / num_samples
            if shown < show:
                print(f"  {s['where']}: {s['messages'][-2]['content'].replace(chr(10), ' ')!r} -> {pred!r} "
                      f"(reference {ref!r})")
                shown += 1
    if world > 1:   # the scores of every process, summed
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, dict(scores))
        scores = defaultdict(lambda: {"n": 0, "exact": 0.0, "text": 0.0, "pass": 0.0, "sampled": 0.0})
        for part in gathered:
            for key, v in part.items():
                for name, x in v.items():
                    scores[key][name] += x
    report = {}
    for key, v in scores.items():
        report[key] = {"n": v["n"], "exact": v["exact"] / v["n"], "text": v["text"] / v["n"]}
        if num_samples:
            report[key].update({f"pass@{num_samples}": v["pass"] / v["n"], "sampled": v["sampled"] / v["n"]})
    return report


def format_report(report):
    extra = [k for k in next(iter(report.values()), {}) if k not in ("n", "exact", "text")]   # pass@k, sampled
    rows = [f"{'question type':<16}{'n':>6}{'exact':>9}{'text acc':>10}" + "".join(f"{k:>9}" for k in extra)]
    for key in sorted(report, key=lambda k: (k == "all", k)):
        r = report[key]
        rows.append(f"{key:<16}{r['n']:>6}{r['exact']:>9.1%}{r['text']:>10.1%}"
                    + "".join(f"{r[k]:>9.1%}" for k in extra))
    return "\n".join(rows)
