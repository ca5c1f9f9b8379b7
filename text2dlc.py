"""Text -> DLC with a masked diffusion language model (paper Section 6, Appendix E, Eq. 5).

The paper turns text-to-image into a Markov chain: text -> DLC (this script) -> image (the
frozen DLC-conditioned DiT, `dit.py sample --dlc`). A text diffusion LM (LLaDA-8B-Base) gets
V new DLC tokens plus a <START-DLC> separator and is finetuned with masked-token prediction
on sequences "DLC tokens <START-DLC> caption tokens" (the paper's order). Sampling starts from
L masks + <START-DLC> + prompt and unmasks the most confident DLC positions step by step.
One loss and one sampler, two backends: `--model tiny` (a small bidirectional transformer with
a word tokenizer, a few CPU minutes) and `--model llada` (LLaDA-8B-Base from a local folder,
vocabulary extended, FSDP2). All commands and the design choices: docs/text2dlc.md.

  python text2dlc.py --dlc runs/dlc-shapes --run toy        (a `sem.py encode --data shapes` set; ~1 min CPU)
  python text2dlc.py sample --ckpt runs/text2dlc-toy --prompt "a red square on a green background" --n 16
      --out runs/t2d-red-square                             (then: python dit.py sample --dlc runs/t2d-red-square)
  python text2dlc.py sample --model_path /models/DLC_LLADA_L512 --L 512 --prompt "a golden retriever" --n 4
      --steps 512 --temperature 0.2 --remasking random --out runs/t2d-golden      (the authors' finetuned model)
  torchrun --nproc_per_node=8 text2dlc.py --preset laion --model_path /models/LLaDA-8B-Base --dlc DIR
  python text2dlc.py bench

Facts from LLaDA (https://github.com/ML-GSAI/LLaDA, generate.py, get_log_likelihood.py,
its guidelines page) and its HF modeling code (https://huggingface.co/GSAI-ML/LLaDA-8B-Base:
modeling_llada.py names model.transformer.wte / ff_out / blocks, set_activation_checkpointing,
config.embedding_size, mask id 126336); the authors' finetuning and sampler:
https://github.com/lavoiems/DiscreteLatentCode (dit/train_llada_sem_laion.py, dit/chat_sem.py).
Code written from scratch.
"""
import copy, dataclasses, json, math, os, re, sys, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


#################################################################################
#                     Configs: one per sub-command, presets                     #
#################################################################################

@dataclass
class ModelConfig:
    """The network and its batch: shared by train and bench."""
    device: str = "auto"          # auto | cpu | cuda | mps
    model: str = "tiny"           # tiny | llada (bench: tiny | llama_shaped)
    batch_size: int = 32          # sequences per process per micro-step
    d_model: int = 128            # tiny: width
    n_layers: int = 3             # tiny: transformer blocks
    n_heads: int = 4              # tiny: attention heads
    max_caption: int = 16         # caption tokens per sequence (padded / truncated)
    act_ckpt: bool = False        # activation checkpointing (llada: the model's own mechanism)
    POSITIVE = ("batch_size", "d_model", "n_layers", "n_heads", "max_caption")


@dataclass
class Config(ModelConfig):
    """`train` (the default sub-command)."""
    run: str = "toy"              # run folder runs/text2dlc-<run>/
    resume: bool = False          # continue from the newest checkpoint of the run
    overwrite: bool = False       # replace an earlier run in the same folder (its checkpoints, config, log)
    seed: int = 0                 # base seed (per rank: seed * world + rank)
    steps: int = 400              # optimizer steps (paper: 9M pairs at batch 128, step count not given)
    global_batch: int = 0         # sequences per optimizer step (0: batch_size * world); more: grad accumulation
    compile: bool = False         # torch.compile the model (GPU)
    model_path: str = ""          # local LLaDA-8B-Base folder (config.json, weights, tokenizer, modeling_llada.py)
    dlc: str = ""                 # DLC set with captions.jsonl (sem.py encode)
    mask_mode: str = "sft"        # sft: caption kept clean, only DLC masked (better on the toy) | all: the authors'
    eps: float = 1e-3             # minimum mask probability, p = (1 - eps) t + eps (LLaDA's eps)
    lr: float = 1e-3              # AdamW peak learning rate (paper: 1e-5 for LLaDA-8B)
    warmup: int = 50              # linear warm-up steps, then cosine to 0
    weight_decay: float = 0.0     # AdamW weight decay
    grad_clip: float = 1.0        # gradient-norm clip
    ema_decay: float = 0.99       # EMA of the tiny model (0: none; paper: none)
    log_every: int = 100          # steps between log lines
    ckpt_every: int = 400         # steps between checkpoints
    POSITIVE = ("steps", "batch_size", "d_model", "n_layers", "n_heads", "max_caption", "log_every", "ckpt_every")


PRESETS = {
    "toy": {},
    # Appendix E: full finetune, AdamW 1e-5, cosine, batch 128 (4 GPUs x 4 x accumulation 8), bf16.
    "laion": {"model": "llada", "lr": 1e-5, "batch_size": 4, "global_batch": 128, "steps": 70000,
              "warmup": 500, "weight_decay": 0.0, "mask_mode": "all", "ema_decay": 0.0, "act_ckpt": True,
              "max_caption": 77, "log_every": 10, "ckpt_every": 2000},
}


@dataclass
class SampleConfig:
    """`sample`: DLCs for prompts, from our checkpoint or the authors' finetuned folder."""
    ckpt: str = ""                # checkpoint .pt or run folder
    prompt: str = ""              # caption to condition on
    prompts_file: str = ""        # or a text file of captions, one per line (n DLCs for each)
    n: int = 16                   # number of DLCs to draw (per prompt)
    out: str = ""                 # output DLC set folder
    overwrite: bool = False       # replace an existing DLC set at --out
    steps: int = 0                # unmasking steps (0: L, one token per step)
    temperature: float = 1.0      # Gumbel temperature (0: argmax)
    cfg: float = 0.0              # classifier-free guidance scale w: un + (w + 1)(cond - un) (LLaDA's form)
    batch_size: int = 64          # DLCs per forward pass
    seed: int = 0                 # sampling seed
    device: str = "auto"          # auto | cpu | cuda
    model_path: str = ""          # llada: override the base-model folder stored in the checkpoint; without
                                  # --ckpt: the authors' finetuned folder (lavoies/DLC_LLADA_L512)
    L: int = 0                    # without --ckpt: the DLC length (the authors' released model: 512)
    remasking: str = "low_confidence"  # low_confidence (LLaDA) | random (the authors' README, temperature 0.2)
    POSITIVE = ("n", "batch_size")


@dataclass
class ProbeConfig:
    """`probe`: do generated codes carry the prompt's attributes? (DLC-level judge)"""
    dlc: str = ""                 # generated DLC set (text2dlc sample) whose meta holds the prompt
    ref: str = ""                 # encoded DLC set with shapes captions covering all combinations
    k: int = 5                    # neighbours voting per attribute
    POSITIVE = ("k",)


@dataclass
class BenchConfig(ModelConfig):
    """`bench`: training throughput of one model on this device."""


#################################################################################
#   The algorithm: sequence template, forward process, loss (Eq. 5), sampler    #
#################################################################################

def make_sequences(codes, caption_ids, dlc_offset, start_id):
    """Template "DLC tokens <START-DLC> caption tokens": (B, L) + (B, C) -> (B, L + 1 + C).
    start_id None: the caption ids already begin with the separator (the authors' released model)."""
    B = codes.shape[0]
    # (B, 1) separator column, or (B, 0) when the caption ids carry it
    start = torch.full((B, 0 if start_id is None else 1), start_id or 0, dtype=torch.long, device=caption_ids.device)
    # DLC value v -> id dlc_offset + v; (B, L + 1 + C)
    return torch.cat([codes.long() + dlc_offset, start, caption_ids], 1)


def forward_process(x0, mask_id, eps, maskable, t=None, generator=None):
    """Mask each token independently with p = (1 - eps) t + eps, t ~ U(0, 1) per sequence.
    `maskable` (B, T) bool: where masking is allowed (all tokens, or only DLC ones for SFT).
    Returns xt, the mask, and p (B, 1)."""
    B, T = x0.shape
    if t is None:
        t = torch.rand(B, device=x0.device, generator=generator)        # (B,) one time per sequence
    p = ((1 - eps) * t + eps)[:, None]                                    # (B, 1)
    # (B, T) bool: masked with probability p where maskable
    masked = (torch.rand(B, T, device=x0.device, generator=generator) < p) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, p  # x_t: the masked tokens become mask_id


def masked_diffusion_loss(logits, x0, masked, p, n_tokens):
    """Eq. 5: L = E_t [ 1 / n_tokens * sum_{i masked} -log p_theta(x0_i | x_t) / p ].
    Unmasked positions contribute exactly zero; n_tokens = B * T (all) or B * L (SFT)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), x0.flatten(), reduction="none")  # fp32 island
    return (ce.view_as(x0) * masked / p).sum() / n_tokens                 # ce (B, T)


def model_logits(model, ids):
    """Logits (B, T, vocab) for our tiny model and for HF models (which return an output object)."""
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits                  # HF models return a ModelOutput with .logits


# Sampling: low-confidence remasking (LLaDA's generate), DLC ids only

def num_transfer_tokens(L, steps):
    """Linear schedule: the same number of tokens committed per step; the remainder goes to
    the first steps (LLaDA's get_num_transfer_tokens)."""
    k = torch.full((steps,), L // steps, dtype=torch.long)              # floor(L / steps) tokens per step
    k[: L % steps] += 1  # the first L % steps steps commit one more: sum(k) = L
    return k


@torch.no_grad()
def sample_dlc(model_fn, prompt_ids, L, V, dlc_offset, start_id, mask_id, steps, temperature=1.0,
               cfg=0.0, generator=None, history=None, remasking="low_confidence"):
    """Canvas [L masks, <START-DLC>, prompt]; at each step predict every masked DLC position,
    draw a candidate (argmax, or Gumbel-max in float64 at `temperature`), and commit the k most
    confident (softmax probability of the candidate; `random`: k uniformly chosen, the authors'
    README setting); the rest stay masked. Logits are restricted to the DLC id range, so only
    DLC tokens can be written. Returns codes (B, L) in [0, V)."""
    if remasking not in ("low_confidence", "random"):
        utils.fail(f"--remasking must be low_confidence or random, got {remasking!r}")
    B, dev = prompt_ids.shape[0], prompt_ids.device
    x = make_sequences(torch.zeros(B, L, dtype=torch.long, device=dev), prompt_ids, dlc_offset, start_id)
    x[:, :L] = mask_id                                                    # (B, L + 1 + C)
    ks = num_transfer_tokens(L, steps)                                  # (steps,) tokens committed at each step
    for s in range(steps):
        logits = model_fn(x)[:, :L, dlc_offset: dlc_offset + V].double()  # (B, L, V) DLC range only
        if cfg > 0:  # unconditional pass: the prompt masked as well (LLaDA's CFG)
            un = x.clone()                                              # the unconditional canvas
            un[:, L + (start_id is not None):] = mask_id  # everything after the DLC and our separator (if any)
            lu = model_fn(un)[:, :L, dlc_offset: dlc_offset + V].double()  # (B, L, V)
            logits = lu + (cfg + 1) * (logits - lu)                     # guided: un + (w + 1)(cond - un)
        if temperature > 0:  # why float64: Gumbel noise in low precision ties / biases the argmax
            u = torch.rand(logits.shape, dtype=torch.float64, device=dev, generator=generator)
            # Gumbel-max: a draw from softmax(logits / temperature)
            cand = (logits / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
        else:
            cand = logits.argmax(-1)                                      # (B, L)
        conf = logits.softmax(-1).gather(-1, cand[..., None])[..., 0]     # (B, L)
        if remasking == "random":
            # random: uniform scores, so k positions chosen at random
            conf = torch.rand(conf.shape, dtype=conf.dtype, device=dev, generator=generator)
        still = x[:, :L] == mask_id                                     # (B, L) positions still masked
        conf = torch.where(still, conf, torch.full_like(conf, -math.inf))  # committed positions are never picked again
        pick = conf.topk(int(ks[s]), dim=1).indices                       # (B, k) most confident
        # (B, L) bool; & still: a committed token is never overwritten
        commit = torch.zeros_like(still).scatter_(1, pick, True) & still
        # write the candidates' DLC ids at the picked positions
        x[:, :L] = torch.where(commit, cand + dlc_offset, x[:, :L])
        if history is not None:
            history.append(x[:, :L].clone())
    return x[:, :L] - dlc_offset                                        # ids -> DLC values in [0, V)


#################################################################################
#                   Tiny backend: word tokenizer + bidirectional transformer    #
#################################################################################

class Backend:
    """What the loss and sampler need: model, caption encoder, id layout (mask, DLC range, start).
    Built by tiny_backend here, llada_backend and authors_backend in the plumbing sections below."""
    def __init__(self, model, encode, mask_id, dlc_offset, start_id, extra):
        self.model, self.encode, self.mask_id = model, encode, mask_id
        self.dlc_offset, self.start_id, self.extra = dlc_offset, start_id, extra


SPECIALS = ["<pad>", "<unk>", "<mask>"]


def build_vocab(captions):
    """Word-level vocabulary from the training captions: a plain list (stored in the checkpoint)."""
    # sorted: the same captions always give the same ids
    words = sorted({w for c in captions for w in c.lower().split()})
    return SPECIALS + words


class WordTokenizer:
    def __init__(self, vocab):
        self.vocab, self.index = list(vocab), {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.unk_id, self.mask_id = 0, 1, 2                # the positions of SPECIALS

    def __len__(self):
        return len(self.vocab)

    def encode(self, texts, length):
        """(B, length) ids: words, then <pad>; unknown words become <unk>."""
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [self.index.get(w, self.unk_id) for w in t.lower().split()][:length]  # truncated to `length` words
            ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids


class Block(nn.Module):
    """Pre-LN transformer block with *bidirectional* attention (no causal mask, like LLaDA)."""
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)      # qkv packs (3, H, Dh) along the output dim
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))  # d -> 4d -> d

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads)   # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, H, T, Dh)
        a = utils.attention(q, k, v)                                      # (B, H, T, Dh), fused on GPU
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))             # (B, T, D)
        return x + self.mlp(self.ln2(x))                                # (B, T, D)


class TinyMDLM(nn.Module):
    """Token + learned position embeddings, bidirectional blocks, untied output layer. No time
    input: like LLaDA, the mask ratio is read off the input."""
    def __init__(self, vocab_size, max_len, d=128, n_layers=3, heads=4):
        super().__init__()
        # wpe (max_len, d): learned positions
        self.wte, self.wpe = nn.Embedding(vocab_size, d), nn.Parameter(torch.zeros(max_len, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layers))
        self.ln_f, self.ff_out = nn.LayerNorm(d), nn.Linear(d, vocab_size, bias=False)
        nn.init.normal_(self.wpe, std=0.02)
        self.act_ckpt = False

    def forward(self, ids):                                               # ids (B, T)
        x = self.wte(ids) + self.wpe[: ids.shape[1]]                      # (B, T, D)
        for blk in self.blocks:
            ckpt = self.act_ckpt and self.training
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return self.ff_out(self.ln_f(x))                                  # (B, T, vocab)


def tiny_backend(cfg, L, V, captions=None, vocab=None):
    """A fresh TinyMDLM and the word tokenizer (from `vocab`, or built from the captions);
    ids: words | V DLC tokens | <START-DLC>."""
    tok = WordTokenizer(vocab or build_vocab(captions))
    off = len(tok)                                                      # DLC ids start right after the words
    # ids: specials + words, V DLC ids, <START-DLC>; max_len = T
    model = TinyMDLM(off + V + 1, L + 1 + cfg["max_caption"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"])
    # mask_id 2 (<mask>); DLC ids off .. off + V - 1; start_id off + V
    return Backend(model, lambda t: tok.encode(t, cfg["max_caption"]), tok.mask_id, off, off + V, {"vocab": tok.vocab})


def build_backend(cfg, L, V, captions=None, vocab=None, model_path=None):
    """The backend named by cfg["model"] (cfg: a config dict, as stored in checkpoints)."""
    if cfg["model"] == "tiny":
        return tiny_backend(cfg, L, V, captions, vocab)
    if cfg["model"] == "llada":
        return llada_backend(cfg, V, model_path)
    utils.fail(f"unknown --model {cfg['model']!r}; use tiny or llada")


#################################################################################
#              Training: LLaDA's SFT recipe on (DLC, caption) pairs             #
#################################################################################

def load_captioned(path, L=None, V=None):
    """(codes (N, L) int64, captions, meta) of a DLC set with captions.jsonl."""
    if not path:
        utils.fail("--dlc is required: a DLC set with captions.jsonl (python sem.py encode --data shapes --out DIR)")
    s = utils.load_dlc_set(path, L=L, V=V)
    if "captions" not in s:
        utils.fail(f"DLC set {path} has no captions.jsonl; text2dlc trains on (DLC, caption) pairs: "
                   "encode a captioned dataset (sem.py encode --data shapes)")
    # a caption string, or a record with "caption" / "text"
    caps = [c if isinstance(c, str) else c.get("caption", c.get("text", "")) for c in s["captions"]]
    if len(caps) != len(s["codes"]):
        utils.fail(f"DLC set {path}: {len(caps)} captions for {len(s['codes'])} codes; re-encode it")
    return torch.from_numpy(np.asarray(s["codes"]).astype(np.int64)), caps, s["meta"]  # codes (N, L) int64


def sequence_layout(cfg, L, C, device):
    """A training sequence is DLC (L) | separator | caption (C): its length T, where the forward
    process may mask (every token, or with --mask_mode sft only the DLC: the caption is the
    prompt) and the loss's normaliser n_tok (the maskable tokens of a batch)."""
    T = L + 1 + C
    maskable = torch.ones(T, dtype=torch.bool, device=device)           # (T,) bool, shared by all rows
    if cfg.mask_mode == "sft":
        maskable[L:] = False                                              # caption (and separator) stay clean
    return T, maskable, cfg.batch_size * (L if cfg.mask_mode == "sft" else T)  # n_tok = B * L (sft) or B * T (all)


def lr_at(step, cfg):
    """Linear warm-up then cosine decay to 0 (paper: cosine)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup                         # linear warm-up to lr
    # cosine from lr (end of warm-up) to 0 (step = cfg.steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def backward_batches(model, be, codes, cap_ids, maskable, n_tok, accum, amp, cfg, device):
    """The gradients of one optimiser step: `accum` batches of (DLC, caption) sequences drawn
    from this rank's pairs, masked by the forward process, and the masked-diffusion loss.
    Returns the summed loss (a float)."""
    tot = 0.0
    for _ in range(accum):
        idx = torch.randint(len(codes), (cfg.batch_size,))  # (B,) pairs drawn with replacement from this rank's shard
        x0 = make_sequences(codes[idx], cap_ids[idx], be.dlc_offset, be.start_id).to(device)  # (B, T)
        # t ~ U(0, 1); each maskable token masked with probability p = (1 - eps) t + eps
        xt, masked, p = forward_process(x0, be.mask_id, cfg.eps, maskable.expand_as(x0),
                                        t=torch.rand(len(idx)).to(device))  # (B,) t, drawn on the CPU like idx
        with amp:
            # / accum: the summed gradients are the micro-batch mean
            loss = masked_diffusion_loss(model_logits(model, xt), x0, masked, p, n_tok) / accum
        loss.backward()  # grads add up over the accum micro-batches (DDP / FSDP sync at each backward)
        tot += loss.item()                                              # one host sync per micro-batch
    return tot


def train(cfg):
    """Finetune on (caption, DLC) pairs with the masked-diffusion loss (Sec. 6; LLaDA's SFT):
    every step draws sequences "DLC <START-DLC> caption", masks the DLC part (with --mask_mode
    all the caption too), and takes one AdamW step on Eq. 5 under a warm-up + cosine schedule.
    The backend glue (HF loading, FSDP2 / DDP, EMA, resume, checkpoints) is in TrainState below."""
    check_train_args(cfg)
    run_dir = os.path.join("runs", f"text2dlc-{cfg.run}")
    utils.check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    codes, caps, meta = load_captioned(cfg.dlc)
    L, V = int(meta["L"]), int(meta["V"])                               # code length and DLC vocabulary of the set
    resume, state = resumed_state(cfg, os.path.join(run_dir, "checkpoints"), L, V)
    d = utils.setup_dist(cfg.device)
    utils.seed_all(cfg.seed, d)  # seed * world + rank; DDP broadcasts rank 0's initial weights
    log = utils.Logger(run_dir, d)
    be = build_backend(dataclasses.asdict(cfg), L, V, caps, vocab=state["vocab"] if state else None)
    ts = TrainState(cfg, be, state, resume, d)                            # the model as trained, EMA, AdamW
    gb, accum = batch_split(cfg, d)                                     # global batch = batch_size x world x accum
    shard = torch.arange(d.rank, len(codes), d.world)                     # this rank's pairs
    cap_ids = be.encode(caps)                                             # (N, C) caption token ids
    my_codes, my_caps = codes[shard], cap_ids[shard]
    T, maskable, n_tok = sequence_layout(cfg, L, cap_ids.shape[1], d.device)  # T = L + 1 + C
    utils.start_run(run_dir, cfg, d)
    log(f"text2dlc {cfg.model}: {sum(p.numel() for p in ts.model.parameters()) / 1e6:.2f}M params/rank, "
        f"N={len(codes)} L={L} V={V} T={T} world={d.world} accum={accum} mask_mode={cfg.mask_mode} fsdp={ts.fsdp}")
    step = state["step"] if state else 0
    finite = utils.FiniteCheck(d.device)
    ts.model.train()
    t0 = time.perf_counter()
    while step < cfg.steps:
        for group in ts.opt.param_groups:
            group["lr"] = lr_at(step, cfg)  # set by hand each step: no scheduler state to checkpoint
        # every draw of a step (batches, t, masks) comes from (seed, step, rank): resuming replays exactly
        torch.manual_seed(cfg.seed * 1_000_003 + step * d.world + d.rank)
        loss = backward_batches(ts.model, be, my_codes, my_caps, maskable, n_tok, accum, ts.amp, cfg, d.device)
        # the total norm before clipping (logged)
        grad = torch.nn.utils.clip_grad_norm_(ts.model.parameters(), cfg.grad_clip)
        ts.opt.step()
        ts.opt.zero_grad(set_to_none=True)  # grads freed until the next step's first backward
        ts.update_ema()                                                 # tiny model only
        step += 1
        finite.step(loss, step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            finite.check()
            dt = (time.perf_counter() - t0) / cfg.log_every             # seconds per step since the last log line
            log(f"step {step:7d} | loss {mean_over_ranks(loss, d):.4f} | lr {lr_at(step - 1, cfg):.2e} "
                f"| grad {float(grad):.3f} | {1000 * dt:.1f} ms/step | {gb / dt:.1f} samples/s")
            t0 = time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            finite.check(ts.model.parameters())                           # never save a NaN model
            ts.save(os.path.join(run_dir, "checkpoints", f"ckpt_{step:07d}.pt"),
                    {"step": step, "config": dataclasses.asdict(cfg), "L": L, "V": V, "vocab": be.extra.get("vocab"),
                     "dlc": os.path.abspath(cfg.dlc), "data": meta.get("data")})
    log(f"done: {run_dir}")


def check_train_args(cfg):
    """Options that are wrong whatever the data: stop before anything is read or written."""
    if cfg.mask_mode not in ("all", "sft"):
        utils.fail(f"--mask_mode must be all or sft, got {cfg.mask_mode!r}")
    if cfg.model == "llada":
        check_model_folder(cfg.model_path)


def batch_split(cfg, d):
    """(global batch, gradient-accumulation steps): global batch = batch_size x world x accum."""
    gb = cfg.global_batch or cfg.batch_size * d.world                   # default: no accumulation
    accum = gb // (cfg.batch_size * d.world)
    if accum < 1 or accum * cfg.batch_size * d.world != gb:
        utils.fail(f"--global_batch {gb} is not a multiple of batch_size x world = {cfg.batch_size * d.world}")
    return gb, accum


#################################################################################
#                         Sampling command and attribute probe                  #
#################################################################################

def sample_cmd(s):
    """Draw --n DLCs for each prompt (in order) and write them as one DLC set with their captions;
    shapes prompts also give attrs.npy, the targets of `evaluate.py judge`."""
    prompts = check_sample_args(s)
    d = utils.setup_dist(s.device)
    be, state = load_for_sampling(s.ckpt, s.model_path) if s.ckpt else authors_backend(s.model_path, s.L)
    if "vocab" in be.extra:
        check_prompt_words(prompts, be.extra["vocab"])
    L, V = state["L"], state["V"]
    steps = s.steps or L                                                # default: one token committed per step
    if not 1 <= steps <= L:
        utils.fail(f"--steps must be in [1, L={L}], got {steps}")
    model = be.model.to(d.device).eval()
    if d.device.type == "cuda" and state["config"]["model"] == "llada":
        model.to(torch.bfloat16)                                        # LLaDA on GPU: bf16 weights halve the memory
    # one generator for every prompt and batch: --seed fixes the whole set
    g = torch.Generator(d.device).manual_seed(s.seed)
    out, captions = [], []
    for text in prompts:
        prompt = be.encode([text]).to(d.device)                           # (1, C)
        for i in range(0, s.n, s.batch_size):
            b = min(s.batch_size, s.n - i)                              # the last batch may be smaller
            with utils.autocast(d.device):                                # bf16 forwards; the sampler casts to fp64
                out.append(sample_dlc(lambda x: model_logits(model, x), prompt.expand(b, -1), L, V, be.dlc_offset,
                                      be.start_id, be.mask_id, steps, s.temperature, s.cfg, g,
                                      remasking=s.remasking).cpu())
        captions += [text] * s.n                                        # one caption per DLC
    codes = torch.cat(out).numpy()                                        # (len(prompts) * n, L)
    meta = {"L": L, "V": V, "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "checkpoint": os.path.abspath(utils.resolve_ckpt(s.ckpt) if s.ckpt else s.model_path),
            "command": "python text2dlc.py " + " ".join(sys.argv[1:]), "data": state.get("data"),
            "source_dlc": state.get("dlc"), "sampler": {"steps": steps, "temperature": s.temperature, "cfg": s.cfg,
                                                        "seed": s.seed, "remasking": s.remasking, "schedule": "linear"}}
    utils.save_dlc_set(s.out, codes, meta, captions=captions, extra=shapes_targets(captions), overwrite=s.overwrite)
    print(f"wrote {len(codes)} DLCs for {len(prompts)} prompt(s) to {s.out}")


def check_sample_args(s):
    """The prompts (from --prompt or --prompts_file), after checking every option that needs no model."""
    if s.prompts_file and not os.path.isfile(s.prompts_file):
        utils.fail(f"--prompts_file {s.prompts_file} does not exist")
    prompts = [p.strip() for p in open(s.prompts_file) if p.strip()] if s.prompts_file else [s.prompt] * bool(s.prompt)
    if not (s.ckpt or s.model_path) or not s.out or not prompts:
        utils.fail("sample needs --ckpt PATH (or the authors' --model_path DIR --L 512) --prompt TEXT "
                   "(or --prompts_file FILE) --out DIR")
    if not s.ckpt and s.L < 1:
        utils.fail("--model_path without --ckpt (the authors' folder) needs --L (their released model: --L 512)")
    utils.check_dlc_out(s.out, s.overwrite)                               # before any work
    if s.n < 1 or s.batch_size < 1:
        utils.fail(f"need --n >= 1 and --batch_size >= 1, got --n {s.n} --batch_size {s.batch_size}")
    return prompts


def check_prompt_words(prompts, vocab):
    """Tiny backend: words outside the training captions' vocabulary become <unk>, which the
    model cannot read; warn with them, and refuse a prompt that has no known word at all."""
    known = set(vocab) - set(SPECIALS)
    for text in prompts:
        words = text.lower().split()
        unknown = sorted({w for w in words if w not in known})
        if len(unknown) == len(set(words)):
            utils.fail(f"prompt {text!r}: none of its words occur in the training captions "
                       f"(e.g. {', '.join(sorted(known)[:8])}); rephrase it with those words")
        if unknown:
            print(f"warning: prompt {text!r}: words unknown to the model (read as <unk>): {', '.join(unknown)}",
                  file=sys.stderr, flush=True)


def parse_attrs(text):
    """(colour, shape, background) words of a shapes caption 'a red square on a green background',
    in the caption's word order (attrs.npy stores the indices as (shape, colour, background),
    see shapes_targets); None for any other caption."""
    m = re.match(r"a (\w+) (\w+) on a (\w+) background", text.strip().lower())  # (colour, shape, background)
    return m.groups() if m else None


def shapes_targets(captions):
    """{"attrs.npy": int64 (N, 3) (shape, colour, background) indices} when every caption names
    shapes attributes (the order of utils.make_shapes and evaluate.py judge), else None."""
    names, attrs = list(utils.COLOURS), [parse_attrs(c) for c in captions]
    if not all(a and a[1] in utils.SHAPES and a[0] in names and a[2] in names for a in attrs):
        return None
    return {"attrs.npy": np.array([(utils.SHAPES.index(shape), names.index(colour), names.index(background))
                                   for colour, shape, background in attrs], dtype=np.int64)}


def probe_cmd(p):
    """DLC-level judge (until the image chain is run): each generated code gets the majority
    attributes of its k Hamming-nearest reference codes; report the fraction matching the prompt."""
    gen = utils.load_dlc_set(p.dlc)
    ref_codes, ref_caps, _ = load_captioned(p.ref, L=gen["meta"]["L"], V=gen["meta"]["V"])
    wants = [parse_attrs(c) for c in gen.get("captions") or [gen["meta"].get("prompt", "")] * len(gen["codes"])]
    ref_attrs = [parse_attrs(c) for c in ref_caps]                        # (colour, shape, background) each
    if None in wants or None in ref_attrs:
        utils.fail("probe needs shapes-style captions ('a red square on a green background')")
    gc = torch.from_numpy(np.asarray(gen["codes"]).astype(np.int64))
    dist = (gc[:, None, :] != ref_codes[None]).sum(-1)                    # (Ng, Nr) Hamming
    nn_idx = dist.topk(p.k, largest=False).indices                        # (Ng, k)
    per, allm = [0, 0, 0], 0
    for row, want in zip(nn_idx.tolist(), wants):
        # majority per attribute; max over the neighbours in distance order breaks a tie by the nearest
        # (not over a set, whose order follows PYTHONHASHSEED and would differ from run to run)
        got = [max(v, key=v.count) for v in zip(*[ref_attrs[j] for j in row])]
        per = [a + (g == w) for a, g, w in zip(per, got, want)]         # hit counts of colour, shape, background
        allm += tuple(got) == want                                      # all three attributes right
    n = len(gc)
    res = {"prompt": gen["meta"]["prompt"], "n": n, "all_match": allm / n,
           "colour": per[0] / n, "shape": per[1] / n, "background": per[2] / n}
    print(json.dumps(res))
    return res


#################################################################################
#   Scale-up plumbing: Hugging Face LLaDA, vocabulary extension, FSDP2 / DDP,   #
#   the tiny model's EMA, resume and consolidated checkpoints                   #
#################################################################################

def import_transformers():
    try:
        import transformers
    except ImportError:
        utils.fail('--model llada needs transformers: pip install "transformers>=4.44,<5"')
    return transformers


def check_model_folder(model_path):
    if not model_path or not os.path.isfile(os.path.join(model_path, "config.json")):
        utils.fail(f"--model_path {model_path!r} is not a model folder with config.json; download "
                   "GSAI-ML/LLaDA-8B-Base (huggingface-cli download) and pass its local path")


def load_hf(model_path, dtype=torch.float32):
    """A local transformers model + tokenizer (no hub access). LLaDA's config.json maps
    AutoModel to its own LLaDAModelLM (trust_remote_code); plain causal LMs load as such."""
    check_model_folder(model_path)
    tf = import_transformers()
    kw = dict(trust_remote_code=True, local_files_only=True, torch_dtype=dtype)
    conf = json.load(open(os.path.join(model_path, "config.json")))
    if conf.get("embedding_size", 0) and conf.get("vocab_size", 0) > conf["embedding_size"]:
        kw["embedding_size"] = conf["vocab_size"]  # a resized LLaDA whose config was saved stale
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(model_path, **kw)
    except ValueError:  # config maps only AutoModel (remote code)
        model = tf.AutoModel.from_pretrained(model_path, **kw)
    tok = tf.AutoTokenizer.from_pretrained(model_path, trust_remote_code=True, local_files_only=True)
    return model, tok


def hf_mask_id(model, model_path):
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        utils.fail(f"{model_path}: config.json has no mask_token_id (LLaDA: 126336)")
    return mask_id


def llada_backend(cfg, V, model_path=None):
    """LLaDA (or any local HF model) with V DLC tokens + <START-DLC>: the vocabulary extended
    here, or already extended in the authors' finetuned folder. Captions padded with EOS."""
    path = model_path or cfg["model_path"]
    model, tok = load_hf(path)
    mask_id = hf_mask_id(model, path)
    found = authors_token_ids(tok)                                        # their folder: already extended
    if found is not None and found[2] != V:
        utils.fail(f"{path} has {found[2]} DLC tokens but the DLC set has V={V}")
    # (dlc_offset, start_id): the folder's own ids, or rows appended here by extend_vocab
    off, start = found[:2] if found else extend_vocab(model, V, seed=cfg["seed"])
    pad = tok.eos_token_id if tok.eos_token_id is not None else (tok.pad_token_id or 0)
    def encode(texts):  # LLaDA pads with EOS and trains on it (LLaDA's guidelines)
        ids = [tok(t, add_special_tokens=False)["input_ids"][: cfg["max_caption"]] for t in texts]
        # (B, max_caption), right-padded
        return torch.tensor([i + [pad] * (cfg["max_caption"] - len(i)) for i in ids], dtype=torch.long)
    return Backend(model, encode, mask_id, off, start, {"hf_config": model.config.to_dict()})


def _embeddings(model):
    """(input embedding, output layer) of an HF model; LLaDA keeps them at model.transformer.wte/ff_out."""
    t = getattr(getattr(model, "model", None), "transformer", None)      # LLaDA's layout
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = t.wte                                                     # LLaDA's input embedding
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None and t is not None:  # PreTrainedModel's default returns None: use ff_out itself
        out = getattr(t, "ff_out", None)
    return emb, out


def extend_vocab(model, V, seed=0, noise=0.02):
    """Add V DLC tokens and <START-DLC> after the old vocabulary. New rows (input and output)
    = mean of the old rows + N(0, (noise * std of old rows)^2): new tokens start as an
    'average word' rather than at random scale. Every old id and row stays bit-identical.
    Returns (dlc_offset, start_id)."""
    emb, out = _embeddings(model)
    old = emb.weight.shape[0]                                           # the old vocabulary size: the first new id
    g = torch.Generator().manual_seed(seed)  # its own generator: the same new rows on every rank
    def grow(w):                                                          # w (old, D) -> (old + V + 1, D)
        w = w.detach()
        # (V + 1, D): mean row + small noise, in fp32
        new = w.float().mean(0) + noise * w.float().std() * torch.randn(V + 1, w.shape[1], generator=g)
        return torch.cat([w, new.to(w.dtype)], 0)  # old rows unchanged, new rows appended in w's dtype
    emb.weight = nn.Parameter(grow(emb.weight))
    emb.num_embeddings = old + V + 1  # keep the module's attribute in step with its weight
    if out is not None and out.weight is not emb.weight:                  # untied (LLaDA-8B): grow it too
        out.weight = nn.Parameter(grow(out.weight))
        out.out_features = old + V + 1
        if getattr(out, "bias", None) is not None:
            out.bias = nn.Parameter(torch.cat([out.bias.detach(), out.bias.detach().mean().expand(V + 1)]))
    # why: the saved config must describe the new size or from_pretrained cannot reload it
    model.config.vocab_size = old + V + 1
    if hasattr(model.config, "embedding_size"):
        model.config.embedding_size = old + V + 1
    return old, old + V  # ids old .. old + V - 1 are DLC tokens, old + V is <START-DLC>


def hf_blocks(model):
    """The transformer blocks (the FSDP / checkpointing unit): LLaDA's transformer.blocks or
    a Llama-style model.layers."""
    for path in ("model.transformer.blocks", "model.layers", "transformer.blocks"):
        m = model
        try:
            for a in path.split("."):
                m = getattr(m, a)
            return list(m)
        except AttributeError:
            continue
    utils.fail(f"cannot find the transformer blocks of {type(model).__name__} for FSDP")


def enable_act_ckpt(model):
    """LLaDA: its own set_activation_checkpointing(whole_layer) (the HF gradient_checkpointing
    flag is ignored by its blocks); other HF models: gradient_checkpointing_enable; TinyMDLM: its flag."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "set_activation_checkpointing"):
        strategy = getattr(sys.modules[type(inner).__module__], "ActivationCheckpointingStrategy", None)
        inner.set_activation_checkpointing(strategy.whole_layer if strategy else "whole_layer")
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.act_ckpt = True


def shard_fsdp(model, d):
    """FSDP2: fully_shard every block, then the root (embeddings, head); bf16 compute and fp32
    gradient reduction; fp32 master weights stay sharded (4 bytes / param / world)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not torch.distributed.is_initialized():  # one process without torchrun: a world of 1
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl" if d.device.type == "cuda" else "gloo", rank=0, world_size=1)
    # all-gathered params in bf16 for compute; grads reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in hf_blocks(model):
        # one FSDP unit per block: its full weights exist only around its forward / backward
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the root unit: what the blocks leave (embeddings, final norm, head)
    return model


class TrainState:
    """The backend's model as the training step calls it, with its optimizer and EMA:
    FSDP2 (LLaDA on CUDA or several ranks) or DDP / torch.compile (utils.distribute), an EMA
    copy for the tiny model, AdamW; weights and optimizer restored from `state` on --resume.
    `model` is the wrapped network; checkpoints are saved consolidated and unwrapped."""
    def __init__(self, cfg, be, state, resume, d):
        model = be.model
        if state:
            utils.load_weights(model, state["model"], resume)
        # FSDP2 for LLaDA on CUDA or several ranks; otherwise DDP (several ranks) or the plain model
        fsdp = cfg.model == "llada" and (d.world > 1 or d.device.type == "cuda")
        if cfg.act_ckpt:
            enable_act_ckpt(model)
        model.to(d.device)
        ema = None
        if cfg.model == "tiny" and cfg.ema_decay > 0:
            ema = copy.deepcopy(model).eval().requires_grad_(False)       # EMA: a copy, always eval
            if state and state.get("ema"):
                utils.load_weights(ema, state["ema"], resume)
        if fsdp:
            model = shard_fsdp(model, d)
            model = torch.compile(model) if cfg.compile else model
        else:
            model = utils.distribute(model, d, cfg.compile)               # DDP with several ranks, compile
        # built after sharding: the AdamW states are sharded too
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        if state and state.get("opt") and not fsdp:
            utils.load_weights(opt, state["opt"], resume)
        elif state and state.get("opt"):  # FSDP: the saved full optimizer state is re-sharded
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, state["opt"], options=StateDictOptions(full_state_dict=True))
        self.cfg, self.d, self.model, self.ema, self.opt, self.fsdp = cfg, d, model, ema, opt, fsdp
        # bf16 autocast for DDP / one device (GPU or bf16 CPU); FSDP's MixedPrecisionPolicy casts by itself
        self.amp = utils.autocast(d.device, enabled=not fsdp)

    def update_ema(self):
        """After each optimizer step: the tiny model's EMA (the weights `sample` uses); LLaDA has none."""
        if self.ema is not None:
            utils.ema_update(self.ema, self.model, self.cfg.ema_decay)

    def full_state(self):
        """Consolidated fp32 state dict on rank 0 (FSDP gathers shards, offloaded to CPU)."""
        if not self.fsdp:
            return {k: v.detach().cpu() for k, v in utils.unwrap(self.model).state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # a collective: every rank calls it; with cpu_offload rank 0 gets the tensors
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, path, extra):
        """One consolidated checkpoint: every rank gathers (FSDP), rank 0 writes, every rank waits."""
        model, opt, ema, d = self.model, self.opt, self.ema, self.d
        sd = self.full_state()
        osd = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            # a collective, like full_state: rank 0 gets the full optimizer state
            osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif extra["config"]["model"] == "tiny":
            osd = opt.state_dict()
        if d.main:
            utils.save_checkpoint({"model": sd, "ema": ema.state_dict() if ema is not None else None, "opt": osd,
                                   **extra, "script": "text2dlc", "versions": {"torch": torch.__version__}}, path)
        if d.world > 1:
            torch.distributed.barrier()                                 # the other ranks wait until rank 0 has written


def mean_over_ranks(x, d):
    """The mean of a float over ranks (all-reduce only to log)."""
    t = torch.tensor([x], device=d.device)
    if d.world > 1:
        torch.distributed.all_reduce(t)
    return t.item() / d.world                                           # sum / world = mean


CKPT_KEYS = ("model", "ema", "L", "V", "config.model", "config.max_caption")   # what sample / resume read


def resumed_state(cfg, ck_dir, L, V):
    """(path, checkpoint) of the newest checkpoint with --resume, checked against the DLC set's L, V."""
    resume, state = utils.resume_checkpoint(ck_dir) if cfg.resume else (None, None)
    if state:
        state = utils.check_checkpoint(state, resume, "text2dlc", CKPT_KEYS + ("opt", "step"))
    if state and (state["L"], state["V"]) != (L, V):
        utils.fail(f"checkpoint {resume} has L={state['L']}, V={state['V']} but --dlc has L={L}, V={V}")
    return resume, state


def load_for_sampling(ckpt_path, model_path=""):
    """(backend with the checkpoint's EMA weights, or its weights without EMA; the checkpoint)."""
    state = utils.checkpoint_of(ckpt_path, "text2dlc", CKPT_KEYS)
    c = state["config"]
    be = build_backend(c, state["L"], state["V"], vocab=state.get("vocab"), model_path=model_path or None)
    utils.load_weights(be.model, state["ema"] or state["model"], ckpt_path)  # samplers use EMA weights
    utils.check_sampling_weights(be.model.state_dict(), ckpt_path)
    return be, state


#################################################################################
#          The authors' finetuned LLaDA folder (lavoies/DLC_LLADA_L512)         #
#################################################################################

# The authors' finetuning (dit/train_llada_sem_laion.py, dit/chat_sem.py in
# https://github.com/lavoiems/DiscreteLatentCode) adds the separator "<|start_sem|>" (as the sep
# token) and then "<|sem_vocab_i|>" for i < V: DLC value i has id id(<|start_sem|>) + 1 + i; their
# sampler tokenises "<|start_sem|>" + prompt with the tokenizer's own special tokens and puts the
# L masks before it.
AUTHORS_START, AUTHORS_DLC = "<|start_sem|>", "<|sem_vocab_{}|>"


def authors_token_ids(tok):
    """(dlc_offset, start_id, V) of a tokenizer that has the authors' tokens, else None."""
    vocab = tok.get_vocab()
    if AUTHORS_START not in vocab:
        return None
    ids = []
    while AUTHORS_DLC.format(len(ids)) in vocab:
        ids.append(vocab[AUTHORS_DLC.format(len(ids))])
    if not ids or ids != list(range(ids[0], ids[0] + len(ids))):        # the DLC ids must be one contiguous block
        utils.fail(f"the tokenizer has {AUTHORS_START} but its {AUTHORS_DLC.format('i')} ids are missing or not "
                   "consecutive; is this the authors' finetuned LLaDA folder?")
    return ids[0], vocab[AUTHORS_START], len(ids)


def authors_backend(model_path, L):
    """The authors' finetuned LLaDA folder, vocabulary already extended, used as it is (no
    conversion): (backend, a checkpoint-like dict with L, V and the config sample reads)."""
    model, tok = load_hf(model_path)
    found = authors_token_ids(tok)
    if found is None:
        utils.fail(f"{model_path}: its tokenizer has no {AUTHORS_START} token; pass --ckpt for our checkpoints")
    off, start, V = found
    mask_id = hf_mask_id(model, model_path)
    # their prompt: "<|start_sem|>" + text with the tokenizer's own special tokens (start_id None below)
    encode = lambda texts: torch.tensor([tok(AUTHORS_START + t)["input_ids"] for t in texts], dtype=torch.long)
    state = {"L": L, "V": V, "config": {"model": "llada", "model_path": model_path}, "data": None, "dlc": None}
    # start_id None: the separator is already in the prompt ids
    return Backend(model, encode, mask_id, off, None, {"start_id": start}), state


#################################################################################
#                        bench (throughput, memory, MFU)                        #
#################################################################################

def bench(cfg):
    """Training tokens/s, peak memory and MFU (FLOPs counted by torch on one step) of the tiny
    model, or with --model llama_shaped of LLaDA-8B's width with 2 layers under FSDP2 (GPU)."""
    d = utils.setup_dist(cfg.device)
    L, V, B = 16, 512, cfg.batch_size
    if cfg.model == "llama_shaped":                                       # random weights
        tf = import_transformers()
        vocab, T = 126464 + V + 1, L + 1 + 77  # a LLaDA-sized vocabulary extended by V + 1; 77 caption tokens
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                                                   num_key_value_heads=32, num_hidden_layers=2, vocab_size=vocab,
                                                   max_position_embeddings=4096))
        if cfg.act_ckpt:
            enable_act_ckpt(model)
        model = shard_fsdp(model.to(d.device), d)
    else:
        vocab, T = 64 + V + 1, L + 1 + cfg.max_caption                  # 64 stand-in words
        model = TinyMDLM(vocab, T, cfg.d_model, cfg.n_layers, cfg.n_heads).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nparam = sum(p.numel() for p in model.parameters()) * max(1, d.world if cfg.model == "llama_shaped" else 1)
    x0 = torch.randint(0, vocab, (B, T), device=d.device)               # (B, T) random ids: throughput only
    tiny_amp = cfg.model != "llama_shaped" and utils.fast_bf16(d.device)    # FSDP casts by its own policy

    def step():
        # mask id 2, eps 1e-3, every token maskable
        xt, m, p = forward_process(x0, 2, 1e-3, torch.ones_like(x0, dtype=torch.bool))
        with utils.autocast(d.device, tiny_amp):
            logits = model_logits(model, xt)
        masked_diffusion_loss(logits, x0, m, p, x0.numel()).backward()  # n_tokens = B * T
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()                                                                # warm-up
    dt, flops = utils.measure(step, d.device, 10)
    dtype = torch.bfloat16 if tiny_amp or (cfg.model == "llama_shaped" and d.device.type == "cuda") else torch.float32
    peak = utils.matmul_peak_flops(d.device, dtype)
    print(f"bench {cfg.model} on {d.device}: params {nparam / 1e6:.2f}M, batch {B} x {T} tokens, "
          f"{1000 * dt:.1f} ms/step, {B * T / dt:.0f} tokens/s, peak memory {utils.peak_memory_mb(d.device):.0f} MB, "
          f"MFU {flops / dt / peak:.1%} of measured {peak / 1e12:.2f} TFLOP/s ({dtype})")


COMMANDS = {"train": (train, Config, PRESETS), "sample": (sample_cmd, SampleConfig, None),
            "probe": (probe_cmd, ProbeConfig, None),
            "bench": (bench, BenchConfig, None)}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
