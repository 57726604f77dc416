"""The vision-language model: SigLIP ViT -> projector -> Qwen2.5 decoder.

    vlm = VLM.from_pretrained("out/sft")                                 # a checkpoint directory
    loss = vlm(**batch)["loss"]                                           # training (batch from data.collate)
    new_tokens = vlm.generate(prompts, pixel_values, max_new_tokens=32)   # sampling with a KV cache

How an image gets into a language model: the tokenizer writes `<|vision_start|>` + N x `<|image_pad|>` +
`<|vision_end|>` where the text said `<image>`. The VLM embeds the text as usual, runs each image through the
ViT and the projector to get N vectors of the LM's width, and writes them over the embeddings of the N pad
tokens, in order. From there the LM runs unchanged: to the decoder, image features are just tokens it did not
have to look up. Samples can hold any number of images, none included (text-only samples train too).

The loss is next-token cross-entropy on the positions whose label is not -100 (the assistant's answers).
Logits are computed only at those positions: the vocabulary projection is the largest matrix product in a
small LM and most positions (system prompt, image tokens, question) are never scored.

The numeric head (numbers as regressed values, numeric.py) is a subclass, NumericVLM, that extends embed(),
forward() and the generation step; this file knows nothing of it beyond loading the right class.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from safetensors.torch import save_file

from nanovlm.attention import KVCache
from nanovlm.projector import Projector, ProjectorConfig
from nanovlm.qwen2 import Qwen2, Qwen2Config
from nanovlm.sampling import sample_next
from nanovlm.siglip import SiglipConfig, SiglipImages, SiglipViT
from nanovlm.weights import config_dtype, load_mapped, read_config, read_safetensors

STOP_CHECK_EVERY = 8   # generate reads 'has every row stopped?' back from a GPU once per this many tokens


@dataclass
class VLMConfig:
    lm: Qwen2Config = field(default_factory=Qwen2Config)
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 151655       # <|image_pad|> in Qwen2.5's vocabulary
    stop_token_ids: tuple = (151645, 151643)  # <|im_end|>, <|endoftext|>
    pad_token_id: int = 151643
    image_size: int = 0                # input resolution; 0: the vision tower's own (positions interpolate)
    system_prompt: str = None          # the chat template's system turn the model was trained with (None: none)
    numeric: dict = None               # the numeric head's config (numeric.NumericConfig); None: no head

    def __post_init__(self):  # accept plain dicts (as read back from config.json)
        for name, cls in (("lm", Qwen2Config), ("vision", SiglipConfig), ("projector", ProjectorConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.image_size = self.image_size or self.vision.image_size
        self.projector.vision_hidden = self.vision.hidden_size
        self.projector.lm_hidden = self.lm.hidden_size
        self.projector.n_slots = self.image_tokens

    @property
    def image_tokens(self):
        """Tokens one image becomes in the LM sequence (196 patches / 2^2 = 49 for SigLIP-224)."""
        return (self.image_size // self.vision.patch_size) ** 2 // self.projector.shuffle_factor ** 2

    def to_dict(self):
        return {"model_type": "vlm", **asdict(self)}


def all_done(done, model):
    """Has every row stopped? With a sharded model (FSDP) every process must run the same number of decoding
    steps, since each step all-gathers the weights from all of them: the answer is then every row of every
    process, agreed on with one all_reduce."""
    finished = done.all()
    if isinstance(model, FSDPModule):
        finished = finished.to(torch.int32)
        torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
    return bool(finished)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, lm=None, vision=None, projector=None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else SiglipViT(cfg.vision)
        if projector is None:
            projector = Projector(cfg.projector)
            # Start the image tokens on the scale of the token embeddings (std 0.02, as the LM initialises
            # them). PyTorch's default Linear init makes them ~15x larger: their residual stream then drowns
            # what each layer adds, every image looks alike to the LM, and a model trained from scratch never
            # learns to look.
            projector.apply(Qwen2._init_weights)
        self.projector = projector
        self.lm = lm if lm is not None else Qwen2(cfg.lm)

    @classmethod
    def from_backbones(cls, lm_path, vision_path, projector=None, dtype=None, **cfg_kw):
        """Start from official checkpoints (dirs or hub ids), e.g. Qwen2.5-0.5B-Instruct + siglip-base-patch16-224.
        The projector is new (randomly initialised)."""
        lm = Qwen2.from_pretrained(lm_path, dtype=dtype)
        vision = SiglipViT.from_pretrained(vision_path, dtype=dtype)
        cfg = VLMConfig(lm=lm.cfg, vision=vision.cfg, projector=projector or ProjectorConfig(), **cfg_kw)
        model = cls(cfg, lm=lm, vision=vision)
        return model.to(lm.embed_tokens.weight.dtype).train()

    # ---- forward ------------------------------------------------------------------------------------------

    def image_processor(self):
        """Images -> this model's inputs (pixel_values) and each image's token count (siglip.SiglipImages)."""
        return SiglipImages(self.cfg.image_size, self.cfg.image_tokens)

    def image_features(self, pixel_values):
        """(N_img, 3, H, W) -> (N_img, image_tokens, lm_hidden)"""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written over the image-pad positions. (B, T) -> (B, T, C)."""
        x = self.lm.embed_tokens(input_ids)                                   # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id                       # (B, T)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        n_slots = int(is_image.sum())
        if n_slots != n_images * self.cfg.image_tokens:
            raise ValueError(
                f"image tokens do not match images: the text has {is_image.sum(1).tolist()} image-pad tokens per "
                f"row ({n_slots} in all) but {n_images} image(s) x {self.cfg.image_tokens} tokens each = "
                f"{n_images * self.cfg.image_tokens} (one <image> tag per image, never truncated)")
        if n_images:
            feats = self.image_features(pixel_values).to(x.dtype)             # (N_img, image_tokens, C)
            # Images fill the slots in reading order: row by row, left to right, as the tags appear.
            x = x.masked_scatter(is_image[..., None], feats.reshape(-1, x.shape[-1]))
        elif isinstance(self, FSDPModule) or (torch.is_grad_enabled() and self.vision_side_trains()):
            # A batch without images still runs the vision side, on a blank image whose features count zero
            # times. Training, the vision side then gets a gradient (of zeros) in every step, as in a step with
            # images, whether the batch is split over micro-batches or processes: DDP needs no search for unused
            # parameters, and one process equals several. Sharded (FSDP), every process must run every block
            # anyway, since each gathers its weights from all of them.
            blank = x.new_zeros(1, 3, self.cfg.image_size, self.cfg.image_size)
            x = x + 0 * self.image_features(blank).sum().to(x.dtype)
        return x

    def vision_side_trains(self):
        return any(p.requires_grad for part in (self.vision, self.projector) for p in part.parameters())

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, n_label_tokens=None,
                packing=None):
        """Without labels: {"logits" (B, T, vocab)}. With labels: {"loss", "n_tokens"}.

        attention_mask (B, T): 0 = padding, 1, 2, ... the samples of a row; packing: the same, as data.collate
        computes it for attention (positions, cu_seqlens); give either (see Qwen2.hidden_states).
        The loss is the cross-entropy summed over the labelled next tokens, divided by n_label_tokens: by
        default this batch's count (the mean), but the training loop passes the count of the whole global batch
        (all micro-batches, all processes), so that splitting a batch changes nothing but float rounding."""
        return self.outputs(self.states(input_ids, pixel_values, attention_mask, packing), labels, n_label_tokens)

    def states(self, input_ids, pixel_values=None, attention_mask=None, packing=None, **embed_kw):
        """A batch through the model: the final normed states (B, T, C) the head reads. embed_kw goes to embed()
        (NumericVLM: num_values)."""
        x = self.embed(input_ids, pixel_values, **embed_kw)
        return self.lm.hidden_states(inputs_embeds=x, attention_mask=attention_mask, packing=packing)   # (B, T, C)

    def outputs(self, h, labels=None, n_label_tokens=None):
        """Final hidden states (B, T, C) -> the logits, or the loss on the labelled positions."""
        if labels is None:
            return {"logits": self.lm.logits(h)}
        # Position t predicts token t+1: score only positions whose next token is labelled.
        targets = labels[:, 1:]                                                        # (B, T-1)
        keep = targets != -100
        loss = self.lm.head_loss(h[:, :-1][keep], targets[keep])      # never all the (N, vocab) logits at once
        n = keep.sum()
        denominator = n.clamp(min=1) if n_label_tokens is None else n_label_tokens
        return {"loss": loss / denominator, "n_tokens": n}

    def loss_counts(self, batch):
        """What forward's loss is averaged over, counted on the CPU from a collated batch (no device sync):
        the training loop sums these over a global batch and passes them back as forward's keyword arguments."""
        return {"n_label_tokens": int((batch["labels"][:, 1:] != -100).sum())}

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, pixel_values=None, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, generator=None, on_token=None, include_stop=False, num_samples=1,
                 compile=False, **embed_kw):
        """Sample continuations of a batch of prompts together, with a KV cache.

        prompts: list of token-id lists (lengths may differ; images as image-pad tokens, in order across the
        batch matching pixel_values). temperature 0 = greedy. Stops a row at any of cfg.stop_token_ids
        (the stop token is returned only with include_stop=True). on_token(row, token_id) is called as tokens
        are chosen (streaming). embed_kw goes to embed() with the prompts (NumericVLM: num_values).
        num_samples: continue each prompt that many times (rows p0, p0, ..., p1, p1, ...: GRPO's groups); the
        prompts and their images go through the model once, then their cache is copied.
        compile: run the decode step through torch.compile (on CUDA with CUDA graphs); it is compiled on the
        first call and reused while the shapes stay the same.
        Returns a list of new-token lists, one per prompt (per sample: len(prompts) * num_samples lists).

        The loop keeps the device busy: each step samples from the logits, records the token into a tensor,
        and feeds it back, with nothing read back to the host except (on GPUs) whether every row has stopped,
        once every STOP_CHECK_EVERY tokens, and the tokens themselves when streaming.
        """
        device = self.lm.embed_tokens.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(prompts):            # right padding: the cache keeps each row's length
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            mask[b, :len(p)] = True
        ids, mask, last = ids.to(device), mask.to(device), torch.tensor([len(p) - 1 for p in prompts], device=device)
        lm = self.lm.cfg
        # The cache holds k, v as attention gets them: in the autocast dtype under torch.autocast.
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
            self.lm.embed_tokens.weight.dtype
        size = -(-(T + max_new_tokens) // 64) * 64   # rounded up: fewer distinct shapes for a compiled step
        cache = KVCache(lm.num_hidden_layers, B, size, lm.num_key_value_heads, lm.head_dim, dtype, device)
        h = self.prefill(ids, mask, cache, pixel_values, **embed_kw)                          # (B, T, C)
        h = h[torch.arange(B, device=device), last]                                           # (B, C) last real
        if num_samples > 1:
            cache = cache.repeat_interleave(num_samples)
            h, ids, mask = (t.repeat_interleave(num_samples, 0) for t in (h, ids, mask))
            B *= num_samples
        logits = self.next_logits(h)                                                          # (B, vocab)
        seen = None
        if repetition_penalty != 1.0:   # the tokens each row has seen so far; -1 = none yet
            seen = torch.cat([ids.masked_fill(~mask, -1), ids.new_full((B, max_new_tokens), -1)], 1)
        tokens = torch.full((B, max_new_tokens), self.cfg.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = torch.tensor(self.cfg.stop_token_ids, device=device)
        step = self.compiled_decode_step(cache) if compile else self.decode_step
        # On the CPU reading a flag costs nothing; on a GPU it waits for the queue to drain.
        check_every = 1 if device.type == "cpu" else STOP_CHECK_EVERY
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)  # (B,)
            tokens[:, i] = nxt                   # stops too: each row is cut at its first stop at the end
            done |= torch.isin(nxt, stops)
            if on_token is not None:             # streaming: the rows still going, without their stop token
                for b, (t, d) in enumerate(zip(nxt.tolist(), done.tolist())):
                    if not d:
                        on_token(b, t)
            nxt = nxt.masked_fill(done, self.cfg.pad_token_id)   # finished rows run along, their output ignored
            x = self.step_embed(nxt, h)                                                        # (B, 1, C)
            if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and all_done(done, self)):
                break
            if seen is not None:
                seen[:, T + i] = nxt
            h, logits = step(x, cache)                                                        # (B, C), (B, vocab)
        stop_ids, out = set(self.cfg.stop_token_ids), []
        for row in tokens[:, :i + 1].tolist():
            end = next((j for j, t in enumerate(row) if t in stop_ids), None)
            out.append(row if end is None else row[:end + include_stop])
        return out

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, **embed_kw):
        """The prompts (right-padded, attention_mask 1...1 0...0) and their images into a fresh KVCache: -> final
        states (B, T, C). Every later token goes through the plain decoder with the cache (decode_step, and GRPO's
        completion pass); Qwen25VL.prefill also sets the cache's position offsets."""
        x = self.embed(input_ids, pixel_values, **embed_kw)
        return self.lm.hidden_states(inputs_embeds=x, attention_mask=attention_mask, cache=cache)

    def next_logits(self, h):
        """(B, C) -> fp32 logits (B, vocab) of the next token. An image-pad token is never an output: images come
        from pixels, and a sampled one would leave the text with an image too few."""
        logits = self.lm.logits(h).float()
        logits[:, self.cfg.image_token_id] = float("-inf")
        return logits

    def decode_step(self, x, cache):
        """One token per row through the LM with the cache: x (B, 1, C) -> (states (B, C), logits (B, vocab)).
        Same shapes every step and no host reads: torch.compile can capture it whole."""
        h = self.lm.hidden_states(inputs_embeds=x, cache=cache)[:, -1]
        return h, self.next_logits(h)

    def compiled_decode_step(self, cache):
        """decode_step through torch.compile, built once per model. On CUDA, CUDA graphs replay the whole step
        as one launch; the cache's tensors are marked static so the graph may write into them in place."""
        on_cuda = cache.lengths.device.type == "cuda"
        if on_cuda:
            for t in cache.k + cache.v + [cache.lengths]:
                torch._dynamo.mark_static_address(t)
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.decode_step, fullgraph=True,
                                                mode="reduce-overhead" if on_cuda else None)
        if not on_cuda:
            return self._compiled_step

        def step(x, cache):   # a new replay may overwrite the last one's outputs: generate is done with them
            torch.compiler.cudagraph_mark_step_begin()
            return self._compiled_step(x, cache)
        return step

    def step_embed(self, nxt, h):
        """The input embedding of the token just chosen, nxt (B,), by the states h (B, C): (B, 1, C). A hook:
        NumericVLM adds the value its head read from h when nxt is <num>."""
        return self.lm.embed_tokens(nxt[:, None])

    # ---- checkpoints --------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors (our parameter names). For atomic training checkpoints with the
        optimizer state, see train_utils.save_checkpoint, which calls this into a temporary directory."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype=None, attn_backend=None):
        """A checkpoint directory written by save_pretrained or a training run. One with a numeric head loads as
        numeric.NumericVLM (from either class)."""
        ckpt_dir = Path(ckpt_dir)
        cfg = read_config(ckpt_dir)
        if cfg.get("model_type") != "vlm":
            raise ValueError(f"{ckpt_dir}/config.json has model_type {cfg.get('model_type')!r}, not 'vlm'")
        cfg = VLMConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        if cfg.numeric is not None and cls is VLM:
            from nanovlm.numeric import NumericVLM
            cls = NumericVLM
        if attn_backend:
            cfg.lm.attn_backend = cfg.vision.attn_backend = attn_backend
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_safetensors(ckpt_dir)   # the same strict reader as the official checkpoints
        names = {k: k for k in model.state_dict()}
        return load_mapped(model, tensors, names, ckpt_dir, dtype=config_dtype(dtype) or torch.float32).eval()


def load_vlm(ckpt_dir, dtype=None, attn_backend=None):
    """The model of a checkpoint of either family, by its config.json's model_type: the SigLIP VLM ("vlm") or
    Qwen2.5-VL ("qwen2_5_vl": a training run's checkpoint or an official one); with a numeric head, its numeric
    class (numeric.py)."""
    model_type = read_config(Path(ckpt_dir)).get("model_type")
    if model_type == "qwen2_5_vl":
        from nanovlm.qwen2_5_vl import Qwen25VL
        return Qwen25VL.from_pretrained(ckpt_dir, dtype=dtype, attn_backend=attn_backend or "auto")
    if model_type != "vlm":
        raise ValueError(f"{ckpt_dir}/config.json has model_type {model_type!r}: not a vision-language model "
                         "(known: 'vlm', 'qwen2_5_vl')")
    return VLM.from_pretrained(ckpt_dir, dtype=dtype, attn_backend=attn_backend)
