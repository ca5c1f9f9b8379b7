"""SEDD-absorb over DLC tokens: p(c) of the DLC paper (Lavoie et al. 2025, Section 4,
"Unconditional generation of DLC" and "Remasking DLC", Eq. 4; Appendix A).

A Discrete Latent Code is L tokens over a vocabulary of V. We learn p(c) with score entropy
discrete diffusion (Lou et al. 2024) on the absorbing graph: every token independently turns
into the mask token (index V) as t goes 0 -> 1, and a transformer (DDiT) learns the concrete
score s(x_t)[i, y] = p_t(x with x_i = y) / p_t(x_t) of un-masking position i to y. Sampling
runs the reverse process with Tweedie tau-leaping (or Euler), optionally with the paper's
remasking window. Facts come from the paper and from the public code of SEDD
(https://github.com/louaaron/Score-Entropy-Discrete-Diffusion: graph_lib.py, noise_lib.py,
losses.py, model/transformer.py, sampling.py, catsample.py), MDLM
(https://github.com/kuleshov-group/mdlm, caching, 1/t-weighted CE) and ReMDM (Wang et al.
2025, remasking posterior); every line here is written from the equations.

Commands (a DLC set is a folder written by `sem.py encode`):
  python sedd.py --dlc runs/dlc-shapes     # toy training on sem.py encode's set (5-6 min on a busy 2-core CPU)
  python sedd.py sample --ckpt runs/sedd-toy --n 4000 --out runs/dlc-sedd   # tau-leaping + remasking
  python sedd.py sample --ckpt runs/sedd-toy --given runs/dlc-shapes --keep 0-3,8 --n 100 --out runs/dlc-infill
  torchrun --nproc_per_node=8 sedd.py --preset imagenet512 --run_name in512 --dlc DLC512 --batch_size 64
  torchrun --nproc_per_node=8 sedd.py sample --preset imagenet --ckpt runs/sedd-in512 --num 50000 --out DLC512-gen
  python authors.py sedd --authors RUN_OR_HF_DIR --out sedd-authors.pt     # the authors' model, then sample it
  python sedd.py bench                                                      # tokens/s, memory, MFU
Sampling presets imagenet-1024 and imagenet-4096-remask (= imagenet) are the authors' gen_50k_sedd-1024_cfg-1.7.sh
and gen_50k_sedd-4096-remask.sh. Infilling (--given, --keep), design choices: docs/sedd.md.
"""
import dataclasses, math, os, sys, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import utils


@dataclass
class Config:
    run: str = "toy"             # run folder runs/sedd-<run>/
    dlc: str = ""                # DLC set folder (codes.npy + meta.json) to learn p(c) on
    L: int = 0                   # expected code length; 0 = take it from the DLC set
    V: int = 0                   # expected vocabulary (mask is V); 0 = from the DLC set
    resume: bool = False         # continue from the newest checkpoint of the run
    overwrite: bool = False      # replace an earlier run in the same folder (its checkpoints, config, log)
    seed: int = 0                # base seed (per rank: seed * world + rank, per step)
    device: str = "auto"         # auto | cpu | cuda | mps
    steps: int = 1200            # optimiser steps (paper: ~200 epochs of ImageNet = ~500k at 512)
    batch_size: int = 64         # per process (paper: 512 in total)
    compile: bool = False        # torch.compile the model
    size: str = "toy"            # toy | small (12 x 768) | medium (24 x 1024, the paper's) | DxdepthxH
    cond_dim: int = 128          # sigma-embedding width for adaLN (SEDD: 128)
    dropout: float = 0.1         # residual dropout (SEDD: 0.1)
    gelu: str = "exact"          # exact (erf, the toy: 3x faster on CPUs) | tanh (SEDD, imagenet, the authors)
    eps: float = 1e-3            # log-linear noise: mask probability (1 - eps) t
    lr: float = 1e-3             # AdamW, betas (0.9, 0.999), weight decay 0 (paper / SEDD: 3e-4; docs/LOG.md)
    warmup: int = 100            # linear warm-up steps then constant (paper: 2500)
    grad_clip: float = 1.0       # global grad-norm clip
    ema: float = 0.99            # EMA decay (paper 0.9999: its ~10k-step memory outlasts a toy run)
    holdout: float = 0.05        # fraction of the DLC set held out for the per-token loss
    eval_every: int = 500        # held-out loss every N steps (and at the end)
    ckpt_every: int = 500        # checkpoint every N steps (and at the end)
    POSITIVE = ("steps", "batch_size", "cond_dim", "eval_every", "ckpt_every")


SIZES = {"toy": (128, 2, 4), "small": (768, 12, 12), "medium": (1024, 24, 16)}  # (D, depth, heads)


def model_dims(size):
    """(D, depth, heads) of a named size, or of "DxdepthxH" (e.g. "32x2x4": what `authors.py sedd` writes
    for an authors' model whose shape has no name here)."""
    if size in SIZES:
        return SIZES[size]
    dims = size.split("x")
    if len(dims) != 3 or not all(p.isdigit() and int(p) > 0 for p in dims) or int(dims[0]) % (2 * int(dims[2])):
        utils.fail(f"unknown size {size!r}; use {', '.join(SIZES)} or DxdepthxH (D / H even, for rotary)")
    return tuple(int(p) for p in dims)


_PAPER = dict(size="medium", batch_size=512, lr=3e-4, warmup=2500, ema=0.9999, steps=500_000,
              eval_every=5000, ckpt_every=10000, gelu="tanh")
PRESETS = {"toy": {},
           # the paper's three DLC shapes, L * V = 131072; main = 512 x 256
           "imagenet512": {**_PAPER, "L": 512, "V": 256},
           "imagenet128": {**_PAPER, "L": 128, "V": 1024},
           "imagenet32": {**_PAPER, "L": 32, "V": 4096}}


@dataclass
class SampleConfig:
    ckpt: str = ""               # checkpoint .pt or run folder (EMA weights are used)
    n: int = 1000                # number of DLCs (split across torchrun ranks)
    out: str = ""                # output DLC set folder
    overwrite: bool = False      # replace an existing DLC set at --out
    sampler: str = "analytic"    # analytic (Tweedie tau-leaping) | euler
    steps: int = 128             # time steps from 1 to t_end (paper: 1024, or 4096 with remasking)
    eta: float = 0.01            # remasking probability per step in the window; 0 = off (docs/sedd.md)
    t0: float = 0.3              # remasking window start
    t1: float = 0.55             # remasking window end
    t_end: float = 1e-5          # last grid time, then a final denoising step to t = 0
    cache: bool = True           # reuse the network output when no token changed
    batch_size: int = 128        # DLCs per batch (on a CPU, 500 codes of 128 tokens per forward cost 1.35x
                                 # as much per code: their 65 MB activations fall out of every cache)
    seed: int = 0                # per-rank seed
    device: str = "auto"         # auto | cpu | cuda | mps
    given: str = ""              # infilling: DLC set whose row i % N gives sample i its kept tokens
    keep: str = ""               # infilling: positions kept from --given, e.g. "0-3,8"; the others are sampled
    POSITIVE = ("n", "steps", "batch_size")


# The authors' two Table 1 scripts (github.com/lavoiems/DiscreteLatentCode scripts/): 1024 analytic
# steps without remasking (gen_50k_sedd-1024_cfg-1.7.sh, the CFG 1.7 row) and 4096 steps with
# remasking eta 0.01 in (0.3, 0.55) (gen_50k_sedd-4096-remask.sh, the unguided row), batch 256.
# The paper's table states eta 1e-4: `--preset imagenet-4096-remask --eta 1e-4`.
SAMPLE_PRESETS = {"toy": {},
                  "imagenet-1024": {"sampler": "analytic", "steps": 1024, "eta": 0.0, "batch_size": 256},
                  "imagenet-4096-remask": {"sampler": "analytic", "steps": 4096, "eta": 0.01, "t0": 0.3, "t1": 0.55,
                                           "batch_size": 256}}
SAMPLE_PRESETS["imagenet"] = SAMPLE_PRESETS["imagenet-4096-remask"]   # the short name README.md uses


#################################################################################
#          Absorbing graph, log-linear noise, score entropy (SEDD Sec. 3)       #
#################################################################################

def log_linear_noise(t, eps):
    """sigma(t) = -log(1 - (1 - eps) t), dsigma/dt = (1 - eps) / (1 - (1 - eps) t).
    A token survives to time t with probability exp(-sigma) = 1 - (1 - eps) t."""
    sigma = -torch.log1p(-(1 - eps) * t)                                # sigma(t); log1p keeps precision near t = 0
    dsigma = (1 - eps) / (1 - (1 - eps) * t)                            # sigma'(t): the loss weight and the Euler rate
    return sigma, dsigma


def forward_mask(x0, sigma, V, generator=None):
    """x_t ~ q(x_t | x_0): each position becomes the mask V with probability 1 - exp(-sigma)."""
    p = -torch.expm1(-sigma)[:, None]                                   # (B, 1)
    u = torch.rand(x0.shape, generator=generator, device=x0.device)     # (B, L) one uniform per token
    return torch.where(u < p, torch.full_like(x0, V), x0)               # mask with probability p, else keep x0


def absorb_log_score(z, x, sigma, V):
    """Absorb parameterisation (SEDD model/transformer.py): log s = z - log(e^sigma - 1) - log V,
    and 0 at the current token. z = log(V p(x0 = y | x_t)) for the ideal network, so a zero
    output means a uniform guess. z: (B, L, V+1) float32; x: (B, L); sigma: (B,)."""
    # (B, L, V+1); the sigma term broadcasts over (L, V+1)
    log_s = z - torch.log(torch.expm1(sigma))[:, None, None] - math.log(V)
    return torch.scatter(log_s, -1, x[..., None], 0.0)  # log s = 0 (s = 1) at y = x_t: a state's ratio to itself


def score_entropy(log_score, x_t, x0, sigma, V):
    """Per-position score entropy on the absorbing graph (Lou et al. 2024, Eq. for absorb):
    at a masked position, with r = 1 / (e^sigma - 1) = p_t(unmasked)/p_t(masked) the true ratio,
        sum_{y != mask} s_y - r log s_{x0} + r (log r - 1),
    the last term K(r) making the minimum exactly 0 (reached at s_{x0} = r, s_y = 0 otherwise).
    Unmasked positions contribute 0 (they never move). Returns (B, L) float32."""
    log_score = log_score.float()
    r = 1.0 / torch.expm1(sigma)[:, None]                               # (B, 1)
    pos = log_score[..., :V].exp().sum(-1)                              # (B, L) sum over y != mask
    neg = r * log_score.gather(-1, x0[..., None]).squeeze(-1)           # (B, L)
    const = r * (torch.log(r) - 1)                                      # (B, 1) K(r)
    return torch.where(x_t == V, pos - neg + const, torch.zeros_like(pos))  # (B, L): only masked positions carry loss


def sedd_loss(model, x0, V, eps, generator=None):
    """L = E_t dsigma(t) sum_i score_entropy_i, t ~ U(eps, 1) (SEDD losses.py). Returns the
    per-sequence loss (B,) in nats: an upper bound on -log p(x0) (the diffusion ELBO)."""
    B = x0.shape[0]
    t = eps + (1 - eps) * torch.rand(B, generator=generator, device=x0.device)  # (B,) t ~ U(eps, 1), one per sequence
    sigma, dsigma = log_linear_noise(t, eps)
    x_t = forward_mask(x0, sigma, V, generator)                         # (B, L), masked tokens = V
    log_s = model(x_t, sigma)                                           # (B, L, V+1) float32
    # weight by sigma'(t), sum over positions: (B, L) -> (B,)
    return (dsigma[:, None] * score_entropy(log_s, x_t, x0, sigma, V)).sum(-1)


#################################################################################
#                  DDiT: pre-norm transformer with adaLN-Zero on sigma          #
#################################################################################

def rotary(x, base=10000.0):
    """Rotate the pairs (x[k], x[k + d/2]) of each head by the angle pos * base^(-2k/d) (the
    rotate-half pairing of GPT-NeoX, used by SEDD's model/rotary.py; RoFormer pairs neighbours,
    the same rotation after permuting q and k). Norms are unchanged and q.k depends on the
    relative position only. x: (B, H, L, d)."""
    L, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)   # (d/2,)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv             # (L, d/2)
    # angles in fp32, then cast to x's dtype (bf16 under autocast)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]                                             # (B, H, L, d/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)                       # (B, H, L, d)


def timestep_embedding(sigma, dim=256, max_period=10000):
    """Sinusoidal features of sigma (as in DiT / SEDD's TimestepEmbedder). (B,) -> (B, dim)."""
    # (dim/2,) from 1 down towards 1/max_period
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=sigma.device) / (dim // 2))
    args = sigma.float()[:, None] * freqs[None]                         # (B, dim/2); sigma in fp32 even under autocast
    return torch.cat([torch.cos(args), torch.sin(args)], -1)            # (B, dim)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]  # shift, scale (B, D) broadcast over the L positions


class DDiTBlock(nn.Module):
    """x + gate * Attn(modulate(LN(x))), then x + gate * MLP(modulate(LN(x))); the six
    modulation vectors come from the sigma embedding and start at zero (adaLN-Zero). The
    LayerNorms carry a weight and no bias, as in SEDD; qkv packs (three, heads, head_dim).
    gelu "tanh" is SEDD's tanh approximation of GELU, "exact" the erf form: they differ by at most
    5e-4, and torch's erf kernel is about 3x faster on CPUs."""
    def __init__(self, D, heads, cond_dim, dropout, gelu="tanh"):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(D, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)                      # q | k | v packed along the output dim
        self.proj = nn.Linear(D, D, bias=False)
        self.norm2 = nn.LayerNorm(D, bias=False)
        act = nn.GELU(approximate=utils.gelu_form(gelu))
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), act, nn.Linear(4 * D, D))  # D -> 4D -> D
        self.ada = nn.Linear(cond_dim, 6 * D)                           # six modulation vectors of width D from c
        nn.init.zeros_(self.ada.weight)                                     # adaLN-Zero: the block starts as identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):
        B, L, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, -1)               # 6 x (B, D)
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).chunk(3, -1)  # 3 x (B, L, D)
        q, k, v = (a.view(B, L, self.heads, D // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, H, L, d)
        q, k = rotary(q), rotary(k)
        a = utils.attention(q, k, v)                                          # (B, H, L, d), non-causal
        a = a.transpose(1, 2).reshape(B, L, D)                              # (B, L, D)
        # gated attention residual; g1 (B, D) -> (B, 1, D)
        x = x + g1[:, None] * F.dropout(self.proj(a), self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), sh2, sc2))                 # (B, L, D)
        return x + g2[:, None] * F.dropout(h, self.dropout, self.training)  # gated MLP residual, (B, L, D)


class DDiT(nn.Module):
    """Diffusion transformer over L tokens of V + 1 symbols. forward(x, sigma) -> log-scores
    (B, L, V+1) float32; raw(x, sigma) -> the unscaled output z (what the sampler caches)."""
    def __init__(self, L, V, size="toy", cond_dim=128, dropout=0.1, gelu="tanh"):
        super().__init__()
        D, depth, heads = model_dims(size)
        self.L, self.V = L, V
        self.embed = nn.Embedding(V + 1, D)                                 # untied from the output
        self.pos = nn.Parameter(torch.empty(L, D))                          # DLC positions carry meaning
        for w in (self.embed.weight, self.pos):  # SEDD's init: U(+-1/sqrt(D)), std 0.018 at D = 1024
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        # 256 sinusoidal features -> cond_dim
        self.sigma_mlp = nn.Sequential(nn.Linear(256, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.blocks = nn.ModuleList(DDiTBlock(D, heads, cond_dim, dropout, gelu) for _ in range(depth))
        self.norm = nn.LayerNorm(D, bias=False)
        self.ada = nn.Linear(cond_dim, 2 * D)                           # final shift and scale
        self.out = nn.Linear(D, V + 1)  # one output per symbol: the V tokens and the mask
        for m in (self.ada, self.out):  # zero output at init: uniform p(x0 | x_t)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def raw(self, x, sigma):
        c = F.silu(self.sigma_mlp(timestep_embedding(sigma)))               # (B, cond)
        h = self.embed(x) + self.pos                                        # (B, L, D)
        for blk in self.blocks:
            h = blk(h, c)                                               # (B, L, D)
        shift, scale = self.ada(c).chunk(2, -1)                         # 2 x (B, D)
        return self.out(modulate(self.norm(h), shift, scale)).float()       # (B, L, V+1) fp32 island

    def forward(self, x, sigma):
        return absorb_log_score(self.raw(x, sigma), x, sigma, self.V)   # (B, L, V+1) log-scores


def bf16_raw(model, device):
    """raw_fn(x, sigma) for the sampler: model.raw under utils.autocast(device) (bf16 matmuls on
    CUDA and bf16 CPUs (utils.fast_bf16); the network output stays float32)."""
    def raw_fn(x, sigma):
        with utils.autocast(device):
            return model.raw(x, sigma)                                  # bf16 matmuls; raw's .float() returns z in fp32
    return raw_fn


#################################################################################
#        Sampling: Tweedie tau-leaping / Euler, remasking window, caching       #
#################################################################################

def sample_categorical(probs, generator=None):
    """Draw from unnormalised probabilities in float64 (exponential race: argmax p / E,
    E ~ Exp(1)). float32 noise would sharpen the draw (a lower effective temperature)."""
    # float64 uniforms; E = -log1p(-u) ~ Exp(1) below
    u = torch.rand(probs.shape, dtype=torch.float64, generator=generator, device=probs.device)
    return (probs.double() / -torch.log1p(-u)).argmax(-1)  # P(argmax_y p_y / E_y = y) = p_y / sum(p)


def step_rate(sampler, t, s, eps):
    """(sigma(t), r) for a reverse step t -> s, where P(mask -> y) = r s_y (see sample)."""
    sig_t, dsig_t = log_linear_noise(torch.tensor(t, dtype=torch.float64), eps)  # sigma(t), sigma'(t) in float64
    if sampler == "analytic":  # r = e^(sigma(t) - sigma(s)) - 1
        return sig_t, torch.expm1(sig_t - log_linear_noise(torch.tensor(s, dtype=torch.float64), eps)[0]).item()
    if sampler == "euler":     # r = (t - s) sigma'(t)
        return sig_t, (t - s) * dsig_t.item()
    utils.fail(f"unknown sampler {sampler!r}; use analytic or euler")


class CachedScores:
    """scores(x, sigma) -> s_y (n, L, V) in float64 at noise sigma. The network runs only on the
    rows that changed since their last forward (the sampler marks them in `stale`): reusing z and
    re-applying the exact sigma scaling is exact for the ideal network (docs/sedd.md, Caching).
    counts: row-forwards run and saved, summed over rows."""
    def __init__(self, raw_fn, n, L, V, cache, device):
        self.raw_fn, self.V, self.cache, self.device = raw_fn, V, cache, device
        self.z = torch.zeros(n, L, V + 1, device=device)                 # the last network output per row
        self.stale = torch.ones(n, dtype=torch.bool, device=device)      # rows whose x changed
        self.counts = {"forwards": 0, "saved": 0}

    def __call__(self, x, sigma):
        V, n = self.V, len(x)
        need = x.eq(V).any(-1) & (self.stale | (not self.cache))         # rows with masks and a stale z
        if need.any():
            rows = need.nonzero().squeeze(1)                            # indices of the rows to recompute
            # (rows, L, V+1): fresh z at this step's sigma
            self.z[rows] = self.raw_fn(x[rows], torch.full((len(rows),), float(sigma), device=self.device)).float()
            self.stale[rows] = False
        self.counts["forwards"] += int(need.sum())                      # rows that ran the network
        self.counts["saved"] += int((x.eq(V).any(-1) & ~need).sum())    # rows with masks served from the cache
        # (n, L, V) float64 scores s_y; [..., :V] drops the mask column
        return absorb_log_score(self.z.double(), x, sigma.to(self.device).expand(n), V)[..., :V].exp()


@torch.no_grad()
def sample(raw_fn, n, L, V, steps=128, sampler="analytic", eta=0.0, t0=0.3, t1=0.55, eps=1e-3,
           t_end=1e-5, cache=True, generator=None, device="cpu", trace=None, given=None, keep=None):
    """Reverse the absorbing process from all-mask at t = 1 down to t_end on a uniform grid,
    then denoise the masks left. raw_fn(x, sigma) -> z with log s = absorb_log_score(z, ...).
      analytic (Tweedie tau-leaping), d = sigma(t) - sigma(s):
          P(mask -> y) = (e^d - 1) s_y,  P(stay masked) = 1 - (e^d - 1) sum_y s_y
      euler: P(mask -> y) = (t - s) dsigma(t) s_y   (the same numbers for log-linear noise)
      remasking (paper Eq. 4) when t0 < t < t1: each token unmasked at t is masked again with
          probability eta, and masked tokens step to s' = s - eta (1 - t) instead of s, which keeps
          the expected masked fraction on (1 - eps) t (ReMDM's posterior with a_t = 1 - t).
      infilling, given (n, L) tokens and keep (L,) bool: the kept positions start at the given
          tokens, so the reverse process never moves them, and remasking skips them: they equal the
          given tokens after every step (SEDD's projection, by construction) while the network sees
          them, and the free positions are drawn from p(x_free | x_kept).
    trace(step, t_next, x) is called after every step (tests check q_t). Returns (codes, stats)."""
    x = torch.full((n, L), V, dtype=torch.long, device=device)          # (n, L) all masked at t = 1
    free = torch.ones(L, dtype=torch.bool, device=device)             # positions the sampler draws
    if keep is not None:
        free = ~keep.to(device)
        x = torch.where(free, x, given.to(device))  # kept positions start (and stay) at the given tokens
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)   # (steps + 1,) times from 1 down to t_end
    log_scores = CachedScores(raw_fn, n, L, V, cache, device)
    for i in range(steps):
        t, s = grid[i].item(), grid[i + 1].item()
        remask = eta > 0 and t0 < t < t1                                # inside the remasking window
        # s' = s - eta (1 - t): masks step further to offset the remasked tokens
        s_eff = max(s - eta * (1 - t), 0.0) if remask else s
        sig_t, rate = step_rate(sampler, t, s_eff, eps)                 # P(mask -> y) = rate * s_y
        masked = x == V                                                 # (n, L) bool
        x_new = x
        if masked.any():
            move = rate * log_scores(x, sig_t)                                 # (n, L, V)
            stay = (1 - move.sum(-1, keepdim=True)).clamp_min(0)               # (n, L, 1)
            new = sample_categorical(torch.cat([move, stay], -1), generator)   # index V = stay masked
            x_new = torch.where(masked, new, x)                         # only masked positions move
        if remask:  # decisions from x_t: tokens unmasked in this very step are kept
            u = torch.rand(x.shape, dtype=torch.float64, generator=generator, device=device)
            x_new = torch.where(~masked & free & (u < eta), torch.full_like(x, V), x_new)
        log_scores.stale |= (x_new != x).any(-1)                        # rows that changed need a fresh forward
        x = x_new
        if trace is not None:
            trace(i, s, x)
    masked = x == V  # final denoise t_end -> 0: p(x0 | x_t) over the V real tokens
    if masked.any():
        # (n, L, V) at sigma(t_end); no stay option: every mask is filled
        s_y = log_scores(x, log_linear_noise(torch.tensor(t_end, dtype=torch.float64), eps)[0])
        x = torch.where(masked, sample_categorical(s_y, generator), x)
    return x, log_scores.counts


def oracle_raw_fn(joint, V):
    """Exact z for a small known joint table p(x) of shape (V,) * L: for each masked position,
    z = log(V p(x0_i = y | unmasked tokens of x_t)) (the posterior given the visible tokens).
    Used by the tests; a product of categoricals is the special case of an outer product."""
    L = joint.dim()
    # (V^L, L): every joint state
    states = torch.cartesian_prod(*[torch.arange(V)] * L).view(-1, L) if L > 1 else torch.arange(V)[:, None]
    w = joint.reshape(-1).double()                                         # (V^L,)
    def raw_fn(x, sigma):
        ok = ((x[:, None, :] == V) | (x[:, None, :] == states[None])).all(-1)   # (B, V^L) consistent
        post = ok * w[None]  # (B, V^L) unnormalised posterior over consistent states
        post = post / post.sum(-1, keepdim=True)
        marg = torch.stack([post @ F.one_hot(states[:, i], V).double() for i in range(L)], 1)  # (B, L, V)
        z = torch.log(marg.clamp_min(1e-300)) + math.log(V)  # z = log(V p): absorb_log_score subtracts log V again
        return torch.cat([z, torch.zeros_like(z[..., :1])], -1).float()    # (B, L, V+1)
    return raw_fn


#################################################################################
#                    Training: AdamW, warm-up, EMA, DDP, resume                 #
#################################################################################

@torch.no_grad()
def heldout_loss(model, codes, V, eps, device, batch=256, seed=1234):
    """Held-out score-entropy bound in nats per token, with fixed noise so evaluations compare."""
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for i in range(0, len(codes), batch):
        x0 = torch.as_tensor(codes[i:i + batch], device=device)         # (b, L)
        total += sedd_loss(model, x0, V, eps, generator=g).sum().item()  # summed nats of the b sequences
    return total / codes.size                                           # per token: codes.size = N * L


_perm_cache = {}   # {(seed, epoch, N): that epoch's permutation}: one epoch at a time


def batch_indices(step, rank, world, B, N, seed):
    """Rows for (step, rank): epoch-wise permutations read in order, each rank taking its own
    slice (what DistributedSampler does), and a pure function of step so --resume is exact."""
    pos = (step * world + rank) * B + np.arange(B)                     # global sample counter
    epoch, k = pos // N, pos % N                                        # (B,) epoch and position inside it
    out = np.empty(B, dtype=np.int64)
    for e in np.unique(epoch):
        if (seed, e, N) not in _perm_cache:
            _perm_cache.clear()                                         # hold one permutation at a time
            # depends on (seed, epoch) only: the same on every rank
            _perm_cache[(seed, e, N)] = np.random.RandomState(seed * 7919 + int(e)).permutation(N)
        out[epoch == e] = _perm_cache[(seed, e, N)][k[epoch == e]]
    return out


def build_for_training(cfg, run_dir, d):
    """Model, EMA copy and AdamW, from the newest checkpoint with --resume (its L, V checked
    against the DLC set's). Returns (model, ema, opt, first step)."""
    ck_path, ck = utils.resume_checkpoint(os.path.join(run_dir, "checkpoints")) if cfg.resume else (None, None)
    if ck is not None:
        ck = utils.check_checkpoint(ck, ck_path, "sedd", ("model", "ema", "opt", "step", "config.L", "config.V"))
    if ck is not None and (ck["config"]["L"], ck["config"]["V"]) != (cfg.L, cfg.V):
        utils.fail(f"checkpoint {ck_path} was trained with L={ck['config']['L']} V={ck['config']['V']} "
                   f"but {cfg.dlc} has L={cfg.L} V={cfg.V}; use a matching DLC set or a new --run")
    was = ck["config"].get("gelu", "tanh") if ck is not None else cfg.gelu           # absent: tanh (older runs)
    if was != cfg.gelu:
        utils.fail(f"checkpoint {ck_path} was trained with --gelu {was}; resume with --gelu {was}")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DDiT(cfg.L, cfg.V, cfg.size, cfg.cond_dim, cfg.dropout, cfg.gelu).to(d.device)
    ema = DDiT(cfg.L, cfg.V, cfg.size, cfg.cond_dim, cfg.dropout, cfg.gelu).to(d.device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())  # EMA starts as a copy and stays in eval mode
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=d.device.type == "cuda")
    if ck is None:
        return model, ema, opt, 0
    for part, key in ((model, "model"), (ema, "ema"), (opt, "opt")):
        utils.load_weights(part, ck[key], ck_path)
    return model, ema, opt, ck["step"]


def save_state(run_dir, step, model, ema, opt, cfg, meta, d):
    """runs/sedd-<run>/checkpoints/ckpt_<step>.pt, written by rank 0 while the others wait."""
    if d.main:
        utils.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "step": step, "config": dataclasses.asdict(cfg), "dlc_meta": meta, "script": "sedd",
                               "versions": {"torch": torch.__version__}},
                              os.path.join(run_dir, "checkpoints", f"ckpt_{step:07d}.pt"))
    if d.world > 1:
        dist.barrier()                                                  # the other ranks wait for the file


def load_codes(cfg):
    """The --dlc set, read before anything is written (load_dlc_set checks its L and V against
    --L / --V and every token < V); cfg with the set's L and V; the last `holdout` fraction of the
    rows (none under 20 rows) held out for the per-token loss.
    Returns (cfg, train codes, held-out codes, the set's meta); codes are int64 (N, L)."""
    if not cfg.dlc:
        utils.fail("no DLC set given; pass --dlc DIR (from sem.py encode)")
    s = utils.load_dlc_set(cfg.dlc, L=cfg.L or None, V=cfg.V or None)
    codes, meta = np.asarray(s["codes"], dtype=np.int64), s["meta"]
    cfg = dataclasses.replace(cfg, L=int(meta["L"]), V=int(meta["V"]))
    n_hold = int(len(codes) * cfg.holdout) if len(codes) >= 20 else 0
    return cfg, codes[:len(codes) - n_hold], codes[len(codes) - n_hold:], meta  # train rows first, held-out rows last


def log_step(log, step, loss, gnorm, lr, t_start, cfg, d, finite):
    """The step line: loss in nats per token and grad norm, averaged over ranks (all-reduce only
    to log); the NaN check rides on the sync that the line needs anyway."""
    stat = torch.stack([loss.detach() / cfg.L, gnorm.detach()])         # (2,) loss per token, grad norm
    if d.world > 1:
        dist.all_reduce(stat)
        stat /= d.world                                                 # mean over ranks
    utils.sync(d.device)
    finite.check()
    ms = (time.perf_counter() - t_start) * 1000
    log(f"step {step + 1:7d} | loss {stat[0].item():.4f} | lr {lr:.2e} | grad {stat[1].item():.3f} | "
        f"{ms:7.1f} ms/step | {cfg.batch_size * d.world / ms * 1000:8.0f} samples/s")


def train(cfg):
    model_dims(cfg.size)  # a bad --size fails here, before anything is written
    d = utils.setup_dist(cfg.device)
    run_dir = os.path.join("runs", f"sedd-{cfg.run}")
    utils.check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    cfg, train_codes, held, meta = load_codes(cfg)
    model, ema, opt, start = build_for_training(cfg, run_dir, d)
    log = utils.Logger(run_dir, d)
    utils.start_run(run_dir, cfg, d)
    if d.main:
        log(f"sedd: L={cfg.L} V={cfg.V} size={cfg.size} params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"train={len(train_codes)} held-out={len(held)} world={d.world} device={d.device} start={start}")
    net = utils.distribute(model, d, cfg.compile)                         # DDP / compile; saves use model
    finite = utils.FiniteCheck(d.device, "lower --lr (or raise --warmup)")

    for step in range(start, cfg.steps):
        t_start = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step * d.world + d.rank)  # t, masks, dropout: resumable
        idx = batch_indices(step, d.rank, d.world, cfg.batch_size, len(train_codes), cfg.seed)
        x0 = torch.as_tensor(train_codes[idx], device=d.device)            # (B, L)
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))            # linear warm-up, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        with utils.autocast(d.device):
            loss = sedd_loss(net, x0, cfg.V, cfg.eps).mean()               # per sequence, as in SEDD
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # the norm before clipping (logged)
        opt.step()
        utils.ema_update(ema, model, cfg.ema)  # ema <- decay * ema + (1 - decay) * model, after every step
        finite.step(loss, step + 1)
        log_step(log, step, loss, gnorm, lr, t_start, cfg, d, finite)
        last = step + 1 == cfg.steps
        if len(held) and d.main and ((step + 1) % cfg.eval_every == 0 or last):
            with utils.autocast(d.device):
                # rank 0 evaluates the EMA weights
                log(f"held-out loss (EMA) {heldout_loss(ema, held, cfg.V, cfg.eps, d.device):.4f} nats/token")
        if (step + 1) % cfg.ckpt_every == 0 or last:
            finite.check(model.parameters())                               # never save a NaN model
            save_state(run_dir, step + 1, model, ema, opt, cfg, meta, d)
    return run_dir


#################################################################################
#                  Sample command: a DLC set of generated codes                 #
#################################################################################

def parse_positions(spec, L):
    """ "0-3,8" -> a (L,) bool mask of the positions named (ranges inclusive)."""
    keep = torch.zeros(L, dtype=torch.bool)
    try:
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")                       # "a-b" or a single "a"
            a, b = int(a), int(b or a)                                  # no "-b": the range a..a
            if not 0 <= a <= b < L:
                raise ValueError
            keep[a:b + 1] = True
    except ValueError:
        utils.fail(f"--keep {spec!r} is not a list of positions in [0, {L}) such as 0-3,8")
    if keep.all():
        utils.fail(f"--keep {spec!r} keeps all {L} positions; nothing is left to sample")
    return keep


def load_given(sc, cfg):
    """Infilling: the --given set (same L and V as the model) and the --keep positions, checked
    before sampling. Returns (the set, its codes (N, L) int64, keep (L,) bool)."""
    gset = utils.load_dlc_set(sc.given, L=cfg["L"], V=cfg["V"])          # also checks every token < V
    return gset, np.asarray(gset["codes"], dtype=np.int64), parse_positions(sc.keep, cfg["L"])


def gather_rows(codes, ids, fw, saved, world):
    """Every rank's sampled rows on every rank (small: N x L uint16), back in row order, and the
    summed forward counts."""
    parts = [None] * world
    dist.all_gather_object(parts, (codes.astype(np.uint16), ids, fw, saved))  # uint16 codes: a quarter of int64's bytes
    # rank r sampled rows r, r + world, ...: back to 0..n-1
    order = np.argsort(np.concatenate([p[1] for p in parts]), kind="stable")
    return (np.concatenate([p[0] for p in parts])[order], sum(p[2] for p in parts), sum(p[3] for p in parts))


def check_sample_args(sc):
    """Bad flags stop with one line before any work, and before --out is touched."""
    if not sc.ckpt or not sc.out or sc.sampler not in ("analytic", "euler"):
        utils.fail("sample needs --ckpt (a .pt or run folder), --out DIR and --sampler analytic|euler")
    if sc.n < 1 or sc.steps < 1 or not 0 <= sc.eta < 1 or not 0 <= sc.t0 < sc.t1 <= 1:
        utils.fail("need --n >= 1, --steps >= 1, 0 <= --eta < 1 and 0 <= --t0 < --t1 <= 1")
    utils.check_dlc_out(sc.out, sc.overwrite)
    if bool(sc.given) != bool(sc.keep):
        utils.fail("infilling needs both --given DLCSET and --keep POSITIONS (e.g. --keep 0-3,8)")


def write_samples(sc, ck, path, codes, gset, keep, fw, saved, secs):
    """The generated DLC set: codes, meta (command, checkpoint, sampler flags, forward counts,
    TV distance to the training codes when that set is still there) and, when infilling, the
    given rows' labels."""
    cfg = ck["config"]
    stats = {"forwards_per_dlc": fw / sc.n, "forwards_saved_per_dlc": saved / sc.n, "dlcs_per_s": sc.n / secs}
    meta = {"L": cfg["L"], "V": cfg["V"], "command": " ".join(["sedd.py"] + sys.argv[1:]), "checkpoint": path,
            "source": cfg["dlc"], "data": ck.get("dlc_meta", {}).get("data"),
            "sampler": dataclasses.asdict(sc), "stats": stats}
    labels = None
    if sc.given:  # row j keeps the tokens of row j % N of the given set (and takes its label)
        n_given = len(gset["codes"])
        meta["infill"] = {"given": sc.given, "keep": sc.keep, "kept_positions": keep.nonzero().squeeze(1).tolist(),
                          "rows": "row j of codes.npy keeps the tokens of row j % N of the given set"}
        # the given row's label for each sample
        labels = gset["labels"][np.arange(sc.n) % n_given] if "labels" in gset else None
    if cfg["dlc"] and os.path.isfile(os.path.join(cfg["dlc"], "codes.npy")):  # distance to the training codes
        ref = np.asarray(utils.load_dlc_set(cfg["dlc"])["codes"], dtype=np.int64)
        meta["tv"] = {"marginal": utils.tv_marginals(ref, codes.astype(np.int64), cfg["V"]),
                      "pairs": utils.tv_pairs(ref, codes.astype(np.int64), cfg["V"])}
    utils.save_dlc_set(sc.out, codes, meta, labels=labels, overwrite=sc.overwrite)
    tv = f" | TV marginal {meta['tv']['marginal']:.4f} pairs {meta['tv']['pairs']:.4f}" if "tv" in meta else ""
    print(f"wrote {sc.n} DLCs to {sc.out} | {stats['dlcs_per_s']:.1f} DLCs/s | forwards per DLC "
          f"{stats['forwards_per_dlc']:.1f} of {sc.steps + 1} (saved {stats['forwards_saved_per_dlc']:.1f}){tv}",
          flush=True)


def sample_main(sc):
    """`sedd.py sample`: n DLCs from the EMA network, in batches, split across torchrun ranks."""
    check_sample_args(sc)
    path = utils.resolve_ckpt(sc.ckpt)
    ck = utils.checkpoint_of(path, "sedd", ("ema", *(f"config.{k}" for k in ("L", "V", "size", "cond_dim", "dropout"))))
    cfg = ck["config"]
    gset, given, keep = load_given(sc, cfg) if sc.given else (None, None, None)
    d = utils.setup_dist(sc.device)
    model = DDiT(cfg["L"], cfg["V"], cfg["size"], cfg["cond_dim"], cfg["dropout"],
                 cfg.get("gelu", "tanh")).to(d.device).eval()                # absent: tanh (older checkpoints)
    utils.load_weights(model, ck["ema"], path)  # samplers use the EMA weights
    utils.check_sampling_weights(model.state_dict(), path)
    # per-rank seed: ranks draw different codes
    g = torch.Generator(device=d.device).manual_seed(sc.seed * d.world + d.rank)
    raw_fn = bf16_raw(model, d.device)
    ids = np.arange(d.rank, sc.n, d.world)                                 # this rank's share of the rows
    out, fw, saved, start = [], 0, 0, time.perf_counter()
    for b in tqdm(range(0, len(ids), sc.batch_size), disable=not d.main, desc="sampling"):
        rows = ids[b:b + sc.batch_size]                                 # global row ids of this batch
        # sample j keeps the tokens of given row j % N
        kept = dict(given=torch.as_tensor(given[rows % len(given)]), keep=keep) if sc.given else {}
        x, st = sample(raw_fn, len(rows), cfg["L"], cfg["V"], steps=sc.steps, sampler=sc.sampler, eta=sc.eta,
                       t0=sc.t0, t1=sc.t1, eps=cfg["eps"], t_end=sc.t_end, cache=sc.cache, generator=g,
                       device=d.device, **kept)
        out.append(x.cpu().numpy())
        fw += st["forwards"]
        saved += st["saved"]
    codes = np.concatenate(out) if out else np.zeros((0, cfg["L"]), np.int64)   # (n on this rank, L)
    if d.world > 1:
        codes, fw, saved = gather_rows(codes, ids, fw, saved, d.world)     # (n, L) on every rank
    if d.main:
        write_samples(sc, ck, path, codes, gset, keep, fw, saved, time.perf_counter() - start)


#################################################################################
#                        bench (throughput, memory, MFU)                        #
#################################################################################

@dataclass
class BenchConfig(Config):
    """bench: the train config's model, timed for a few steps, then sampling."""
    bench_iters: int = 10        # timed training iterations
    bench_n: int = 64            # DLCs sampled
    bench_steps: int = 128       # sampling steps
    POSITIVE = Config.POSITIVE + ("bench_iters", "bench_n", "bench_steps")


def bench(cfg):
    """Training tokens/s, ms/step, peak memory and MFU at cfg's size, then sampling DLCs/s."""
    d = utils.setup_dist(cfg.device)
    L, V = cfg.L or 16, cfg.V or 32
    model = DDiT(L, V, cfg.size, cfg.cond_dim, cfg.dropout, cfg.gelu).to(d.device)
    net = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=d.device.type == "cuda")
    x0 = torch.randint(V, (cfg.batch_size, L), device=d.device)         # (B, L) random codes: throughput only

    def it(net=net):  # one training step
        with utils.autocast(d.device):
            loss = sedd_loss(net, x0, V, cfg.eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    it()                                                                   # warm-up (and compilation)
    secs, flops = utils.measure(it, d.device, cfg.bench_iters, count=lambda: it(model))
    tok_s = cfg.batch_size * L / secs
    # peak FLOP/s in the dtype the training matmuls use
    peak = utils.matmul_peak_flops(d.device, torch.bfloat16 if utils.fast_bf16(d.device) else torch.float32)
    print(f"train: size={cfg.size} L={L} V={V} batch={cfg.batch_size} | {tok_s:,.0f} tokens/s | "
          f"{secs * 1000:.1f} ms/step | peak mem {utils.peak_memory_mb(d.device):,.0f} MB | "
          f"MFU {flops / secs / peak:.1%} of measured peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    model.eval()
    utils.sync(d.device)
    t = time.perf_counter()
    # bf16 forwards, as sample_main runs the sampler
    _, st = sample(bf16_raw(model, d.device), cfg.bench_n, L, V, cfg.bench_steps, device=d.device)
    utils.sync(d.device)
    secs = time.perf_counter() - t
    fw = st["forwards"] / cfg.bench_n  # network row-forwards per DLC (caching skips some)
    print(f"sample: {cfg.bench_n} DLCs, {cfg.bench_steps} steps | {cfg.bench_n / secs:.2f} DLCs/s | forwards per "
          f"DLC {fw:.1f} ({fw / (cfg.bench_steps + 1):.2f} per step) [untrained weights]", flush=True)


COMMANDS = {"train": (train, Config, PRESETS), "sample": (sample_main, SampleConfig, SAMPLE_PRESETS),
            "bench": (bench, BenchConfig, utils.presets_for(PRESETS, BenchConfig))}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
