"""DiT conditioned on Discrete Latent Codes: p(x | c), the baselines, classifier-free guidance
and DLC composition (paper Sections 4-5, 5.1, 5.2, Appendix E).

The image model is the DiT of Peebles & Xie (2023) with its label embedder swapped for an
embedding of the DLC: a table of shape (L, V+1, D), one vocabulary per position, whose L
embedded tokens are averaged and added to the timestep embedding (Sec. 4, "We embed the
tokens ... These embedded tokens are averaged"). Index V is a drop token that stands for
"no code" and trains the unconditional model used by classifier-free guidance.
Baselines with the same backbone: `label` (the official label embedder), `embedding` (a
continuous SSL embedding through a linear layer: the DINOv2 / RCG style baseline), `none`.

Facts from facebookresearch/DiT (models.py, diffusion/gaussian_diffusion.py, respace.py,
sample.py, https://github.com/facebookresearch/DiT) and the authors' fork
(https://github.com/lavoiems/DiscreteLatentCode, dit/models.py: SEMEmbedder, ContEmbedder;
read for facts, code written here). Equations: DDPM = Ho et al. 2020, IDDPM = Nichol &
Dhariwal 2021, DDIM = Song et al. 2021, CFG = Ho & Salimans 2022.

Key commands (every sub-command, the paper-scale recipe and the authors' checkpoints: docs/dit.md):
  python dit.py train --cond dlc --dlc runs/dlc-shapes          # toy: 16 px shapes, minutes on a CPU
  python dit.py sample --ckpt runs/dit-toy --dlc runs/dlc-shapes --n 64 --cfg_scale 4 --out samples.npz
  python dit.py compose --ckpt runs/dit-toy --dlc runs/dlc-shapes --pairs 0:1,2:3 --cfg_scale 4 --out compose.npz
  torchrun --nproc_per_node=8 dit.py -- --preset imagenet --latents /data/in256-latents --dlc /data/dlc512
  python authors.py dit --authors <their checkpoint_<i>/ or Hugging Face folder> --out dit_authors.pt
"""
import dataclasses, json, math, os, sys, time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import utils


@dataclass
class Common:
    """The fields of train, sample and compose (and bench): the run, the model's size and the sampler
    with its guidance, so that one list of flags serves all of them. sample and compose build the
    model their checkpoint describes: there --model is only checked and --image_size is unused."""
    seed: int = 0                   # base seed (noise, timesteps, batches, CFG drops, per-sample seeds)
    device: str = "auto"            # auto | cpu | cuda | mps
    model: str = "DiT-toy/4"        # size key: DiT-{S,B,L,XL}/{2,4,8}, DiT-toy/{2,4,8} (paper: DiT-XL/2)
    image_size: int = 16            # pixels (toy is pixel space; paper 256 px -> 32 x 32 latents)
    batch_size: int = 64            # per process: training batch (paper: 256 global), samples per forward
    bf16: bool = True               # bf16 autocast on CUDA and bf16 CPUs (utils.fast_bf16; the authors use fp16)
    # the sampler (train: its progress grids)
    diffusion_steps: int = 1000     # T of the noise schedule
    sample_steps: int = 250         # respaced DDPM steps at sampling (DiT: 250)
    ddim: bool = False              # DDIM (eta = 0) instead of DDPM on the respaced steps
    cfg_scale: float = 1.0          # classifier-free guidance scale (paper: 1.4 / 1.7 for Table 1)
    cfg_channels: int = 3           # guide the first k output channels (paper / DiT: 3; authors' code, imagenet: 4)
    cfg_interval: list[float] = field(default_factory=list)  # [lo, hi] fraction of T where CFG applies; empty = all
    POSITIVE = ("batch_size", "image_size", "diffusion_steps", "sample_steps")

    def __post_init__(self):  # checked on the command line, before any command starts
        if self.model not in DIT_MODELS:
            utils.fail(f"unknown --model {self.model!r}; use one of {', '.join(DIT_MODELS)}")


@dataclass
class Config(Common):
    """train (and bench, which times its steps)."""
    run: str = "toy"                # run folder runs/dit-<run>/
    resume: bool = False            # continue from the newest checkpoint of the run folder
    overwrite: bool = False         # replace an earlier run in the same folder (checkpoints, config, log, grids)
    steps: int = 2000               # optimiser steps (paper: 800 epochs of ImageNet, about 4M steps at 256)
    compile: bool = False           # torch.compile the model (the authors compile)
    # model and conditioning
    cond: str = "dlc"               # dlc | label | embedding | none
    dlc: str = ""                   # DLC set folder (codes.npy, meta.json, embeddings.npy for `embedding`)
    data: str = "shapes"            # embedded dataset for label / none (dlc, embedding use the set's meta["data"])
    data_n: int = 4000              # images of the embedded dataset for label / none
    num_classes: int = 0            # label conditioner classes; 0 = from the data (ImageNet 1000)
    drop_prob: float = 0.1          # probability of replacing the condition by the null / drop token
    dlc_pool: str = "sum"           # DLC tokens -> condition: sum (the toy) | mean (paper, authors, imagenet)
    label_std: float = 1.0          # label table init std (DiT, imagenet: 0.02; the toy: 1.0, the small-condition trap)
    init_from: str = ""             # an official DiT checkpoint (DiT-XL-2-256x256.pt) to start from
    latents: str = ""               # folder written by `extract`; training then reads latents only (paper scale)
    schedule: str = "cosine"        # cosine (IDDPM eq. 17, the toy) | linear (DDPM / DiT / paper)
    gelu: str = "exact"             # exact (erf, the toy: 3x faster on CPUs) | tanh (DiT, imagenet, the authors)
    # optimisation
    lr: float = 2e-3                # AdamW learning rate (paper / DiT: 1e-4; the toy: 2e-3, see README)
    ema: float = 0.995              # EMA decay (paper: 0.9999; far too slow for a few hundred toy steps)
    grad_ckpt: bool = False         # gradient checkpointing through the blocks
    log_every: int = 1              # log line interval (one per step by default)
    ckpt_every: int = 200           # checkpoint interval
    sample_every: int = 200         # sample-grid interval during training
    POSITIVE = ("steps", "batch_size", "data_n", "image_size", "log_every", "ckpt_every", "sample_every",
                "diffusion_steps", "sample_steps")


@dataclass
class SampleConfig(Common):
    ckpt: str = ""                  # checkpoint file or run folder to sample from (its EMA weights)
    dlc: str = ""                   # dlc / embedding models: the DLC set whose rows condition the samples
    start: int = 0                  # first row of the DLC set used for sampling
    embeddings: str = ""            # `embedding` models: a .npy of embeddings (from `embgen`) instead of --dlc's
    labels: list[int] = field(default_factory=list)  # labels to sample (cycled); empty = 0..classes-1
    n: int = 64                     # number of samples (split across torchrun ranks)
    vae: str = ""                   # latent models: local diffusers AutoencoderKL folder (stabilityai/sd-vae-ft-ema)
    out: str = "samples.npz"        # samples file (arr_0 uint8 [N, H, W, C]) + a PNG grid next to it
    POSITIVE = Common.POSITIVE + ("n",)


@dataclass
class ComposeConfig(Common):
    """compose (Sec. 5.2): pairs of rows of a DLC set, or N image files encoded by sem.py."""
    ckpt: str = ""                  # the DLC-conditioned checkpoint file or run folder
    dlc: str = ""                   # DLC set of the sources (its attrs.npy for --pick)
    pairs: str = "0:1,2:3"          # source DLC rows "a:b,c:d"
    pick: str = ""                  # choose --n_pairs pairs from the set's attrs.npy instead: "differ" (sources that
                                    # differ in shape, colour and background) or "heldout" (pairs one of whose
                                    # recombinations is a held-out combination, which becomes the sample's target)
    n_pairs: int = 24               # pairs to pick with --pick
    n_per_pair: int = 8             # compositions per pair (per image set with --images)
    mix_p: float = 0.5              # probability that a position takes source A's token
    emb_ckpt: str = ""              # `embedding` model: the same pairs by averaging continuous embeddings
    images: list[str] = field(default_factory=list)  # image files to encode and mix (instead of --pairs)
    sem_ckpt: str = ""              # --images: the SEM checkpoint that encodes them (sem.py)
    temp: float = 0.0               # --images: SEM temperature; 0 = a uniformly chosen source per position
    vae: str = ""                   # a latent model (--pairs or --images): the SD-VAE folder that decodes
    out: str = "samples.npz"        # compositions (arr_0, codes, pairs, sources) + a PNG grid next to it
    POSITIVE = Common.POSITIVE + ("n_per_pair",)


PRESETS = {
    "toy": {},
    "imagenet": dict(model="DiT-XL/2", image_size=256, batch_size=32, steps=4_000_000, lr=1e-4,
                     ema=0.9999, num_classes=1000, ckpt_every=50_000, sample_every=50_000,
                     log_every=100, cfg_channels=4, schedule="linear", dlc_pool="mean",
                     label_std=0.02, gelu="tanh"),
}
# Table 1 as the authors sampled it (scripts/gen_50k_sedd-1024_cfg-1.7.sh and
# scripts/gen_50k_sedd-4096-remask.sh -> dit/sample_ddp_parallelized_dlc_hf.py -> pipeline_dlc_dit.py):
# 256 respaced DDPM steps, CFG on all 4 latent channels at every step, fp32 / TF32. The SEDD codes
# come from 1024 analytic steps (CFG 1.7: FID 1.59) or 4096 steps with remasking eta 0.01 (no CFG:
# FID 2.00). The paper's wording, 3 guided channels, is --cfg_channels 3.
PRESETS["imagenet-cfg1.7"] = {**PRESETS["imagenet"], "sample_steps": 256, "cfg_scale": 1.7, "bf16": False}
PRESETS["imagenet-remask"] = {**PRESETS["imagenet"], "sample_steps": 256, "cfg_scale": 1.0, "bf16": False}


# name -> (depth, hidden, heads); the paper's names with the patch size after the slash
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "toy": (4, 128, 4)}
DIT_MODELS = {f"DiT-{s}/{p}": (*SIZES[s], p) for s in SIZES for p in (2, 4, 8)}


#################################################################################
#                 Embedders: timestep and the four conditioners                  #
#################################################################################

def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, ordered [cos, sin] as in DiT."""
    half = dim // 2                                                         # dim/2 cosines, then dim/2 sines
    # (half,) frequencies max_period^(-k / half), k = 0..half-1
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                        # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # (B, dim)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t))                              # (B,) -> (B, 256) -> (B, D)


class LabelEmbedder(nn.Module):
    """The official label embedder: row `num_classes` is the null class used by CFG."""
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)   # [1001, D] on ImageNet

    def forward(self, y, drop):                      # y (B,) int64, drop (B,) bool
        return self.embedding_table(torch.where(drop, self.num_classes, y))


class DLCEmbedder(nn.Module):
    """Sec. 4: one embedding table per position, (L, V+1, D); index V is the drop token.
    The L embedded tokens are averaged. Init N(0, 1/D) as in the authors' SEMEmbedder, whose
    drop-token rows start as one shared vector repeated at every position.
    "Soft SEM": a (B, L, V) tensor of probabilities (each row sums to 1) embeds as the
    probability-weighted average of the rows, sum_v p[l, v] E[l, v]; a one-hot p is the code.
    pool = "sum" (the toy's default) adds the L rows instead: L times the average, the same
    model with a table L times larger, which a few thousand Adam steps cannot grow to on their
    own (the average of L random rows is 1/sqrt(L) of one row, small next to the timestep
    embedding, so the DiT barely reads the code; docs/LOG.md)."""
    def __init__(self, L, V, hidden, pool="mean"):
        super().__init__()
        if pool not in ("mean", "sum"):
            utils.fail(f"--dlc_pool must be mean or sum, got {pool!r}")
        self.L, self.V, self.scale = L, V, float(L) if pool == "sum" else 1.0  # sum = L x mean
        table = torch.randn(L, V, hidden) * hidden ** -0.5                  # (L, V, D), N(0, 1/D)
        drop = (torch.randn(1, 1, hidden) * hidden ** -0.5).expand(L, 1, hidden)  # (L, 1, D): one shared vector
        self.embedding_table = nn.Parameter(torch.cat([table, drop], 1))   # (L, V+1, D)

    def forward(self, codes, drop):                  # codes (B, L) int64 or (B, L, V) float, drop (B,) bool
        if codes.is_floating_point():                # soft SEM: weights over the V tokens of each position
            # rows[b, l] = sum_v p[b, l, v] E[l, v]: (B, L, V) x (L, V, D) -> (B, L, D)
            rows = torch.einsum("blv,lvd->bld", codes.to(self.embedding_table.dtype), self.embedding_table[:, :self.V])
            # dropped: the mean of the L drop rows (D,); else the mean over positions: (B, D)
            return self.scale * torch.where(drop[:, None], self.embedding_table[:, self.V].mean(0), rows.mean(1))
        codes = torch.where(drop[:, None], self.V, codes)          # drop the WHOLE code
        pos = torch.arange(self.L, device=codes.device)[None]      # (1, L)
        return self.scale * self.embedding_table[pos, codes].mean(1)   # (B, L, D) -> (B, D)


class ContEmbedder(nn.Module):
    """Continuous SSL embedding (sem.py encode --continuous) through a linear layer; a dropped
    condition is replaced by a learned null vector in the input space (authors' ContEmbedder)."""
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.null = nn.Parameter(torch.randn(1, in_dim) * 0.02)             # (1, E): the learned null condition
        self.proj = nn.Linear(in_dim, hidden, bias=False)                   # (B, E) -> (B, D)

    def forward(self, e, drop):                      # e (B, E) float, drop (B,) bool
        return self.proj(torch.where(drop[:, None], self.null.to(e.dtype), e))


#################################################################################
#                                 Core DiT model                                #
#################################################################################

def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding (MAE / DiT): first half encodes the column,
    second half the row; each half is [sin, cos] of pos * 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,), float64
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    def one_d(pos):                                   # (T,) -> (T, dim/2)
        a = pos.reshape(-1, 1).double() * omega[None]                       # (T, 1) * (1, dim/4) -> (T, dim/4)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()[None]   # (1, T, dim)


def modulate(x, shift, scale):                        # adaLN: x * (1 + scale) + shift
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, D) -> (B, 1, D): broadcast over the T tokens


class Attention(nn.Module):
    """Multi-head self-attention with timm's key names (qkv, proj), through fused SDPA."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                                  # D -> 3D: q, k, v in one matmul
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        x = utils.attention(q, k, v)                                          # (B, H, T, hd); fp32 on the CPU (utils)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))              # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. gelu "tanh" is DiT's tanh approximation of GELU, "exact" the erf form:
    the two differ by at most 5e-4, and torch's erf kernel is about 3x faster on CPUs."""
    def __init__(self, dim, hidden, gelu="tanh"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = utils.gelu_form(gelu)                            # F.gelu's names of the two forms

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class DiTBlock(nn.Module):
    """adaLN-Zero block: LayerNorm without affine, shift / scale / gate from the condition."""
    def __init__(self, dim, heads, gelu="tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # c (B, D) -> (B, 6D)

    def forward(self, x, c):                                              # x (B, T, D), c (B, D)
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        # gated residuals; the gates are 0 at init (adaLN-Zero), so each block starts as the identity
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))  # the same for the MLP branch


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)                # each token -> its p x p x 2C output patch
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # shift and scale, no gate

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))    # (B, T, p*p*2C)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_ch, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)              # one token per p x p patch

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                   # (B, C, H, W) -> (B, T, D)


class DiT(nn.Module):
    """DiT with learned sigma (2C output channels: epsilon, then the variance interpolation v).
    `cond` picks the conditioner: dlc (sem_embedder, the authors' key), label (y_embedder,
    the official key), embedding (cont_embedder) or none."""
    def __init__(self, model="DiT-toy/2", input_size=16, in_channels=3, cond="none",
                 num_classes=1000, L=0, V=0, emb_dim=0, grad_ckpt=False, dlc_pool="mean", label_std=0.02,
                 gelu="tanh"):
        super().__init__()
        depth, dim, heads, patch = DIT_MODELS[model]
        self.cond, self.patch, self.in_channels, self.out_channels = cond, patch, in_channels, 2 * in_channels
        self.input_size = input_size                                         # pixels or latent cells per side
        self.grad_ckpt, self.label_std = grad_ckpt, label_std
        self.x_embedder = PatchEmbed(patch, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        if cond == "label":
            self.y_embedder = LabelEmbedder(num_classes, dim)
        elif cond == "dlc":
            self.sem_embedder = DLCEmbedder(L, V, dim, dlc_pool)
        elif cond == "embedding":
            self.cont_embedder = ContEmbedder(emb_dim, dim)
        elif cond != "none":
            utils.fail(f"unknown --cond {cond!r}; use dlc, label, embedding or none")
        grid = input_size // patch                                          # patches per side; T = grid^2 tokens
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)  # (1, T, D), fixed
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, gelu) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT init: xavier linears, patch conv as a linear, N(0, .02) timestep MLP, N(0, label_std)
        label rows, zeros on every adaLN output and the final linear: the output is exactly 0 at init."""
        if self.pos_embed.is_meta:                   # shapes only (torch.device("meta")): nothing to fill
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # conv weight (D, C, p, p) as a (D, C*p*p) linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.cond == "label":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_std)   # DiT: 0.02
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for mod in zeroed + [self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def embed_condition(self, y, drop):
        if self.cond == "label":
            return self.y_embedder(y, drop)
        if self.cond == "dlc":
            return self.sem_embedder(y, drop)
        if self.cond == "embedding":
            return self.cont_embedder(y, drop)
        return 0.0                                                          # none: the timestep embedding alone

    def unpatchify(self, x):
        B, T, _ = x.shape                                                   # x (B, T, p*p*2C)
        h, p, c = int(T ** 0.5), self.patch, self.out_channels              # h = w = sqrt(T) patches per side
        x = x.reshape(B, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)          # (B, C, h, p, w, p)
        return x.reshape(B, c, h * p, h * p)                               # (B, 2C, H, W)

    def forward(self, x, t, y=None, drop=None):
        """x (B, C, H, W), t (B,) timesteps of the 1000-step chain, y the condition, drop (B,)
        bool = use the null condition (training draws it, CFG sets it)."""
        if drop is None:
            drop = torch.zeros(len(x), dtype=torch.bool, device=x.device)   # no drop: the conditional model
        x = self.x_embedder(x) + self.pos_embed                            # (B, T, D)
        c = self.t_embedder(t) + self.embed_condition(y, drop)             # (B, D)
        for block in self.blocks:
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))                     # (B, 2C, H, W)

    def forward_with_cfg(self, x, t, y, scale, channels=3, interval=None, T=1000):
        """Classifier-free guidance (CFG eq. 6): eps = eps_u + s (eps_c - eps_u) on the first
        `channels` channels (paper / DiT: 3 of the 4 latent channels; authors' code: all). The
        variance channels and the unguided epsilon channels keep the conditional prediction.
        `interval` = (lo, hi) fractions of T: guidance only for lo*T <= t <= hi*T."""
        if self.cond == "none" or scale == 1.0:
            return self(x, t, y)
        B = len(x)
        drop = torch.arange(2 * B, device=x.device) >= B                   # second half: null condition
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), drop)  # (2B, 2C, H, W)
        cond, uncond = out[:B], out[B:]                                     # each (B, 2C, H, W)
        k = min(channels, self.in_channels)                                 # at most the C epsilon channels
        guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])      # eps_u + s (eps_c - eps_u)
        if interval:
            inside = ((t >= interval[0] * T) & (t <= interval[1] * T)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            guided = torch.where(inside, guided, cond[:, :k])               # outside the interval: the conditional eps
        return torch.cat([guided, cond[:, k:]], dim=1)  # (B, 2C, H, W): k guided, then conditional channels


def load_official(model, state_dict, path="the official checkpoint"):
    """Load an official DiT checkpoint: strict for the label model; for the others everything
    but the conditioning embedder, and the skipped / missing keys are printed, not hidden.
    A file of another DiT size or with missing keys stops with one line."""
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        utils.fail(f"{path} is not a DiT state dict (name -> tensor); pass e.g. DiT-XL-2-256x256.pt")
    if model.cond == "label":
        utils.load_weights(model, state_dict, path)
        return [], []
    sd = {k: v for k, v in state_dict.items() if not k.startswith("y_embedder.")}  # the label table: not ours to load
    missing, unexpected = utils.load_weights(model, sd, path, strict=False)
    bad = [k for k in missing if not k.startswith(("sem_embedder.", "cont_embedder."))] + list(unexpected)
    if bad:
        utils.fail(f"checkpoint does not match the DiT architecture: {bad[:4]}; check --model")
    skipped = sorted(set(state_dict) - set(sd))
    utils.print0(f"official checkpoint loaded; not loaded (label embedder): {skipped}; "
                 f"newly initialised (conditioner): {sorted(missing)}")
    return sorted(missing), skipped


#################################################################################
#                Gaussian diffusion (DDPM / IDDPM), float64 schedules            #
#################################################################################

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """DDPM eq. 13: log-probability of the 8-bit bin of x (in [-1, 1], bin width 2/255) under
    N(mean, e^(2 log_scale)); the edge bins extend to -inf / +inf. (IDDPM uses a tanh
    approximation of the normal CDF; we use the exact one, torch.special.ndtr.)"""
    inv = torch.exp(-log_scale)                                             # 1 / sigma
    cdf_plus = torch.special.ndtr(inv * (x - mean + 1 / 255))               # Phi at the bin's upper edge, x + 1/255
    cdf_min = torch.special.ndtr(inv * (x - mean - 1 / 255))                # Phi at its lower edge, x - 1/255
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # the clamps keep the logs finite where a CDF underflows
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # x = -1: mass of (-inf, upper edge]; x = 1: of [lower edge, +inf); else of the bin
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))  # mean over all but the batch: (B, ...) -> (B,)


def space_timesteps(T, n):
    """The n kept steps of a T-step chain, evenly spaced and rounded as in DiT's respace.py
    (a single section); 0 and T-1 are always kept."""
    if n >= T:
        return list(range(T))
    stride = (T - 1) / (n - 1)  # fractional, so that the last kept step is T-1
    return sorted({round(i * stride) for i in range(n)})                    # rounded, deduplicated, ascending


class GaussianDiffusion:
    """Linear betas, epsilon prediction, learned-range variance. `timestep_map[i]` is the
    original timestep of chain step i (identity for the full chain); the network always sees
    the original timesteps."""
    def __init__(self, betas, timestep_map=None):
        b = np.asarray(betas, dtype=np.float64)  # float64: abar_t, 1 - abar_t and their ratios come close to 0 and 1
        self.T = len(b)
        self.betas = b
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.T))
        self.abar = np.cumprod(1 - b)                                      # alpha-bar_t
        self.abar_prev = np.append(1.0, self.abar[:-1])                     # abar_{t-1}, with abar_{-1} = 1
        # DDPM eq. 7: posterior q(x_{t-1} | x_t, x_0) variance and mean coefficients
        self.post_var = b * (1 - self.abar_prev) / (1 - self.abar)          # beta~_t; 0 at t = 0
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))  # clipped at t=0
        self.post_c0 = b * np.sqrt(self.abar_prev) / (1 - self.abar)        # coefficient of x_0 in the posterior mean
        self.post_ct = (1 - self.abar_prev) * np.sqrt(1 - b) / (1 - self.abar)  # coefficient of x_t

    @classmethod
    def linear(cls, T=1000):
        scale = 1000 / T                                                    # DDPM: 1e-4..0.02 at T = 1000
        return cls(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))

    @classmethod
    def cosine(cls, T=1000, s=0.008):
        """IDDPM eq. 17: abar_t = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), and
        beta_t = 1 - abar_t / abar_(t-1) clipped at 0.999. The linear schedule destroys a 16-32 px
        image within the first ~half of its steps, so most of its steps are spent on pure noise."""
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * np.pi / 2) ** 2  # f(0..T): (T+1,)
        return cls(np.minimum(1 - f[1:] / f[:-1], 0.999))                   # beta_t = 1 - abar_t / abar_{t-1}: (T,)

    @classmethod
    def make(cls, schedule, T=1000):
        if schedule not in ("linear", "cosine"):
            utils.fail(f"unknown --schedule {schedule!r}; use linear or cosine")
        return getattr(cls, schedule)(T)

    def respace(self, n):
        """IDDPM sec. 4: keep n steps S and set beta_i = 1 - abar_{S_i} / abar_{S_(i-1)}, so
        alpha-bar is unchanged at the kept steps."""
        keep = space_timesteps(self.T, n)
        abar = self.abar[keep]                                              # alpha-bar at the kept steps
        betas = 1 - abar / np.append(1.0, abar[:-1])                        # beta_i = 1 - abar_{S_i} / abar_{S_(i-1)}
        return GaussianDiffusion(betas, self.timestep_map[keep].tolist())

    def _at(self, arr, t, x):                                               # gather, broadcast to x
        return torch.as_tensor(arr, device=x.device)[t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self._at(np.sqrt(self.abar), t, x0) * x0 + self._at(np.sqrt(1 - self.abar), t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """DDPM eqs. 6-7: mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.post_c0, t, xt) * x0 + self._at(self.post_ct, t, xt) * xt
        return mean, self._at(self.post_var, t, xt), self._at(self.post_logvar, t, xt)

    def predict_x0(self, xt, t, eps):
        """DDPM eq. 4 inverted: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return self._at(np.sqrt(1 / self.abar), t, xt) * xt - self._at(np.sqrt(1 / self.abar - 1), t, xt) * eps

    def p_mean_variance(self, out, xt, t, clip=False):
        """From the network output (eps, v): IDDPM eq. 15 log-variance
        v' log beta_t + (1 - v') log beta~_t with v' = (v + 1) / 2, and the mean of eq. 11
        through x_0 = predict_x0(eps) plugged into the posterior mean (eq. 7)."""
        C = xt.shape[1]
        eps, v = out[:, :C], out[:, C:]  # each (B, C, H, W): epsilon, variance output v
        frac = (v + 1) / 2                                                  # v' = (v + 1) / 2
        logvar = frac * self._at(np.log(self.betas), t, xt) + (1 - frac) * self._at(self.post_logvar, t, xt)
        x0 = self.predict_x0(xt, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)  # sampling pixel models: generate() clips when there is no VAE
        mean, _, _ = self.q_posterior(x0, xt, t)  # mu = c0 x_0 + ct x_t with the predicted x_0
        return mean, logvar, x0, eps

    def vb_terms(self, out, x0, xt, t):
        """IDDPM eq. 4-5: L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL L_0 = -log p(x_0 | x_1) at t = 0; in bits per dimension."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar, _, _ = self.p_mean_variance(out, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2)  # nats -> bits, (B,)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2)
        return torch.where(t == 0, nll, kl)                                 # (B,): L_0 at chain step 0, L_t after

    def training_losses(self, model, x0, t, y, drop, noise):
        """L_hybrid (IDDPM sec. 3.1, as in DiT): ||eps - eps_theta||^2 + L_vlb, where L_vlb sees
        the epsilon output detached, so the VLB trains the variance only. Per sample (B,)."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.timestep_map.to(t.device)[t], y, drop).float()   # (B, 2C, H, W)
        C = x0.shape[1]
        mse = mean_flat((noise - out[:, :C]) ** 2)                          # L_simple, (B,)
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)  # stop-gradient on eps: the VLB trains v only
        vb = self.vb_terms(frozen, x0, xt, t)
        return mse + vb, mse, vb

    @torch.no_grad()
    def sample(self, model_fn, noise, step_noise, clip=True, ddim=False, progress=False):
        """Ancestral DDPM sampling (DDPM alg. 2 with the learned variance) or DDIM with eta = 0
        (DDIM eq. 12) over this (respaced) chain. noise (B, C, H, W) is x_T; step_noise(i)
        returns the noise added at chain step i, drawn per sample by the caller."""
        x = noise
        steps = list(range(self.T))[::-1]                                   # T-1, ..., 0 of this chain
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t = torch.full((len(x),), i, device=x.device, dtype=torch.long)  # (B,) chain step i
            out = model_fn(x, self.timestep_map.to(x.device)[t]).float()    # fp32 update, even under bf16 autocast
            mean, logvar, x0, eps = self.p_mean_variance(out, x, t, clip)
            if ddim:
                # DDIM (eta = 0): eps re-derived from x_0 (clipped for pixel models), then a deterministic x_{t-1}
                eps = (self._at(np.sqrt(1 / self.abar), t, x) * x - x0) / self._at(np.sqrt(1 / self.abar - 1), t, x)
                x = x0 * self._at(np.sqrt(self.abar_prev), t, x) + self._at(np.sqrt(1 - self.abar_prev), t, x) * eps
            elif i > 0:
                x = mean + torch.exp(0.5 * logvar) * step_noise(i).to(x)    # x_{t-1} = mu + sigma z
            else:
                x = mean                                                    # last step: no noise
        return x



#################################################################################
#           Data: images (or latents) row-aligned with their conditions         #
#################################################################################

def resize(images, size):
    """Area-downsample embedded images to the model's resolution (shapes are drawn at 32 px)."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="area")


def load_conditions(cond, dlc, L=None, V=None):
    """The rows of the DLC set `dlc` that condition a `cond` model: its codes (N, L) int64 for
    dlc, its continuous embeddings (N, E) float32 for embedding. Returns (rows, the set's meta)."""
    if not dlc:
        utils.fail(f"--cond {cond} needs --dlc DIR (a DLC set from sem.py encode)")
    s = utils.load_dlc_set(dlc, L=L, V=V)
    if cond == "dlc":
        return torch.from_numpy(np.asarray(s["codes"], dtype=np.int64)), s["meta"]  # (N, L) int64
    path = os.path.join(dlc, "embeddings.npy")
    if not os.path.isfile(path):
        utils.fail(f"{dlc} has no embeddings.npy; run sem.py encode --continuous to write it")
    e = torch.from_numpy(np.load(path).astype(np.float32))              # (N, E)
    if len(e) != len(s["codes"]):
        utils.fail(f"{path} has {len(e)} rows but the set has {len(s['codes'])} codes; re-encode")
    return e, s["meta"]


def load_training_data(cfg):
    """x: float [N, C, H, W] images in [-1, 1] (toy) or a float16 latent memmap [N, 2, 4, h, w]
    (paper; index 1 = the flipped image); y: codes / labels / embeddings / None, same rows;
    info: what the model is built from (L, V, emb_dim, num_classes)."""
    info, y = {"L": 0, "V": 0, "emb_dim": 0, "num_classes": cfg.num_classes}, None
    data = {"name": cfg.data, "n": cfg.data_n, "size": 32, "seed": 0}           # label / none: the embedded data
    if cfg.cond in ("dlc", "embedding"):
        y, meta = load_conditions(cfg.cond, cfg.dlc)
        info.update(L=int(meta["L"]), V=int(meta["V"]), emb_dim=y.shape[1] if cfg.cond == "embedding" else 0)
        data = meta.get("data")                                                  # the images the set encodes
    if cfg.latents:
        if not os.path.isfile(os.path.join(cfg.latents, "meta.json")) or \
                os.path.isfile(os.path.join(cfg.latents, "progress.json")):
            utils.fail(f"--latents {cfg.latents} is not a finished extraction (no meta.json, or progress.json "
                       "left by an interrupted one); run dit.py extract with the same flags to finish it")
        x = np.load(os.path.join(cfg.latents, "latents.npy"), mmap_mode="r")  # float16 (N, 2, 4, h, w), read lazily
        lpath = os.path.join(cfg.latents, "labels.npy")  # absent where the classes are unknown (authors.py dlc)
        labels = torch.from_numpy(np.load(lpath)) if os.path.isfile(lpath) else None
    else:
        if data is None:
            utils.fail(f"DLC set {cfg.dlc} has no meta['data']: its images cannot be re-created; "
                       "train on a set encoded from an embedded dataset or on --latents")
        d = utils.load_embedded(**data)
        x, labels = resize(d["images"], cfg.image_size), d["labels"]
    if cfg.cond == "label":
        if labels is None:
            utils.fail(f"{cfg.latents} has no labels.npy: --cond label needs the class of every image")
        y = labels
        info["num_classes"] = cfg.num_classes or int(labels.max()) + 1      # 0: from the largest label
    if y is not None and len(y) != len(x):
        utils.fail(f"{len(x)} images but {len(y)} conditions in {cfg.dlc or cfg.latents}; "
                   "the DLC set must be row-aligned with the images (re-encode them)")
    return x, y, info


def get_batch(x, y, idx, gen, latent):
    """Rows idx; for latents pick the plain or flipped copy at random (DiT's random flip)."""
    if latent:
        flip = torch.randint(0, x.shape[1], (len(idx),), generator=gen).numpy()  # 1 copy: authors.py dlc
        xb = torch.from_numpy(np.stack([x[i, f] for i, f in zip(idx.tolist(), flip)]).astype(np.float32))
    else:
        xb = x[idx]                                                         # (B, C, H, W)
    return xb, (y[idx] if y is not None else None)


#################################################################################
#                                     Training                                  #
#################################################################################

def model_args(cfg, info, in_ch, size):
    return dict(model=cfg.model, input_size=size, in_channels=in_ch, cond=cfg.cond,
                num_classes=info["num_classes"], L=info["L"], V=info["V"], emb_dim=info["emb_dim"],
                gelu=cfg.gelu,                                                 # absent: tanh (older checkpoints)
                **({"dlc_pool": cfg.dlc_pool} if cfg.cond == "dlc" else {}),   # absent: mean (older checkpoints)
                **({"label_std": cfg.label_std} if cfg.cond == "label" else {}))


def build_for_training(cfg, margs, run_dir, d):
    """DiT (optionally from an official checkpoint), its EMA copy and AdamW, restored from the
    newest checkpoint with --resume. Returns (model, ema, opt, first step, a line for the log)."""
    torch.manual_seed(cfg.seed)                      # same init on every rank; step noise is seeded per rank
    model = DiT(**margs, grad_ckpt=cfg.grad_ckpt).to(d.device)
    if cfg.init_from:
        load_official(model, utils.load_checkpoint(cfg.init_from), cfg.init_from)
    ema = DiT(**margs).to(d.device).eval().requires_grad_(False)          # EMA: a copy, always eval
    ema.load_state_dict(model.state_dict())                                 # the EMA starts as the model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0, fused=d.device.type == "cuda")
    ck, state = utils.resume_checkpoint(os.path.join(run_dir, "checkpoints")) if cfg.resume else (None, None)
    if not ck:
        note = f"--resume: no checkpoint in {run_dir}/checkpoints, starting from scratch" if cfg.resume else ""
        return model, ema, opt, 0, note
    state = utils.check_checkpoint(state, ck, "dit", ("model", "ema", "opt", "step"))
    was = state.get("model_args", {}).get("gelu", "tanh")
    if was != margs["gelu"]:
        utils.fail(f"{ck} was trained with --gelu {was}; resume with --gelu {was}")
    for part, key in ((model, "model"), (ema, "ema"), (opt, "opt")):
        utils.load_weights(part, state[key], ck)
    return model, ema, opt, state["step"], f"resumed from {ck} at step {state['step']}"


def draw_batch(x, y, gen, cfg, T, latent, device):
    """One training batch, every draw from `gen`: images x0 (and their conditions), timesteps
    t ~ U{0..T-1}, noise eps ~ N(0, I) and the CFG drop mask (the condition replaced by the null
    token with probability drop_prob, so that the same network also learns p(x))."""
    idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)        # uniform rows, with replacement
    xb, yb = get_batch(x, y, idx, gen, latent)
    t = torch.randint(0, T, (cfg.batch_size,), generator=gen)               # t ~ U{0..T-1}
    noise = torch.randn(xb.shape, generator=gen)                            # eps ~ N(0, I), on the CPU generator
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.drop_prob        # CFG dropout: True = null condition
    yb = yb.to(device) if yb is not None else None
    return xb.to(device), yb, t.to(device), noise.to(device), drop.to(device)


def training_grid(ema, diffusion, y, cfg, device, path):
    """A progress grid: 16 EMA samples (50 respaced steps) for the first 16 training conditions."""
    yg = y[:16].to(device) if y is not None else None
    save_grid(generate(ema, diffusion.respace(min(50, cfg.sample_steps)), yg, cfg, range(16), device), path)


def train(cfg):
    d = utils.setup_dist(cfg.device)
    run_dir = os.path.join("runs", f"dit-{cfg.run}")
    utils.check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    x, y, info = load_training_data(cfg)
    latent = bool(cfg.latents)
    # latents (N, 2, C, h, w); images (N, C, H, W)
    in_ch, size = (x.shape[2], x.shape[-1]) if latent else (x.shape[1], x.shape[-1])
    margs = model_args(cfg, info, in_ch, size)
    model, ema, opt, step, note = build_for_training(cfg, margs, run_dir, d)
    log = utils.Logger(run_dir, d)                   # the run folder appears only once the model is built
    if note:
        log(note)
    utils.start_run(run_dir, cfg, d, ("samples_*.png",))
    diffusion = GaussianDiffusion.make(cfg.schedule, cfg.diffusion_steps)
    net = utils.distribute(model, d, cfg.compile)                         # DDP / compile; saves use model
    finite = utils.FiniteCheck(d.device)
    log(f"DiT {cfg.model} cond={cfg.cond} params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"data={len(x)} x {in_ch}x{size}x{size} world={d.world} device={d.device}")
    while step < cfg.steps:
        t0 = time.perf_counter()
        # every random draw of a step comes from (seed, step, rank): resuming replays exactly
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * d.world + d.rank)
        xb, yb, t, noise, drop = draw_batch(x, y, gen, cfg, diffusion.T, latent, d.device)
        model.train()  # training mode each step (the EMA stays in eval)
        with utils.autocast(d.device, cfg.bf16):  # bf16 autocast; the losses are taken in fp32
            loss, mse, vb = diffusion.training_losses(net, xb, t, yb, drop, noise)
            loss = loss.mean()                                              # (B,) -> scalar
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # max_norm inf: only measures the norm
        opt.step()
        # EMA with a warm-up, min(decay, (1 + step) / (10 + step)): the EMA of the first hundreds of
        # steps would otherwise keep a large share of the zero-output init, whose samples stay noise
        utils.ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        step += 1
        finite.step(loss, step)  # records a NaN / inf loss without a host sync
        if step % cfg.log_every == 0 or step == cfg.steps:
            finite.check()
            stats = torch.stack([loss.detach(), mse.mean().detach(), vb.mean().detach()]).float()
            if d.world > 1:                                                 # all-reduce only to log
                dist.all_reduce(stats); stats /= d.world
            ms = (time.perf_counter() - t0) * 1000
            log(f"step {step:7d} | loss {stats[0]:.4f} (mse {stats[1]:.4f} vb {stats[2]:.4f}) | lr {cfg.lr:.1e} "
                f"| grad {gnorm:.3f} | {ms:6.0f} ms/step | {cfg.batch_size * d.world * 1000 / ms:7.1f} samples/s")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            finite.check(model.parameters())                                # never save a NaN model
            if d.main:
                utils.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                       "step": step, "config": dataclasses.asdict(cfg), "model_args": margs,
                                       "script": "dit", "versions": {"torch": torch.__version__}},
                                      os.path.join(run_dir, "checkpoints", f"ckpt_{step:07d}.pt"))
        if d.main and not latent and (step % cfg.sample_every == 0 or step == cfg.steps):
            training_grid(ema, diffusion, y, cfg, d.device, os.path.join(run_dir, f"samples_{step:07d}.png"))
        if d.world > 1:
            dist.barrier()                                                  # rank 0 writes, then all go on
    return run_dir


#################################################################################
#                      Sampling, DDP-sharded, per-sample seeds                  #
#################################################################################

def sample_seeds(seed, ids):
    """The seed of each sample: a function of the run's seed and the sample's index only."""
    return [seed * 10_000_019 + i for i in ids]                             # the same whatever batch or rank draws it


def per_sample_noise(seeds, shape, steps):
    """x_T and the noise of every chain step for each sample from its own generator, so a
    sample is the same whatever the batch or the process it lands in."""
    xs, zs = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))                           # one generator per sample
        xs.append(torch.randn(shape, generator=g))                          # x_T (C, H, W)
        zs.append(torch.randn((steps, *shape), generator=g))              # (steps, C, H, W)
    return torch.stack(xs), torch.stack(zs, 1)                             # (B, ...), (steps, B, ...)


@torch.no_grad()
def generate(model, diffusion, y, cfg, seeds, device, progress=False, decode=None):
    """len(seeds) samples (uint8 [n, H, W, 3]) from conditions y (n rows or None), guided as cfg
    says. --cfg_interval is a fraction of cfg.diffusion_steps (the respaced chain maps its steps
    back to the original timesteps, which the network sees)."""
    shape = (model.in_channels, model.input_size, model.input_size)
    x, z = per_sample_noise(seeds, shape, diffusion.T)  # x_T (B, C, H, W); z (steps, B, C, H, W) on the CPU
    x = x.to(device)
    fn = lambda xt, t: model.forward_with_cfg(xt, t, y, cfg.cfg_scale, cfg.cfg_channels,  # t: original timesteps
                                              cfg.cfg_interval or None, cfg.diffusion_steps)
    with utils.autocast(device, cfg.bf16):
        out = diffusion.sample(fn, x, lambda i: z[i], clip=decode is None, ddim=cfg.ddim, progress=progress)
    if decode is not None:                                                 # latents -> pixels
        out = decode(out)
    return utils.to_uint8(out)


def trained_diffusion(state):
    """The noise schedule a checkpoint was trained with, from its saved training config (older
    checkpoints hold the whole former config dict; one with no schedule: linear, T = 1000)."""
    c = state.get("config", {})
    if "converted_from" in state:      # the authors' DiT, trained on DiT's linear schedule, whatever its config says
        return GaussianDiffusion.linear(1000)
    return GaussianDiffusion.make(c.get("schedule", "linear"), c.get("diffusion_steps", 1000))


def load_for_sampling(ckpt_path, device):
    state = utils.checkpoint_of(ckpt_path, "dit", ("model_args.model", "model_args.input_size", "ema"))
    model = DiT(**state["model_args"]).to(device).eval()
    utils.load_weights(model, state["ema"], ckpt_path)                     # samplers use EMA weights
    utils.check_sampling_weights(model.state_dict(), ckpt_path)
    return model, state


def vae_decoder(cfg, device):
    """SD-VAE decode (x / 0.18215), imported lazily from a local folder."""
    if not cfg.vae or not os.path.isdir(cfg.vae):
        utils.fail(f"--vae {cfg.vae!r} is not a folder; download stabilityai/sd-vae-ft-ema there (diffusers format)")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        utils.fail("the VAE needs diffusers: pip install -r requirements.txt (diffusers>=0.30,<0.36)")
    vae = AutoencoderKL.from_pretrained(cfg.vae, low_cpu_mem_usage=False).to(device).eval()
    return vae, (lambda z: vae.decode(z / 0.18215).sample)                  # undo the SD latent scale


def latent_decoder(cfg, model, device):
    """The VAE decode for a latent model (4 input channels), None for a pixel-space one."""
    return vae_decoder(cfg, device)[1] if model.in_channels == 4 else None


def sample_conditions(cfg, model, n):
    """The n conditions to sample from: rows start..start+n of a DLC set (codes or
    embeddings), labels (cycled), or None."""
    if model.cond == "embedding" and cfg.embeddings:                      # generated embeddings (embgen)
        if not os.path.isfile(cfg.embeddings):
            utils.fail(f"--embeddings {cfg.embeddings} does not exist; write it with `dit.py embgen`")
        y = torch.from_numpy(np.load(cfg.embeddings).astype(np.float32))
        if y.ndim != 2 or len(y) < cfg.start + n:
            utils.fail(f"--embeddings {cfg.embeddings} has shape {tuple(y.shape)}; need at least {cfg.start + n} rows")
        return y[cfg.start:cfg.start + n]
    if model.cond in ("dlc", "embedding"):
        L, V = (model.sem_embedder.L, model.sem_embedder.V) if model.cond == "dlc" else (None, None)
        y, _ = load_conditions(model.cond, cfg.dlc, L, V)
        if cfg.start + n > len(y):
            utils.fail(f"the DLC set {cfg.dlc} has {len(y)} rows; --start {cfg.start} + --n {n} is too many")
        return y[cfg.start:cfg.start + n]
    if model.cond == "label":
        labels = cfg.labels or list(range(model.y_embedder.num_classes))
        return torch.tensor([labels[i % len(labels)] for i in range(n)])    # (n,) labels, cycled
    return None


def save_npz(path, **arrays):
    """np.savez, written atomically (a crash never leaves half a file)."""
    with utils.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_grid(images, path, ncol=8):
    """uint8 [N, H, W, C] -> a PNG grid (1 px gaps), written atomically."""
    import matplotlib.image
    n, h, w, c = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, 3), 255, np.uint8)  # white: the gaps and the empty cells
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)                                              # grid row r, column q
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = im if c == 3 else im[..., :1]
    scale = max(1, 512 // (ncol * (w + 1)))                                # upscale tiny toy images
    grid = grid.repeat(scale, 0).repeat(scale, 1)                           # nearest-neighbour upscale
    with utils.atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, grid, format="png")


def sample(cfg):
    d = utils.setup_dist(cfg.device)
    model, state = load_for_sampling(cfg.ckpt, d.device)
    decode = latent_decoder(cfg, model, d.device)
    y_all = sample_conditions(cfg, model, cfg.n)
    diffusion = trained_diffusion(state).respace(cfg.sample_steps)
    mine = list(range(d.rank, cfg.n, d.world))                            # this rank's samples
    parts = []
    for b in range(0, len(mine), cfg.batch_size):
        ids = mine[b:b + cfg.batch_size]
        y = y_all[ids].to(d.device) if y_all is not None else None
        seeds = sample_seeds(cfg.seed, ids)  # by global index: same images for any --batch_size or world size
        parts.append(generate(model, diffusion, y, cfg, seeds, d.device, progress=d.main, decode=decode))
    imgs = np.concatenate(parts) if parts else np.zeros((0, model.input_size, model.input_size, 3), np.uint8)
    if d.world > 1:                                                        # gather to rank 0 in order
        gathered = [None] * d.world
        dist.all_gather_object(gathered, (mine, imgs))                      # (indices, images) of every rank
        order = np.concatenate([g[0] for g in gathered]).argsort()          # back to the global sample order
        imgs = np.concatenate([g[1] for g in gathered])[order]
    if d.main:
        extra = {"cfg_scale": np.float64(cfg.cfg_scale)}                 # the report names guided rows
        if y_all is not None:
            name = {"dlc": "codes", "label": "labels", "embedding": "embeddings"}[model.cond]
            extra[name] = y_all.numpy().astype(np.uint16) if model.cond == "dlc" else y_all.numpy()
        save_npz(cfg.out, arr_0=imgs, **extra)
        save_grid(imgs[:64], os.path.splitext(cfg.out)[0] + ".png")
        utils.print0(f"wrote {len(imgs)} samples to {cfg.out} and a grid to {os.path.splitext(cfg.out)[0]}.png")


#################################################################################
#                      Composition (Sec. 5.2): mixing two DLCs                  #
#################################################################################

def compose_codes(a, b, n, p, gen):
    """n codes whose position l takes a[l] with probability p, else b[l]. (n, L)"""
    take_a = torch.rand((n, len(a)), generator=gen) < p                     # (n, L) bool, each position independently
    return torch.where(take_a, a[None], b[None])                            # (1, L) broadcast against (n, L)


def parse_pairs(text):
    """"0:1,2:3" -> [(0, 1), (2, 3)]: each pair is two non-negative row numbers."""
    try:
        pairs = [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
        utils.fail(f"--pairs {text!r} must be pairs of row numbers like 0:1,2:3")
    return pairs


def pick_pairs(attrs, how, n, seed=0):
    """n source pairs (a, b) of rows whose (shape, colour, background) differ in all three.
    "differ": any such pairs. "heldout": pairs for which a held-out combination h takes each
    attribute from a or b (h is a recombination of the two), spread evenly over the held-out
    combinations; returns the targets h too. Pairs are drawn at random, seeded."""
    rng, names = np.random.RandomState(seed), list(utils.COLOURS)
    held = [(utils.SHAPES.index(s), names.index(c), names.index(b)) for s, c, b in utils.HELD_OUT]
    pairs, targets = [], []
    for k in range(n * 1000):
        if len(pairs) == n:
            break
        a, b = rng.randint(len(attrs), size=2)                              # a == b is rejected just below
        if (attrs[a] == attrs[b]).any():                                    # they share an attribute
            continue
        if how == "heldout":
            h = np.array(held[len(pairs) % len(held)])                        # the next target in turn
            # h must take each attribute from a or from b, and be neither source itself
            if not ((h == attrs[a]) | (h == attrs[b])).all() or (h == attrs[a]).all() or (h == attrs[b]).all():
                continue
            targets.append(h)
        pairs.append((int(a), int(b)))
    if len(pairs) < n:
        utils.fail(f"found only {len(pairs)} of --n_pairs {n} pairs for --pick {how}; use a larger DLC set")
    return pairs, (np.stack(targets) if targets else None)


def composition_sources(cfg):
    """The source pairs (--pairs, or --pick from the set's attrs.npy), their held-out targets
    (--pick heldout, else None) and the attributes of the set's rows (None where it has none)."""
    pairs, targets = parse_pairs(cfg.pairs), None
    attrs_path = os.path.join(cfg.dlc, "attrs.npy")
    attrs = np.load(attrs_path) if os.path.isfile(attrs_path) else None    # (N, 3) for the shapes data
    if cfg.pick:
        if cfg.pick not in ("differ", "heldout"):
            utils.fail(f"unknown --pick {cfg.pick!r}; use differ or heldout")
        if attrs is None:
            utils.fail(f"--pick needs the attributes of the sources: {attrs_path} (sem.py encode of the shapes data)")
        pairs, targets = pick_pairs(attrs, cfg.pick, cfg.n_pairs, cfg.seed)
    return pairs, targets, attrs


def compose(cfg):
    """Per pair (a, b): k samples of source A, of source B, of k mixed codes and, with --emb_ckpt,
    of the embedding model on the average of the two continuous embeddings (the baseline)."""
    d = utils.setup_dist(cfg.device)
    model, state = load_for_sampling(cfg.ckpt, d.device)
    if model.cond != "dlc":
        utils.fail(f"--ckpt is a {model.cond!r} model; compose needs a DLC-conditioned one")
    if cfg.images:
        return compose_images(cfg, model, state, d.device)
    pairs, targets, attrs = composition_sources(cfg)
    codes, _ = load_conditions("dlc", cfg.dlc, model.sem_embedder.L, model.sem_embedder.V)
    if max(max(p) for p in pairs) >= len(codes):
        utils.fail(f"--pairs refers to rows beyond the {len(codes)} of {cfg.dlc}")
    emb_model = load_for_sampling(cfg.emb_ckpt, d.device)[0] if cfg.emb_ckpt else None
    if emb_model is not None:
        if emb_model.cond != "embedding":
            utils.fail(f"--emb_ckpt is a {emb_model.cond!r} model; it must be an `embedding` model")
        embs, _ = load_conditions("embedding", cfg.dlc)
    k, diffusion = cfg.n_per_pair, trained_diffusion(state).respace(cfg.sample_steps)
    decode = latent_decoder(cfg, model, d.device)                          # latent models: through the SD-VAE
    gen = torch.Generator().manual_seed(cfg.seed)
    rows, comps, all_imgs, avg_imgs = [], [], [], []
    for j, (a, b) in enumerate(pairs):
        mixed = compose_codes(codes[a], codes[b], k, cfg.mix_p, gen)       # (k, L)
        seeds = sample_seeds(cfg.seed, range(j * 1000, j * 1000 + k))       # same for A, B and mix
        run = lambda m, y: generate(m, diffusion, y.to(d.device), cfg, seeds, d.device,
                                    decode=decode if m.in_channels == 4 else None)
        src_a, src_b = run(model, codes[a][None].repeat(k, 1)), run(model, codes[b][None].repeat(k, 1))
        out = run(model, mixed)
        rows += [src_a, src_b, out]
        if emb_model is not None:                                          # baseline: average the embeddings
            rows.append(run(emb_model, ((embs[a] + embs[b]) / 2)[None].repeat(k, 1)))  # (k, E) averaged embedding
            avg_imgs.append(rows[-1])
        comps.append(mixed.numpy()); all_imgs.append(out)
    # per sample: the attributes of its two sources (evaluate.py judge scores recombinations) and,
    # for --pick heldout, the held-out combination it should produce
    extra = {}
    if attrs is not None:
        extra["source_attrs"] = np.repeat(attrs[np.array(pairs)], k, axis=0)    # (P*k, 2, 3)
    if targets is not None:
        extra["target_attrs"] = np.repeat(targets, k, axis=0)                  # (P*k, 3)
    sources = np.stack([codes[p].numpy() for p in np.array(pairs).ravel()]).astype(np.uint16)   # (2P, L)
    save_npz(cfg.out, arr_0=np.concatenate(all_imgs), codes=np.concatenate(comps).astype(np.uint16),
             pairs=np.array(pairs), sources=sources, cfg_scale=np.float64(cfg.cfg_scale), **extra)
    if avg_imgs:                                                           # the baseline's images, same pairs
        save_npz(os.path.splitext(cfg.out)[0] + "_embavg.npz", arr_0=np.concatenate(avg_imgs), pairs=np.array(pairs),
                 cfg_scale=np.float64(cfg.cfg_scale), **extra)
    save_grid(np.concatenate(rows), os.path.splitext(cfg.out)[0] + ".png", ncol=k)
    utils.print0(f"rows per pair: source A, source B, DLC composition{', embedding average' if emb_model else ''}; "
                 f"wrote {cfg.out} and {os.path.splitext(cfg.out)[0]}.png")


def mixing_distribution(codes, V, probs=None):
    """(L, V): the mean over the N sources of their one-hot codes (so each position takes the
    token of a source chosen uniformly at random), or of their soft SEMs softmax(z / temp) as the
    authors' sample_comp_imgs.py does (temp -> 0 gives the one-hot mean again).
    codes (N, L) int64; probs (N, L, V) or None."""
    p = F.one_hot(codes, V).double() if probs is None else probs.double()   # (N, L, V)
    return p.mean(0)                                                        # (L, V): each row sums to 1


def sample_mixed_codes(mix, n, gen):
    """n codes, each position drawn independently from its row of mix (L, V). (n, L)"""
    return torch.multinomial(mix, n, replacement=True, generator=gen).T     # (L, n) -> .T -> (n, L)


def encode_image_files(cfg, L, V):
    """DLCs (and soft SEMs at --temp) of --images with the SEM checkpoint --sem_ckpt, by running
    `sem.py encode` on a temporary folder: the SEM encoder lives in sem.py, and scripts talk to
    each other through files and command lines only."""
    import shutil, subprocess, tempfile
    if not cfg.sem_ckpt:
        utils.fail("compose --images needs --sem_ckpt (a sem.py checkpoint, e.g. from `authors.py sem`)")
    for f in cfg.images:
        if not os.path.isfile(f):
            utils.fail(f"--images: {f} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        for i, f in enumerate(cfg.images):                                 # numbered: sem.py sorts by name
            shutil.copy(f, os.path.join(tmp, "images", f"{i:04d}{os.path.splitext(f)[1].lower()}"))
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sem.py"), "encode",
               "--ckpt", cfg.sem_ckpt, "--data", os.path.join(tmp, "images"), "--out", os.path.join(tmp, "dlc"),
               "--device", cfg.device, "--encode_batch", str(len(cfg.images))]
        if cfg.temp > 0:
            cmd += ["--soft_tau", str(cfg.temp)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            utils.fail(f"sem.py encode of --images failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        s = utils.load_dlc_set(os.path.join(tmp, "dlc"), L=L, V=V)
        codes = torch.from_numpy(np.asarray(s["codes"], dtype=np.int64))  # (N, L)
        probs = torch.from_numpy(np.load(os.path.join(tmp, "dlc", "probs.npy"))) if cfg.temp > 0 else None
    return codes, probs


def compose_images(cfg, model, state, device):
    """N-way composition of image files: encode, mix position by position, decode. Rows of the
    grid: each source decoded from its own DLC, then the compositions."""
    L, V, k = model.sem_embedder.L, model.sem_embedder.V, cfg.n_per_pair
    codes, probs = encode_image_files(cfg, L, V)
    mixed = sample_mixed_codes(mixing_distribution(codes, V, probs), k, torch.Generator().manual_seed(cfg.seed))
    decode = latent_decoder(cfg, model, device)
    diffusion = trained_diffusion(state).respace(cfg.sample_steps)        # the schedule the model trained on
    seeds = sample_seeds(cfg.seed, range(k))                                # the same seeds for every row
    run = lambda y: generate(model, diffusion, y.to(device), cfg, seeds, device, decode=decode)
    rows = [run(c[None].repeat(k, 1)) for c in codes] + [run(mixed)]        # one row per source, then the mixed row
    save_npz(cfg.out, arr_0=rows[-1], codes=mixed.numpy().astype(np.uint16), sources=codes.numpy().astype(np.uint16),
             images=np.array(cfg.images), cfg_scale=np.float64(cfg.cfg_scale))
    save_grid(np.concatenate(rows), os.path.splitext(cfg.out)[0] + ".png", ncol=k)
    how = f"soft SEMs at temperature {cfg.temp}" if cfg.temp > 0 else "uniform choice of a source per position"
    utils.print0(f"rows: {len(codes)} sources decoded from their DLCs, then {k} compositions ({how}); "
                 f"wrote {cfg.out} and {os.path.splitext(cfg.out)[0]}.png")


#################################################################################
#     extract (SD-VAE latents, paper scale), embgen and real (the baselines)    #
#################################################################################

@dataclass
class ExtractConfig:
    data_path: str = ""             # ImageFolder root
    latents: str = ""               # output folder (latents.npy, labels.npy, meta.json); an interrupted run resumes
    vae: str = ""                   # local diffusers AutoencoderKL folder (stabilityai/sd-vae-ft-ema)
    image_size: int = 16            # centre crop in pixels (paper: 256 -> 32 x 32 latents)
    batch_size: int = 64            # images per VAE forward
    device: str = "auto"            # auto | cpu | cuda | mps
    POSITIVE = ("image_size", "batch_size")


def extract(cfg):
    """Pre-compute SD-VAE latents (x 0.18215) of an ImageFolder into a float16 memmap
    [N, 2, 4, S/8, S/8]: index 0 the centre crop, 1 its horizontal flip. Training picks one of
    the two at random, which is DiT's random-flip augmentation with no VAE at train time."""
    if not cfg.data_path or not os.path.isdir(cfg.data_path):
        utils.fail(f"--data_path {cfg.data_path!r} is not an ImageFolder root")
    if not cfg.latents:
        utils.fail("--latents OUT_DIR is required (where latents.npy goes)")
    d = utils.setup_dist(cfg.device)
    vae, _ = vae_decoder(cfg, d.device)                                    # fails before writing anything
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size),
                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    try:
        ds = datasets.ImageFolder(cfg.data_path, tf)
    except (FileNotFoundError, RuntimeError) as e:                          # no class folders / no images
        utils.fail(f"--data_path {cfg.data_path}: {e}")
    h = cfg.image_size // 8
    job = {"data_path": os.path.abspath(cfg.data_path), "image_size": cfg.image_size,
           "vae": os.path.abspath(cfg.vae), "n": len(ds)}
    done = extraction_progress(cfg.latents, job)                           # before any encoding
    path, progress = os.path.join(cfg.latents, "latents.npy"), os.path.join(cfg.latents, "progress.json")
    if done is None:                                                       # a new extraction
        os.makedirs(cfg.latents, exist_ok=True)
        mm = np.lib.format.open_memmap(path, "w+", np.float16, (len(ds), 2, 4, h, h))
        utils.save_json({**job, "done": 0}, progress)
        done = 0
    else:                                                                  # resume: finished batches stay
        mm = np.load(path, mmap_mode="r+")
        utils.print0(f"resuming the extraction into {cfg.latents}: {done} of {len(ds)} images already done")
    rest = torch.utils.data.Subset(ds, range(done, len(ds)))
    # worker start-up pays off only for many batches
    workers = min(4, os.cpu_count() or 1) if len(rest) > 8 * cfg.batch_size else 0
    loader = torch.utils.data.DataLoader(rest, batch_size=cfg.batch_size, num_workers=workers)
    from tqdm import tqdm
    i = done
    for xb, _ in tqdm(loader, desc="extract", initial=done // cfg.batch_size):
        xb = xb.to(d.device)
        with torch.no_grad():
            for f, im in enumerate((xb, xb.flip(-1))):  # f = 0: the crop, f = 1: its horizontal flip
                mm[i:i + len(xb), f] = (vae.encode(im).latent_dist.sample() * 0.18215).cpu().numpy()
        i += len(xb)
        mm.flush()                                                         # on disk before it counts as done
        utils.save_json({**job, "done": i}, progress)
    with utils.atomic_path(os.path.join(cfg.latents, "labels.npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.array(ds.targets, dtype=np.int64))
    utils.save_json({"data_path": cfg.data_path, "image_size": cfg.image_size, "vae": cfg.vae,
                     "scale": 0.18215, "flip": "index 1 = horizontal flip"}, os.path.join(cfg.latents, "meta.json"))
    os.remove(progress)                                                    # meta.json without progress.json: finished
    utils.print0(f"wrote {len(ds)} latents to {cfg.latents}")


def extraction_progress(out, job):
    """None for a new extraction (no folder, or an empty one), else the number of images an
    interrupted `extract` of the same job finished. Anything else in `out` is refused."""
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return None
    prog = os.path.join(out, "progress.json")
    if not os.path.isdir(out):
        utils.fail(f"--latents {out} is a file; give a new or empty folder")
    if not os.path.isfile(prog):
        finished = os.path.isfile(os.path.join(out, "meta.json"))
        what = "finished latents" if finished else "files that extract did not write"
        utils.fail(f"--latents {out} already holds {what}; give a new or empty folder (nothing was changed)")
    try:
        old = json.load(open(prog))
        done = int(old["done"])
    except (ValueError, KeyError, TypeError) as e:
        utils.fail(f"{prog} is unreadable ({type(e).__name__}); move {out} aside and extract again")
    diff = [k for k in job if old.get(k) != job[k]]
    if diff:
        utils.fail(f"--latents {out} holds an unfinished extraction of another job ({diff[0]}: {old.get(diff[0])!r}, "
                   f"now {job[diff[0]]!r}); re-run it with its settings or give a new folder")
    if not os.path.isfile(os.path.join(out, "latents.npy")):
        utils.fail(f"{out} has progress.json but no latents.npy; move {out} aside and extract again")
    return done


@dataclass
class EmbgenConfig:
    dlc: str = ""                   # DLC set with embeddings.npy (sem.py encode --continuous) to fit
    n: int = 64                     # embeddings to draw
    gmm_components: int = 32        # Gaussian-mixture components (at most one per embedding)
    seed: int = 0                   # seed of the fit and of the draws
    out: str = ""                   # the .npy to write (float16 [n, D]) for `sample --embeddings`
    POSITIVE = ("n", "gmm_components")


def embgen(cfg):
    """Generated continuous embeddings, the "embedding (generated)" baseline of Table 3. RCG
    trains a diffusion model on the representations; here a much simpler generator stands in:
    a Gaussian mixture (scikit-learn, full covariances) fitted to the encoded embeddings of
    --dlc, from which --n draws go to --out (float16 [n, D] .npy) for `sample --embeddings`."""
    from sklearn.mixture import GaussianMixture
    if not cfg.out.endswith(".npy"):
        utils.fail(f"--out {cfg.out!r} must be a .npy file for embgen")
    e, _ = load_conditions("embedding", cfg.dlc)
    gm = GaussianMixture(min(cfg.gmm_components, len(e)), covariance_type="full", reg_covar=1e-4,
                         random_state=cfg.seed).fit(e.numpy().astype(np.float64))  # fit in float64
    draws = gm.sample(cfg.n)[0][np.random.RandomState(cfg.seed).permutation(cfg.n)]  # sample() groups by component
    with utils.atomic_path(cfg.out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, draws.astype(np.float16))
    print(f"wrote {cfg.n} embeddings drawn from a {gm.n_components}-component Gaussian mixture to {cfg.out} "
          f"(train log-likelihood {gm.score(e.numpy()):.1f} per embedding)")


@dataclass
class RealConfig:
    data: str = "shapes"            # embedded dataset
    data_n: int = 4000              # images of the dataset as training drew them (the first --n are written)
    n: int = 64                     # images to write
    image_size: int = 16            # pixels, as the model was trained
    out: str = "samples.npz"        # the .npz (arr_0 uint8 [N, H, W, C] + attrs or labels)
    POSITIVE = ("n", "data_n", "image_size")


def real(cfg):
    """The first --n training images of the embedded data at the model's --image_size, quantised
    as samples are, with their attributes: the floor of judge-FID (what a perfect model scores)."""
    d = utils.load_embedded(cfg.data, n=max(cfg.n, cfg.data_n))
    extra = {"attrs": d["attrs"][:cfg.n].numpy()} if "attrs" in d else {"labels": d["labels"][:cfg.n].numpy()}
    save_npz(cfg.out, arr_0=utils.to_uint8(resize(d["images"][:cfg.n], cfg.image_size)), **extra)
    print(f"wrote {cfg.n} training images at {cfg.image_size} px to {cfg.out}")


#################################################################################
#                 bench: training and sampling throughput, MFU                  #
#################################################################################

def bench(cfg):
    """Training img/s, MFU (FLOPs counted by torch) and peak memory; sampling img/s with CFG."""
    d = utils.setup_dist(cfg.device)
    in_ch, size = (4, cfg.image_size // 8) if cfg.image_size >= 64 else (3, cfg.image_size)
    model = DiT(cfg.model, size, in_ch, "dlc", L=32, V=64, grad_ckpt=cfg.grad_ckpt, gelu=cfg.gelu).to(d.device)
    net = torch.compile(model) if cfg.compile else model
    diffusion = GaussianDiffusion.make(cfg.schedule, cfg.diffusion_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0, fused=d.device.type == "cuda")
    B, use_bf16 = cfg.batch_size, cfg.bf16 and utils.fast_bf16(d.device)
    amp = lambda: utils.autocast(d.device, use_bf16)
    x = torch.randn(B, in_ch, size, size, device=d.device)                  # fixed inputs: only the speed is measured
    y = torch.randint(0, 64, (B, 32), device=d.device)                     # random L = 32, V = 64 codes
    no_drop, t = torch.zeros(B, dtype=torch.bool, device=d.device), torch.randint(0, 1000, (B,), device=d.device)

    def step(net=net):
        with amp():
            loss = diffusion.training_losses(net, x, t, y, no_drop, torch.randn_like(x))[0].mean()
        opt.zero_grad(); loss.backward(); opt.step()
    step()                                                                 # warm-up (and compilation)
    secs, flops = utils.measure(step, d.device, 3 if d.device.type == "cpu" else 20, count=lambda: step(model))
    peak = utils.matmul_peak_flops(d.device, torch.bfloat16 if use_bf16 else torch.float32)
    model.eval()
    tt = torch.full((B,), 500, device=d.device)                             # a mid-chain timestep
    with torch.no_grad(), amp():                                           # one chain step with CFG
        chain, _ = utils.measure(lambda: model.forward_with_cfg(x, tt, y, 1.5, cfg.cfg_channels), d.device, 5)
    utils.print0(f"bench {cfg.model} {in_ch}x{size}x{size} batch {B} on {d.device}: train {B / secs:.1f} img/s, "
                 f"peak memory {utils.peak_memory_mb(d.device):.0f} MB, MFU {100 * flops / secs / peak:.1f}% "
                 f"(matmul peak {peak / 1e12:.2f} TFLOP/s), sampling {B / (chain * cfg.sample_steps):.3g} img/s "
                 f"({cfg.sample_steps} steps, CFG)")


COMMANDS = {name: (fn, cls, utils.presets_for(PRESETS, cls)) for name, fn, cls in (
    ("train", train, Config), ("sample", sample, SampleConfig), ("compose", compose, ComposeConfig),
    ("embgen", embgen, EmbgenConfig), ("extract", extract, ExtractConfig), ("real", real, RealConfig),
    ("bench", bench, Config))}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
