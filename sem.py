"""SEM encoder: a DINOv2 ViT with a Simplicial Embedding head, trained by self-distillation,
and DLC encoding (DLC paper, Lavoie et al. 2025, Sections 4 "Inferring Discrete Latent Codes"
and 5 "Setup for inferring DLC"; its Table 3 probe is evaluate.py probe).

A DLC is the argmax of each of the L softmax groups of a SEM head put on a self-supervised
ViT: pre-norm CLS + register tokens -> Linear -> LayerNorm -> (L, V) -> softmax(x / tau) per
group -> Linear -> the backbone's final norm, which replaces the normalised CLS that the
DINO head sees. Training is DINOv2 (DINO CLS loss with multi-crop and centering, or
DINOv2's Sinkhorn-Knopp teacher with --centering sinkhorn; iBOT masked patch loss; KoLeo)
with an EMA teacher. Facts (key names, shapes, losses, defaults) come from
https://github.com/facebookresearch/dinov2 (dinov2/models/vision_transformer.py,
dinov2/layers/{block,attention,mlp,swiglu_ffn,layer_scale,patch_embed}.py,
dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py, dinov2/utils/param_groups.py)
and the authors' fork https://github.com/lavoiems/DiscreteLatentCode (mirror
sarvghotra/DiscreteLatentCode, commit 64d4c8d, dinov2/dinov2/models/vision_transformer.py:
DinoVisionTransformerWithSEM); the code here is written from those facts.

Commands (more in docs/sem.md):
  python sem.py                                    # toy: shapes data, CPU, a few minutes
  python sem.py encode --ckpt runs/sem-toy --data shapes --out runs/dlc-shapes [--continuous]
  python sem.py --preset imagenet --data /imagenet/train --init dinov2_vitl14_reg4_pretrain.pth
  python authors.py sem --authors SEM_dinov2_L512 --out sem_authors.pt --L 512 --V 256  # their encoder, then encode
  python sem.py bench                              # img/s, peak memory, MFU
"""
import dataclasses, math, os, sys, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import utils


#################################################################################
#       Configs: the ViT, then one per sub-command                              #
#################################################################################

@dataclass
class ViTConfig:
    """The SEM ViT and its input size: what SEMViT reads, and what encode takes from a checkpoint."""
    arch: str = "toy"             # toy | vit_s | vit_b | vit_l | vit_g (paper: vit_l)
    patch: int = 8                # patch size (paper: 14)
    pos_grid: int = 4             # grid of the stored pos-embed (DINOv2: 37 = 518 / 14)
    registers: int = 4            # register tokens (paper: 4)
    drop_path: float = 0.0        # stochastic depth (DINOv2 ViT-L: 0.4)
    ls_init: float = 0.1          # LayerScale init (DINOv2: 1e-5; the toy trains from scratch in minutes)
    grad_ckpt: bool = False       # activation checkpointing per block (ViT-L at batch 64 needs it in 80 GB)
    L: int = 128                  # SEM groups = code length (paper: 512; the toy's 128: see docs/sem.md)
    V: int = 16                   # SEM vocabulary per group (paper: 256)
    tau: float = 1.0              # SEM softmax temperature while training (paper: 1.0)
    size: int = 32                # global crop / encoding resolution (paper: 224)
    POSITIVE = ("size", "patch", "L", "V")  # fields the parser requires to be > 0


@dataclass
class Base(ViTConfig):
    """What train, encode and bench add to the ViT: the machine and the images."""
    seed: int = 0                 # base seed (per rank and per step)
    device: str = "auto"          # auto | cpu | cuda | mps
    threads: int = 0              # CPU threads for torch (0: torch's default; 1 on a busy machine)
    data: str = "shapes"          # digits | shapes | ImageFolder path | img2dataset folder
    n: int = 4000                 # images of the embedded shapes data


@dataclass
class Config(Base):
    """train: DINOv2 self-distillation of the SEM ViT; the paper's values in the comments."""
    run: str = "toy"              # run folder runs/sem-<run>/
    resume: bool = False          # continue from the newest checkpoint of the run
    overwrite: bool = False       # replace an earlier run in the same folder
    out: str = ""                 # unused by train; accepted, so that train and encode lines may share it
    steps: int = 500              # optimiser steps (paper: 125k = 100 "epochs" of 1250)
    schedule: int = 0             # lr / wd / momentum cosine length (0: --steps); --resume keeps the checkpoint's
    batch_size: int = 32          # images per process (paper: 64 per GPU)
    compile: bool = False         # torch.compile the student backbone
    workers: int = 0              # DataLoader workers (0: augment in the main process)
    init: str = ""                # official DINOv2 backbone .pth to start from (strict load)
    head_hidden: int = 256        # DINO head MLP width (paper: 2048)
    head_bottleneck: int = 64     # DINO head bottleneck (paper: 256)
    prototypes: int = 256         # DINO / iBOT prototypes (paper: 65536)
    local_crops: int = 2          # local crops per image (paper: 8)
    local_size: int = 16          # local crop resolution (paper: 98)
    global_scale: float = 0.8     # global crop min scale (paper: 0.32; the toy keeps the whole shape); local up to this
    local_scale: float = 0.4      # local crop min scale (paper: 0.05: too small for 32 px shapes)
    jitter: float = 0.4           # brightness / contrast jitter (paper: 0.4), saturation half
    hue: float = 0.1              # hue jitter (paper: 0.1)
    grayscale_p: float = 0.0      # grayscale probability (paper: 0.2; 0 for shapes)
    solarize_p: float = 0.0       # solarise probability on the 2nd global crop (paper: 0.2)
    blur_p: float = 0.0           # Gaussian blur probability (paper: 1.0 / 0.1 / 0.5; CPU-costly)
    student_temp: float = 0.1     # DINO / iBOT student temperature
    teacher_temp: float = 0.07    # final teacher temperature
    warmup_teacher_temp: float = 0.04  # initial teacher temperature
    teacher_temp_steps: int = 100  # teacher temperature warm-up (paper: 30 epochs = 37.5k)
    center_momentum: float = 0.9  # centering EMA
    centering: str = "centering"  # teacher: centering (EMA centre; the authors) | sinkhorn (DINOv2's Sinkhorn-Knopp)
    sinkhorn_iters: int = 3       # Sinkhorn-Knopp iterations (DINOv2: 3)
    dino_weight: float = 1.0      # DINO CLS loss weight
    ibot_weight: float = 1.0      # iBOT masked-patch loss weight
    koleo_weight: float = 1.0     # KoLeo weight (paper: 0.1)
    mask_prob: float = 0.5        # fraction of global crops that get masked
    mask_ratio: str = "0.1,0.5"   # masked-patch ratio range, spread over the masked crops
    mask_mode: str = "random"     # "block" (DINOv2 / BEiT rectangles; imagenet preset) or "random" patches
    lr: float = 1e-2              # base lr, scaled by sqrt(global batch / 1024) (paper: 1e-4)
    min_lr: float = 1e-6          # cosine end
    warmup: int = 30              # lr warm-up steps (paper: 10 epochs = 12.5k)
    wd: float = 0.04              # weight decay start
    wd_end: float = 0.4           # weight decay end (cosine)
    layer_decay: float = 0.9      # layer-wise lr decay
    clip: float = 3.0             # gradient-norm clip
    freeze_last: int = 30         # steps with the DINO head's last layer frozen (paper: 1250)
    momentum: float = 0.992       # teacher EMA momentum start, cosine -> 1
    log_every: int = 1            # log line every N steps
    ckpt_every: int = 1000        # checkpoint every N steps (and at the end)
    POSITIVE = ("steps", "batch_size", "n", "size", "patch", "L", "V", "prototypes", "local_size", "log_every",
                "ckpt_every", "sinkhorn_iters")


@dataclass
class EncodeConfig(Base):
    """encode: the DLC set of --data; the ViT fields and size of our checkpoint win over these defaults."""
    ckpt: str = ""                # our checkpoint file or run folder, or an official DINOv2 .pth (fresh SEM head)
    out: str = ""                 # output DLC set folder
    overwrite: bool = False       # replace an existing DLC set at --out
    continuous: bool = False      # also write embeddings.npy (normalised CLS)
    encode_batch: int = 256       # images per batch
    soft_tau: float = 0.0         # also write probs.npy, the soft SEM softmax(z / soft_tau) (N, L, V); 0 = off
    POSITIVE = ("n", "size", "patch", "L", "V", "encode_batch")


# Presets of train (bench, encode and authors.py sem take the fields they have, see utils.presets_for)
PRESETS = {
    "toy": {},
    "imagenet": dict(run="imagenet", steps=125_000, batch_size=64, size=224, workers=10,
                     arch="vit_l", patch=14, pos_grid=37, registers=4, drop_path=0.4, ls_init=1e-5,
                     L=512, V=256, head_hidden=2048, head_bottleneck=256, prototypes=65536,
                     local_crops=8, local_size=98, global_scale=0.32, local_scale=0.05, koleo_weight=0.1,
                     hue=0.1, grayscale_p=0.2, solarize_p=0.2, blur_p=0.5,
                     teacher_temp_steps=37_500, lr=1e-4, warmup=12_500, freeze_last=1250,
                     ckpt_every=5000, log_every=10, compile=True, grad_ckpt=True, mask_mode="block"),
}
ENCODE_PRESETS = {"toy": {}, "imagenet": dict(encode_batch=128)}   # encode's and bench's own preset values


# name: (width, depth, heads, ffn); DINOv2 hub models (dinov2/hub/backbones.py)
ARCHS = {"toy": (64, 4, 4, "mlp"), "vit_s": (384, 12, 6, "mlp"), "vit_b": (768, 12, 12, "mlp"),
         "vit_l": (1024, 24, 16, "mlp"), "vit_g": (1536, 40, 24, "swiglu")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation


#################################################################################
#          The ViT: parameter names and shapes of the official checkpoints      #
#################################################################################

class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)  # key: patch_embed.proj.weight

    def forward(self, x):                                    # (B, 3, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)       # (B, H/p * W/p, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        # one fused D -> 3D projection for q, k, v
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        x = utils.attention(q, k, v)                                          # fused (flash / mem-efficient on GPU)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, h, T, d) -> (B, T, h*d) = (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)  # DINOv2 ViT-S/B/L FFN: hidden width 4D

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's FFN: keys mlp.w12 (D -> 2H) and mlp.w3 (H -> D), H = 2/3 * 4D rounded up to 8."""
    def __init__(self, dim):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # 2/3 of 4D, rounded up to a multiple of 8 (ViT-g: 4096)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)  # (B, T, 2H) -> gate a, value b, each (B, T, H)
        return self.w3(F.silu(a) * b)  # SwiGLU: W3 (silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))  # key: ls1.gamma / ls2.gamma

    def forward(self, x):
        return x * self.gamma  # per-channel residual scale; a small init keeps a new block near identity


class Block(nn.Module):
    def __init__(self, dim, heads, ffn, drop_path, ls_init=1e-5):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim, ls_init)
        self.norm2, self.ls2 = nn.LayerNorm(dim, eps=1e-6), LayerScale(dim, ls_init)
        self.mlp = SwiGLU(dim) if ffn == "swiglu" else Mlp(dim)
        self.drop_path = drop_path

    def residual(self, x, f):
        """x + f(x), with stochastic depth: drop f for whole samples while training."""
        y = f(x)
        if self.training and self.drop_path > 0:
            keep = torch.rand(len(x), 1, 1, device=x.device) >= self.drop_path  # (B, 1, 1): one draw per sample
            y = y * keep / (1 - self.drop_path)  # rescale the kept samples so that E[y] is unchanged
        return x + y

    def forward(self, x):
        x = self.residual(x, lambda t: self.ls1(self.attn(self.norm1(t))))  # pre-norm: x + ls1(attn(norm1(x)))
        return self.residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))))  # then x + ls2(mlp(norm2(x)))


def interpolate_pos_embed(pos, grid):
    """Bicubic resize of the stored (1, 1 + M*M, D) pos-embed to (1, 1 + grid*grid, D);
    the CLS position is kept; identity when grid == M (DINOv2 interpolate_pos_encoding)."""
    M = math.isqrt(pos.shape[1] - 1)  # side of the stored grid (DINOv2: 37)
    if grid == M:
        return pos
    patch = pos[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)      # (1, D, M, M)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True)  # (1, D, g, g)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)  # (1, g*g, D)
    return torch.cat([pos[:, :1], patch], dim=1)  # (1, 1 + g*g, D), CLS position first


class SEMViT(nn.Module):
    """DINOv2 ViT (keys as in the official checkpoints) + the SEM head (sem_embed, sem_norm,
    sem_out: the authors' names). forward -> dict of the SEM-projected normalised CLS, the
    normalised patch tokens, the soft SEM (B, L, V) and the backbone's normalised CLS."""
    def __init__(self, cfg):
        super().__init__()
        if cfg.arch not in ARCHS:
            utils.fail(f"unknown --arch {cfg.arch!r}; use one of {', '.join(ARCHS)}")
        D, depth, heads, ffn = ARCHS[cfg.arch]
        self.cfg, self.embed_dim, self.patch = cfg, D, cfg.patch
        self.patch_embed = PatchEmbed(cfg.patch, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 1e-6)  # (1, 1, D) learned CLS token
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.pos_grid ** 2, D) * 0.02)  # (1, 1 + G*G, D), G = pos_grid
        if cfg.registers:  # reg4 checkpoints only; the no-register ones have no such key
            self.register_tokens = nn.Parameter(torch.randn(1, cfg.registers, D) * 1e-6)  # (1, R, D)
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # (1, D): stands in for masked patches (iBOT)
        # drop-path rates 0 -> drop_path over the blocks, DINOv2's float32 values; on the CPU even under
        # `with torch.device("meta")` (authors.py), since .tolist() needs real values
        dpr = torch.linspace(0, cfg.drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(D, heads, ffn, p, cfg.ls_init) for p in dpr)
        self.norm = nn.LayerNorm(D, eps=1e-6)  # final norm: patch tokens, backbone CLS and the SEM output
        LV = cfg.L * cfg.V
        self.sem_embed = nn.Linear(D * (1 + cfg.registers), LV, bias=False)  # (1+R)*D -> L*V logits
        self.sem_norm = nn.LayerNorm(LV, eps=1e-6)  # one LayerNorm over all L*V logits, before the per-group softmax
        self.sem_out = nn.Linear(LV, D, bias=False)  # L*V -> D: the soft code back to the CLS width
        for m in self.modules():  # timm / DINOv2 init: trunc-normal 0.02 linears, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def sem(self, tokens, tau):
        """Simplicial Embedding (Sec. 4): tokens (B, 1+R, D) pre-norm CLS + registers."""
        z = self.sem_norm(self.sem_embed(tokens.flatten(1)))       # (B, L*V)
        z = z.view(len(z), self.cfg.L, self.cfg.V)                 # (B, L, V)
        p = torch.softmax(z.float() / tau, dim=-1)                 # fp32 island: tau can be 1e-5
        return p, self.sem_out(p.flatten(1).to(z.dtype))           # (B, L, V), (B, D)

    def forward(self, x, masks=None, tau=None):
        B, _, H, W = x.shape  # H = W: a square crop, global (S) or local (s)
        t = self.patch_embed(x)                                    # (B, N, D)
        if masks is not None:  # iBOT: masked patches become the learned mask token
            t = torch.where(masks[..., None], self.mask_token.to(t.dtype), t)  # masks (B, N) -> (B, N, 1) over D
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], 1)    # (B, 1+N, D)
        t = t + interpolate_pos_embed(self.pos_embed, H // self.patch)  # pos-embed resized to this crop's (H/p)^2 grid
        R = self.cfg.registers
        if R:  # registers go after CLS and get no position (DINOv2 reg models)
            t = torch.cat([t[:, :1], self.register_tokens.expand(B, -1, -1), t[:, 1:]], 1)  # (B, 1+R+N, D)
        for blk in self.blocks:  # activation checkpointing recomputes each block in backward
            ckpt = self.cfg.grad_ckpt and self.training and torch.is_grad_enabled()
            t = torch.utils.checkpoint.checkpoint(blk, t, use_reentrant=False) if ckpt else blk(t)
        normed = self.norm(t)  # (B, 1+R+N, D)
        # the SEM reads the pre-norm CLS + registers t[:, :1+R], (B, 1+R, D)
        probs, cls = self.sem(t[:, :1 + R], self.cfg.tau if tau is None else tau)
        return {"cls": self.norm(cls), "probs": probs, "patch": normed[:, 1 + R:],  # cls = norm(sem_out(p)): DINO input
                "backbone_cls": normed[:, 0]}  # (B, D) plain DINOv2 CLS (--continuous)


def is_sem_key(k):
    return k.startswith("sem_")  # sem_embed / sem_norm / sem_out: absent from official DINOv2 files


def load_official(model, path):
    """Strictly load an official DINOv2 backbone file into `model` (SEM head stays fresh).
    Any missing / unexpected key or shape mismatch stops: no silent partial load."""
    if not os.path.isfile(path):
        utils.fail(f"--init file {path} does not exist; download e.g. dinov2_vitl14_reg4_pretrain.pth")
    sd = utils.load_checkpoint(path)
    # a training checkpoint's teacher / model, or a bare state dict
    sd = sd.get("teacher", sd.get("model", sd)) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        utils.fail(f"{path} holds a {type(sd).__name__}, not a DINOv2 state dict or a sem.py checkpoint")
    # training checkpoints prefix the ViT keys with backbone.
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    ours = {k: v for k, v in model.state_dict().items() if not is_sem_key(k)}  # the SEM head is ours alone
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    bad = [k for k in set(ours) & set(sd) if tuple(ours[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        utils.fail(f"{path} does not match --arch {model.cfg.arch} (patch {model.patch}, pos_grid "
                   f"{model.cfg.pos_grid}, registers {model.cfg.registers}): missing {missing[:4]}, "
                   f"unexpected {unexpected[:4]}, wrong shape {sorted(bad)[:4]}; refusing a partial load")
    model.load_state_dict(sd, strict=False)  # strict on the backbone (checked above); SEM is new


#################################################################################
#              DINO head and the three losses (DINOv2 defaults)                 #
#################################################################################

class DINOHead(nn.Module):
    """3-layer MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes (g = 1)."""
    def __init__(self, D, hidden, bottleneck, K):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, K, bias=False)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck), unit L2 norm
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))  # weight norm, g fixed to 1


def teacher_probs(logits, center, temp):
    """Centering + sharpening: softmax((t - c) / tau_t); the centre is updated separately."""
    return torch.softmax((logits - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center, logits, m):
    """c <- m c + (1 - m) mean_batch(t), the batch mean all-reduced over ranks."""
    mean = logits.mean(0, keepdim=True)  # (1, K) mean teacher logit of this rank
    if dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    center.mul_(m).add_(mean, alpha=1 - m)


@torch.no_grad()
def sinkhorn_probs(logits, temp, iters=3):
    """DINOv2's alternative to centering (train.centering: sinkhorn_knopp, after SwAV;
    https://github.com/facebookresearch/dinov2 dinov2/loss/dino_clstoken_loss.py): start from
    Q = exp(t / tau_t) (K x B), scaled to total mass 1, then `iters` times give every prototype
    mass 1/K (rows) and every sample mass 1/B (columns); returns B x Q^T, whose rows (samples) sum
    to 1 and whose column means (prototype marginals) tend to 1/K, so the batch cannot pile onto a
    few prototypes. logits: (B, K) for the B samples of this rank; sums are all-reduced over ranks
    (B is the global count: DINOv2 iBOT uses the number of masked patches)."""
    def reduce(x):
        if dist.is_initialized():
            dist.all_reduce(x)
        return x
    # the head's logits are cosines (|t| <= 1), so exp(t / tau_t) stays finite in fp32 for tau_t > 0.012;
    # a rank with no masked patch (B = 0 here) still joins every all_reduce
    q = torch.exp(logits.float() / temp).t()                              # (K, B)
    K, B = q.shape[0], reduce(torch.tensor(float(q.shape[1]), device=q.device))  # B: global sample count (a tensor)
    q /= reduce(q.sum())  # total mass 1
    for _ in range(iters):
        q /= reduce(q.sum(1, keepdim=True)) * K                            # rows: 1/K each
        q /= q.sum(0, keepdim=True) * B                                    # columns: 1/B each
    return (q * B).t()                                                     # (B, K), rows sum to 1


def dino_loss(student_logits, teacher_p, temp):
    """DINO CLS loss: mean over pairs (teacher global i, student crop j != i) of
    -sum_k p_t,i[k] log softmax(s_j / tau_s)[k], averaged over the batch.
    student_logits: list of (B, K) per crop (globals first); teacher_p: list of (B, K)."""
    total, pairs = 0.0, 0
    for j, s in enumerate(student_logits):
        logp = F.log_softmax(s.float() / temp, dim=-1)  # (B, K) student log-probs at tau_s, fp32
        for i, t in enumerate(teacher_p):  # teacher: the 2 global crops only
            if i != j:
                total = total + (-(t * logp).sum(-1)).mean()  # cross-entropy H(p_t, p_s); t is a constant target
                pairs += 1
    return total / pairs  # pairs = 2 (2 + n_local) - 2: a global view skips itself


def ibot_loss(student_logits, teacher_p, masks, temp):
    """iBOT masked-patch loss on the masked patches only; each image's masked patches share
    weight 1 (DINOv2: 1 / #masked per image), averaged over all global crops.
    student_logits, teacher_p: (M, K) for the M masked patches; masks: (G, N) bool."""
    per_patch = -(teacher_p * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(-1)  # (M,)
    w = (1 / masks.sum(1).clamp(min=1.0))[:, None].expand_as(masks)[masks]                   # (M,)
    return (per_patch * w).sum() / len(masks)  # each masked image weighs 1; / G crops


def koleo_loss(x, eps=1e-8):
    """KoLeo (Sablayrolles et al. 2019): -mean_i log(min_{j != i} ||x_i - x_j||) on L2-normalised x."""
    x = F.normalize(x.float(), dim=-1, eps=eps)  # (B, D) on the unit sphere, fp32
    d = torch.cdist(x, x)  # (B, B) pairwise distances
    d = d + torch.eye(len(x), device=x.device) * 1e9                       # exclude i == j
    return -torch.log(d.min(dim=1).values + eps).mean()  # -mean log(NN distance): spreads the batch out


#################################################################################
#          Data: embedded sets, ImageFolder / img2dataset, multi-crop           #
#################################################################################

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


class Images:
    """Indexable images as float (3, H, W) in [0, 1] (embedded) or PIL (files) + metadata."""
    def __init__(self, cfg):
        self.labels = self.captions = self.attrs = self.index = None
        self.data_meta = None
        if cfg.data in ("digits", "shapes", "shapes-heldout", "shapes-all"):
            d = utils.load_embedded(cfg.data, n=cfg.n, size=cfg.size, seed=0)
            x = (d["images"] + 1) / 2                                    # [-1, 1] -> [0, 1]
            if x.shape[1] == 1:  # digits: 8 x 8 grey -> 3 channels at the model size
                x = F.interpolate(x.repeat(1, 3, 1, 1), size=cfg.size, mode="bilinear", align_corners=False)
            self.tensors, self.labels, self.captions = x, d["labels"].numpy(), d["captions"]
            self.attrs = d["attrs"].numpy() if "attrs" in d else None
            self.data_meta = {"name": cfg.data, "n": cfg.n, "size": cfg.size, "seed": 0}
            self.n = len(x)
            return
        if not os.path.isdir(cfg.data):
            utils.fail(f"--data {cfg.data!r} is neither digits/shapes nor a folder of images")
        self.root = cfg.data
        # sorted: the same image order on every rank and run
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(cfg.data) for f in fs if f.endswith(IMG_EXT))
        if not self.files:
            utils.fail(f"no images ({', '.join(IMG_EXT[:5])}) found under {cfg.data}; check --data")
        self.n, self.tensors = len(self.files), None
        self.index = [os.path.relpath(f, cfg.data) for f in self.files]  # relative paths: the DLC set's index.txt
        txt = [os.path.splitext(f)[0] + ".txt" for f in self.files]
        if all(os.path.isfile(t) for t in txt):  # img2dataset: 000001.jpg + 000001.txt caption
            self.captions = [open(t).read().strip() for t in txt]
        elif all(os.sep in i for i in self.index):  # ImageFolder: class = first folder
            classes = sorted({i.split(os.sep)[0] for i in self.index})
            self.labels = np.array([classes.index(i.split(os.sep)[0]) for i in self.index])
        self.data_meta = {"name": os.path.abspath(cfg.data), "n": self.n, "size": cfg.size, "seed": 0}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.tensors is not None:
            return self.tensors[i]
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return im.convert("RGB")  # grey / RGBA / palette -> 3 channels
        except Exception as e:
            utils.fail(f"cannot read image {self.files[i]} ({type(e).__name__}); remove or replace it")


def adm_center_crop(img, size):
    """ADM / guided-diffusion centre crop: halve with BOX while large, BICUBIC so the short
    side is `size`, then crop the centre. Tensors already at `size` pass through."""
    from torchvision.transforms.v2 import functional as TF
    if torch.is_tensor(img):
        # embedded (3, H, W) tensor: resize + crop only if not at size
        return TF.center_crop(TF.resize(img, size, antialias=True), size) if img.shape[-1] != size else img
    from PIL import Image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
    return TF.center_crop(TF.to_dtype(TF.to_image(img), torch.float32, scale=True), size)  # (3, size, size) in [0, 1]


def make_augment(cfg, out, scale, solarize_p=0.0):
    """DINOv2 crop pipeline with torchvision.transforms.v2. For the shapes data colour is one
    of the three attributes that define an image: grayscale would make a red and a blue
    triangle two views of the same thing and teach the encoder to ignore colour, so the toy
    sets grayscale_p = 0. DINOv2's small hue jitter (0.1) stays: the five colours remain apart
    and the exact colour values stop being a shortcut."""
    from torchvision.transforms import v2
    jitter = v2.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter / 2, cfg.hue)  # brightness, contrast, saturation, hue
    ops = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
           v2.RandomResizedCrop(out, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
           v2.RandomApply([jitter], p=0.8), v2.RandomGrayscale(cfg.grayscale_p),
           v2.RandomApply([v2.GaussianBlur(max(3, out // 10 * 2 + 1), (0.1, 2.0))], p=cfg.blur_p),
           v2.RandomSolarize(0.5, p=solarize_p), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


class MultiCropSteps(torch.utils.data.Dataset):
    """Item s = the whole batch of step s for this rank: 2 global + n local crops per image and
    the iBOT masks. Everything random is drawn from a generator seeded by (seed, rank, step),
    so a resumed run sees exactly the batches it would have seen (our stand-in for
    DistributedSampler + set_epoch: each epoch is a seeded permutation sharded over ranks)."""
    def __init__(self, images, cfg, rank, world):
        self.images, self.cfg, self.rank, self.world = images, cfg, rank, world
        self.g1 = make_augment(cfg, cfg.size, (cfg.global_scale, 1.0))  # global view 1: never solarised
        self.g2 = make_augment(cfg, cfg.size, (cfg.global_scale, 1.0), cfg.solarize_p)  # view 2: solarised (solarize_p)
        self.loc = make_augment(cfg, cfg.local_size, (cfg.local_scale, cfg.global_scale))  # local: area <= global_scale
        self.per_epoch = max(1, len(images) // (cfg.batch_size * world))  # steps per epoch; the remainder is dropped

    def __len__(self):
        return self.cfg.steps

    def __getitem__(self, step):
        cfg, B = self.cfg, self.cfg.batch_size
        epoch, k = divmod(step, self.per_epoch)  # k: the batch within the epoch
        # epoch-seeded: the same permutation on every rank
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[self.rank::self.world][k * B:(k + 1) * B]  # rank's shard (disjoint), then its batch k
        torch.manual_seed((cfg.seed * 7919 + self.rank) * 1_000_003 + step)  # v2 uses the global RNG
        imgs = [self.images[int(i)] for i in idx]  # B images (tensors or PIL)
        g = torch.stack([torch.stack([self.g1(im) for im in imgs]),
                         torch.stack([self.g2(im) for im in imgs])])                    # (2, B, 3, S, S)
        loc = [torch.stack([self.loc(im) for im in imgs]) for _ in range(cfg.local_crops)]  # n x (B, 3, s, s)
        # masks: (2B, (S/p)^2) bool, one row per global crop
        return g, loc, ibot_masks(2 * B, cfg.size // cfg.patch, cfg.mask_prob, cfg.mask_ratio, cfg.mask_mode)


def ibot_masks(n, side, prob, ratio, mode="block"):
    """DINOv2's collate (mode "block"): int(n * prob) of the n global crops get a block mask, their
    target ratios spread evenly over the range (crop i draws from the i-th of n_masked equal
    slices), at most half the patches in one block; the rows are then shuffled. Mode "random"
    (the toy's default): each crop is masked with probability prob, that many patches
    scattered uniformly. (n, side^2) bool."""
    lo, hi = (float(v) for v in ratio.split(","))
    N, k = side * side, int(n * prob)  # k: crops that get a block mask
    masks = torch.zeros(n, N, dtype=torch.bool)
    if mode == "random":
        for r in range(n):
            if torch.rand(()) < prob:
                m = int(N * (lo + (hi - lo) * torch.rand(()).item()))  # ratio uniform in [lo, hi)
                masks[r, torch.randperm(N)[:m]] = True  # m distinct random patches
        return masks
    edges = torch.linspace(lo, hi, k + 1)  # k equal slices of [lo, hi]
    for i in range(k):
        target = int(N * (edges[i] + (edges[i + 1] - edges[i]) * torch.rand(())).item())
        masks[i] = block_mask(side, side, target, max_patches=N // 2).flatten()  # (side, side) -> (N,)
    return masks[torch.randperm(n)]  # masked rows land on random crops


def block_mask(h, w, target, min_patches=4, max_patches=None, min_aspect=0.3):
    """BEiT block masking (as DINOv2's MaskingGenerator): add rectangles of random area in
    [min_patches, budget] and log-uniform aspect ratio in [min_aspect, 1 / min_aspect] at random
    places until `target` patches are masked, or until 10 tries in a row add nothing."""
    mask, count = torch.zeros(h, w, dtype=torch.bool), 0
    log_a = math.log(min_aspect)
    while count < target:
        budget, added = min(target - count, max_patches or target), 0  # max patches this rectangle may add
        for _ in range(10):
            area = min_patches + (budget - min_patches) * torch.rand(()).item()  # uniform in [min_patches, budget]
            aspect = math.exp(log_a - 2 * log_a * torch.rand(()).item())  # log-uniform in [a, 1/a]
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))  # bh*bw ~ area, bh/bw ~ aspect
            if bh < h and bw < w:
                top, left = int(torch.randint(0, h - bh + 1, ())), int(torch.randint(0, w - bw + 1, ()))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())  # newly masked: overlap not counted
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


#################################################################################
#         Training: schedules, param groups (layer decay), one DINOv2 step      #
#################################################################################

def cosine(start, end, step, total, warmup=0, warm_from=0.0):
    """Linear warm-up from warm_from to start over `warmup` steps, then cosine start -> end."""
    if step < warmup:
        return warm_from + (start - warm_from) * step / warmup  # linear warm-up
    t = (step - warmup) / max(1, total - warmup)  # cosine progress; held at end past total
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, t)))  # start at t = 0, end at t = 1


def param_groups(student, layer_decay):
    """One group per parameter: lr x decay^(depth+1 - layer), no weight decay on biases, norms,
    LayerScale, tokens and pos-embed (DINOv2 dinov2/utils/param_groups.py)."""
    depth, groups = len(student.backbone.blocks), []
    embed = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token")
    for name, p in student.named_parameters():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1  # backbone.blocks.<i>.* -> layer i + 1
        elif name.startswith("backbone.") and any(s in name for s in embed):
            layer = 0  # embeddings: the smallest lr multiplier
        else:  # final norm, SEM head, DINO head
            layer = depth + 1
        # no weight decay: biases, norms, LayerScale, tokens, pos-embed
        no_wd = p.ndim == 1 or name.endswith(("token", "tokens", "pos_embed", "gamma"))
        groups.append({"params": [p], "lr_mult": layer_decay ** (depth + 1 - layer),
                       "wd_mult": 0.0 if no_wd else 1.0, "last_layer": "last_layer" in name})
    return groups  # per-group lr_mult / wd_mult are applied by set_schedules


class Student(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = SEMViT(cfg)
        # one head for the CLS (DINO) and patch (iBOT) logits
        self.head = DINOHead(self.backbone.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes)

    def forward(self, globals_, locals_, masks):
        g = self.backbone(globals_, masks)                                  # (2B, ...)
        loc = [self.backbone(x)["cls"] for x in locals_]                   # n x (B, D)
        cls_logits = self.head(torch.cat([g["cls"], *loc]))                # ((2+n)B, K)
        patch_logits = self.head(g["patch"][masks])                        # (M, K)
        return g["cls"], cls_logits, patch_logits  # (2B, D) CLS of the globals: the KoLeo input


def train_step(student, teacher, centers, batch, cfg, step, d):
    """The DINOv2 objective on one batch; returns the total loss and its parts."""
    g, loc, masks = batch  # (2, B, 3, S, S), n x (B, 3, s, s), (2B, N)
    g = g.flatten(0, 1).to(d.device)                                       # (2B, 3, S, S)
    loc, masks = [x.to(d.device) for x in loc], masks.to(d.device)
    # teacher temperature: linear warm-up warmup_teacher_temp -> teacher_temp, then constant (DINOv2)
    T0, T, W = cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.teacher_temp_steps
    temp = T if step >= W else T0 + (T - T0) * step / W  # T0 at step 0 -> T at step W
    # bf16 on CUDA only: on an AMX CPU the toy step is slower in bf16 (BENCHMARKS.md), its matmuls
    # being too small to pay for the casts; encoding does gain (see encode)
    amp = utils.autocast(d.device, enabled=d.device.type == "cuda")
    with torch.no_grad(), amp:  # the teacher never gets a gradient
        t = teacher.backbone(g)  # the teacher sees the 2 global crops only, unmasked
        t_cls = teacher.head(t["cls"]).float()                             # (2B, K)
        t_patch = teacher.head(t["patch"][masks]).float()                  # (M, K)
        if cfg.centering == "sinkhorn":  # DINOv2: over all global crops at once; iBOT over the masked patches
            p_cls = sinkhorn_probs(t_cls, temp, cfg.sinkhorn_iters)
            p_patch = sinkhorn_probs(t_patch, temp, cfg.sinkhorn_iters)
        else:
            p_cls = teacher_probs(t_cls, centers["cls"], temp)
            p_patch = teacher_probs(t_patch, centers["patch"], temp)
    with amp:
        s_cls, s_logits, s_patch = student(g, loc, masks)  # student: masked globals + locals
        n = 2 + len(loc)
        # s_logits ((2 + locals) B, K) -> n chunks of (B, K), one per crop; teacher (2B, K) -> 2
        parts = {"dino": dino_loss(list(s_logits.chunk(n)), list(p_cls.chunk(2)), cfg.student_temp),
                 "ibot": ibot_loss(s_patch, p_patch, masks, cfg.student_temp) if masks.any() else s_patch.sum() * 0,
                 "koleo": sum(koleo_loss(c) for c in s_cls.chunk(2))}  # KoLeo within each global view's batch
    loss = cfg.dino_weight * parts["dino"] + cfg.ibot_weight * parts["ibot"] + cfg.koleo_weight * parts["koleo"]
    if cfg.centering == "centering":  # Sinkhorn keeps no centre (DINOv2 updates it only when centering)
        update_center(centers["cls"], t_cls, cfg.center_momentum)
        if len(t_patch):  # skipped without masked patches: the mean would be NaN
            update_center(centers["patch"], t_patch, cfg.center_momentum)
    return loss, parts


def run_dir(cfg):
    return os.path.join("runs", f"sem-{cfg.run}")


def set_threads(cfg):
    # why: on a shared CPU, torch's worker threads wait on each other; 1 thread can be much faster
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def build_for_training(cfg, out, d):
    """Student (optionally from an official DINOv2 backbone), its EMA teacher, the centres and
    AdamW over the layer-decay groups, restored from the newest checkpoint with --resume (a
    checkpoint of authors.py holds weights only). Returns (student, teacher, centers, opt, path, ckpt)."""
    student = Student(cfg).to(d.device)  # backbone + SEM head + DINO head
    if cfg.init:
        load_official(student.backbone, cfg.init)
    teacher = Student(cfg).to(d.device)
    teacher.load_state_dict(student.state_dict())  # the teacher starts as the student
    teacher.eval().requires_grad_(False)  # updated by EMA only, never by the optimiser
    centers = {k: torch.zeros(1, cfg.prototypes, device=d.device) for k in ("cls", "patch")}  # (1, K) each
    # lr / wd set per group by set_schedules every step
    opt = torch.optim.AdamW(param_groups(student, cfg.layer_decay), lr=0.0, betas=(0.9, 0.999),
                            fused=d.device.type == "cuda")
    ck_path, ck = utils.resume_checkpoint(os.path.join(out, "checkpoints")) if cfg.resume else (None, None)
    if ck and "opt" not in ck:  # written by authors.py sem: weights only
        resume_converted(ck, ck_path, student, teacher)
    elif ck:
        ck = utils.check_checkpoint(ck, ck_path, "sem", ("model", "ema", "opt", "centers", "step", "config"))
        for part, key in ((student, "model"), (teacher, "ema"), (opt, "opt")):
            utils.load_weights(part, ck[key], ck_path)
        for k in centers:
            centers[k].copy_(ck["centers"][k])
    return student, teacher, centers, opt, ck_path, ck


def save_state(out, step, student, teacher, opt, centers, cfg, d):
    """runs/sem-<run>/checkpoints/ckpt_<step>.pt (the teacher is "ema"), rank 0 writing."""
    if d.main:
        utils.save_checkpoint({"model": utils.unwrap(student).state_dict(), "ema": teacher.state_dict(),
                               "opt": opt.state_dict(), "step": step, "centers": centers,
                               "config": dataclasses.asdict(cfg), "script": "sem",
                               "versions": {"torch": torch.__version__}},
                              os.path.join(out, "checkpoints", f"ckpt_{step:07d}.pt"))
    if d.world > 1:
        dist.barrier()  # other ranks wait for the file


def set_schedules(opt, cfg, step, lr_base):
    """This step's lr (warm-up + cosine) and weight decay (cosine) in every parameter group,
    scaled by the group's layer-decay multiplier; the DINO head's last layer stays frozen
    (lr 0) for the first freeze_last steps. Returns the base lr of the step."""
    lr = cosine(lr_base, cfg.min_lr, step, cfg.schedule, cfg.warmup)  # warm-up 0 -> lr_base, cosine -> min_lr
    wd = cosine(cfg.wd, cfg.wd_end, step, cfg.schedule)  # cosine wd -> wd_end, no warm-up
    for grp in opt.param_groups:
        frozen = grp["last_layer"] and step < cfg.freeze_last  # DINO: a frozen last layer stabilises the start
        grp["lr"], grp["weight_decay"] = (0.0 if frozen else lr * grp["lr_mult"]), wd * grp["wd_mult"]
    return lr


def log_step(log, step, loss, parts, lr, gnorm, t0, cfg, d):
    """The step's log line: the losses averaged over ranks, lr, grad norm, ms/step and samples/s since t0."""
    ls = torch.stack([loss.detach(), *[v.detach() for v in parts.values()]])  # [total, dino, ibot, koleo]
    if d.world > 1:
        dist.all_reduce(ls)
        ls /= d.world
    utils.sync(d.device)  # queued GPU work done before the clock
    ms = (time.perf_counter() - t0) * 1000 / cfg.log_every  # mean ms per step since the last log
    log(f"step {step:7d} | loss {ls[0]:.4f} (dino {ls[1]:.3f} ibot {ls[2]:.3f} koleo {ls[3]:.3f}) "
        f"| lr {lr:.2e} | grad {gnorm:.3f} | {ms:.0f} ms/step | {cfg.batch_size * d.world * 1000 / ms:.0f} samples/s")


def train(cfg):
    if cfg.mask_mode not in ("block", "random"):
        utils.fail(f"unknown --mask_mode {cfg.mask_mode!r}; use block or random")
    if cfg.centering not in ("centering", "sinkhorn"):
        utils.fail(f"unknown --centering {cfg.centering!r}; use centering or sinkhorn")
    d = utils.setup_dist(cfg.device)
    set_threads(cfg)
    utils.check_run_dir(run_dir(cfg), cfg.resume, cfg.overwrite)
    out = run_dir(cfg)
    utils.seed_all(cfg.seed, d)  # per-rank seed: seed * world + rank
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    images = Images(cfg)
    student, teacher, centers, opt, ck_path, ck = build_for_training(cfg, out, d)
    start = ck["step"] if ck else 0
    # the schedules keep the length they started with: a resumed run replays its past exactly
    saved = ck["config"].get("schedule", ck["config"]["steps"]) if ck else 0
    cfg = dataclasses.replace(cfg, schedule=cfg.schedule or saved or cfg.steps)
    log = utils.Logger(out, d)  # the run folder appears only once every input has been read
    if ck:
        log(f"resumed from {ck_path} at step {start} (schedules over {cfg.schedule} steps)")
    utils.start_run(out, cfg, d)
    if cfg.compile:
        student.backbone.compile()  # in place: state-dict keys stay free of _orig_mod
    model = utils.distribute(student, d)                                  # DDP with several ranks
    # batch_size=None: each item is a whole batch; the sampler yields step numbers
    loader = torch.utils.data.DataLoader(MultiCropSteps(images, cfg, d.rank, d.world), batch_size=None,
                                         sampler=range(start, cfg.steps), num_workers=cfg.workers,
                                         pin_memory=d.device.type == "cuda", persistent_workers=cfg.workers > 0)
    lr_base = cfg.lr * math.sqrt(cfg.batch_size * d.world / 1024)  # DINOv2's sqrt lr scaling
    from tqdm import tqdm
    bar = tqdm(loader, initial=start, total=cfg.steps, disable=not d.main, desc="train", leave=False)
    t0, finite = time.perf_counter(), utils.FiniteCheck(d.device, "lower --lr (or raise --warmup)")
    for step, batch in zip(range(start, cfg.steps), bar):
        lr = set_schedules(opt, cfg, step, lr_base)
        loss, parts = train_step(model, teacher, centers, batch, cfg, step, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)  # clip the global grad norm
        opt.step()  # the student only
        m = cosine(cfg.momentum, 1.0, step, cfg.schedule)  # teacher momentum 0.992 -> 1
        utils.ema_update(teacher, student, m)  # teacher <- m teacher + (1 - m) student
        finite.step(loss, step + 1)  # no host sync: checked at log steps
        if (step + 1) % cfg.log_every == 0:
            finite.check()
            log_step(log, step + 1, loss, parts, lr, gnorm, t0, cfg, d)
            t0 = time.perf_counter()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            finite.check(student.parameters())                             # never save a NaN model
            save_state(out, step + 1, student, teacher, opt, centers, cfg, d)
    log(f"done: {cfg.steps} steps, checkpoints in {out}/checkpoints")
    return out


#################################################################################
#          Encoding: DLC = argmax per SEM group, sharded over ranks             #
#################################################################################

ARCH_KEYS = ("arch", "patch", "pos_grid", "registers", "L", "V")


def load_encoder(cfg):
    """Our checkpoint (teacher = EMA weights) or an official DINOv2 file + a fresh SEM head."""
    path = utils.resolve_ckpt(cfg.ckpt)  # a run folder -> its newest checkpoint
    ck = utils.load_checkpoint(path)
    given = utils.given(cfg)                                   # flags the user wrote override nothing silently
    if not isinstance(ck, dict) or "script" in ck:  # a bare tensor, or a checkpoint of ours from another script
        utils.check_checkpoint(ck, path, "sem", ("ema", "config"))
    if isinstance(ck, dict) and "ema" in ck and "config" in ck:
        utils.check_checkpoint(ck, path, "sem", [f"config.{k}" for k in ARCH_KEYS])
        for k in ARCH_KEYS:
            if k in given and getattr(cfg, k) != ck["config"][k]:
                utils.fail(f"--{k} {getattr(cfg, k)} does not match the checkpoint ({ck['config'][k]}); "
                           f"L*V of {path} is {ck['config']['L']}x{ck['config']['V']}; drop the flag")
        keep = ARCH_KEYS if "size" in given else (*ARCH_KEYS, "size")  # encode at the checkpoint's resolution
        cfg = dataclasses.replace(cfg, **{k: ck["config"][k] for k in keep if k in ck["config"]})  # checkpoint wins
        enc = SEMViT(cfg)
        # the teacher's backbone.* keys; the DINO head is not needed
        sd = {k.removeprefix("backbone."): v for k, v in ck["ema"].items() if k.startswith("backbone.")}
        if "sem_embed.weight" not in sd:
            utils.fail(f"{path} has no SEM head weights; pass a checkpoint written by sem.py train")
        if sd["sem_embed.weight"].shape[0] != cfg.L * cfg.V:
            utils.fail(f"checkpoint SEM head has L*V={sd['sem_embed.weight'].shape[0]}, config says {cfg.L}x{cfg.V}")
        utils.load_weights(enc, sd, path)
        utils.check_sampling_weights(enc.state_dict(), path)  # no NaN / inf weights
        return enc, cfg, path, "trained"
    torch.manual_seed(cfg.seed)  # the fresh SEM head is reproducible
    enc = SEMViT(cfg)
    load_official(enc, path)
    utils.print0(f"{path} is an official DINOv2 backbone: using a freshly initialised SEM head (seed {cfg.seed})")
    return enc, cfg, path, f"fresh (random init, seed {cfg.seed})"


@torch.no_grad()
def encode_images(enc, images, cfg, d, idx, continuous=False, soft_tau=0.0):
    """Codes (n, L) int64 (and normalised CLS (n, D)) of images[idx], ADM centre crop, no flip.
    soft_tau > 0: the embeddings are the soft SEM softmax(z / soft_tau) (n, L, V) instead."""
    from torchvision.transforms import v2
    from tqdm import tqdm
    norm = v2.Normalize(MEAN, STD)
    enc.eval().to(d.device)  # eval: no drop-path
    codes, embs = [], []
    amp = utils.autocast(d.device)  # bf16 where fast (CUDA, AMX / AVX512-BF16 CPUs)
    for s in tqdm(range(0, len(idx), cfg.encode_batch), disable=not d.main, desc="encode", leave=False):
        # (b, 3, S, S), b <= encode_batch
        x = torch.stack([norm(adm_center_crop(images[int(i)], cfg.size)) for i in idx[s:s + cfg.encode_batch]])
        with amp:
            out = enc(x.to(d.device), tau=1.0)  # tau only rescales z: the argmax is the same
        codes.append(out["probs"].argmax(-1).cpu())            # (b, L): argmax = the tau -> 0 limit
        if soft_tau:  # softmax(log p / tau') = softmax(z / tau'): the logsumexp shift cancels
            embs.append(torch.softmax(out["probs"].float().log() / soft_tau, dim=-1).cpu())  # (b, L, V)
        elif continuous:
            embs.append(out["backbone_cls"].float().cpu())  # (b, D)
    L = enc.cfg.L
    c = torch.cat(codes) if codes else torch.zeros(0, L, dtype=torch.long)  # (n, L); an empty shard gives (0, L)
    e = torch.cat(embs) if embs else torch.zeros(0, enc.embed_dim)
    return c.numpy(), e.numpy()


def encode(cfg):
    if not cfg.out:
        utils.fail("encode needs --out DIR for the DLC set")
    if not cfg.ckpt:
        utils.fail("encode needs --ckpt (our checkpoint / run folder or an official DINOv2 .pth)")
    utils.check_dlc_out(cfg.out, cfg.overwrite)                            # before any work
    d = utils.setup_dist(cfg.device)
    set_threads(cfg)
    enc, cfg, path, head = load_encoder(cfg)
    images = Images(cfg)
    # contiguous shards whose length is a multiple of the batch: the same batches as one process
    chunk = math.ceil(len(images) / d.world / cfg.encode_batch) * cfg.encode_batch  # rows per rank
    idx = np.arange(d.rank * chunk, min(len(images), (d.rank + 1) * chunk))  # the last shards may be short or empty
    codes, embs = encode_images(enc, images, cfg, d, idx, cfg.continuous)
    probs = encode_images(enc, images, cfg, d, idx, soft_tau=cfg.soft_tau)[1] if cfg.soft_tau else None  # (n, L, V)
    if d.world > 1:  # gather in rank order = dataset order (gloo / NCCL object gather)
        parts = [None] * d.world
        dist.all_gather_object(parts, (codes, embs, probs))
        codes, embs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        probs = np.concatenate([p[2] for p in parts]) if cfg.soft_tau else None
    if d.main:
        meta = {"L": cfg.L, "V": cfg.V, "tau": 1e-5, "checkpoint": os.path.abspath(path), "sem_head": head,
                "command": "python sem.py " + " ".join(sys.argv[1:]), "data": images.data_meta,
                "arch": cfg.arch, "size": cfg.size}
        extra = {}
        if images.attrs is not None:
            extra["attrs.npy"] = images.attrs.astype(np.int64)
        if cfg.continuous:
            extra["embeddings.npy"] = embs.astype(np.float16)  # (N, D)
        if cfg.soft_tau:  # the soft SEM (N, L, V) at temperature soft_tau (dit.py compose --temp)
            extra["probs.npy"], meta["soft_tau"] = probs.astype(np.float32), cfg.soft_tau
        utils.save_dlc_set(cfg.out, codes, meta, labels=images.labels, captions=images.captions,
                           index=images.index, extra=extra, overwrite=cfg.overwrite)
        print(f"wrote {len(codes)} codes [N, L={cfg.L}] V={cfg.V} to {cfg.out}", flush=True)
    return codes  # under torchrun, utils.main's closing barrier holds the other ranks until rank 0 has written


def resume_converted(ck, path, student, teacher):
    """train --resume from a checkpoint of `authors.py sem`: their teacher as both student and teacher
    (DINOv2 starts the student as the teacher); optimiser and centres start fresh."""
    if not ck.get("dino_head"):
        utils.fail(f"{path} was converted without the DINO head, so training cannot continue from it; "
                   "it encodes (sem.py encode --ckpt)")
    student.load_state_dict(ck["model"])
    teacher.load_state_dict(ck["ema"])


#################################################################################
#                     bench: img/s, peak memory, MFU                            #
#################################################################################

@dataclass
class BenchConfig(Config):
    """bench: 6 training steps of the train config (timed from the 3rd), then encoding batches."""
    encode_batch: int = 256       # images per timed encoding batch
    POSITIVE = (*Config.POSITIVE, "encode_batch")


def bench(cfg):
    """Training and encoding img/s, peak memory, MFU against the measured matmul peak."""
    d = utils.setup_dist(cfg.device)
    set_threads(cfg)
    cfg = dataclasses.replace(cfg, steps=6)  # 6 batches: FLOP count 1 + warm-up 1 + timed 4
    images = Images(dataclasses.replace(cfg, n=max(256, cfg.batch_size)))  # enough images for one batch
    student, teacher = Student(cfg).to(d.device), Student(cfg).to(d.device).eval().requires_grad_(False)
    centers = {k: torch.zeros(1, cfg.prototypes, device=d.device) for k in ("cls", "patch")}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=d.device.type == "cuda")
    data = MultiCropSteps(images, cfg, 0, 1)
    batches = [data[i] for i in range(cfg.steps)]  # augmented before timing
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32   # as train_step
    peak = utils.matmul_peak_flops(d.device, dtype)
    order = iter(range(cfg.steps))                                      # step i trains on batches[i]

    def step():
        i = next(order)
        loss, _ = train_step(student, teacher, centers, batches[i], cfg, i, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt, train_flops = utils.measure(step, d.device, cfg.steps - 2)      # counted on step 0, warm-up 1, timed 2..
    print(f"train : {cfg.batch_size / dt:8.1f} img/s | {dt * 1000:.0f} ms/step | MFU {train_flops / dt / peak:.1%} "
          f"(step {train_flops / 1e9:.1f} GFLOP{' incl. recompute' if cfg.grad_ckpt else ''}, peak {peak / 1e12:.2f} "
          f"TFLOP/s {dtype}) | {utils.peak_memory_mb(d.device):.0f} MB")
    enc = student.backbone.eval()  # encoding: backbone + SEM head
    x = torch.randn(cfg.encode_batch, 3, cfg.size, cfg.size, device=d.device)  # (b, 3, S, S) random pixels
    amp = utils.autocast(d.device)
    with torch.no_grad(), amp:
        dt, enc_flops = utils.measure(lambda: enc(x), d.device, 3)
    enc_dtype = torch.bfloat16 if utils.fast_bf16(d.device) else torch.float32  # encode's autocast
    if enc_dtype != dtype:                                                 # a bf16 CPU: train fp32, encode bf16
        peak = utils.matmul_peak_flops(d.device, enc_dtype)
    print(f"encode: {cfg.encode_batch / dt:8.1f} img/s | MFU {enc_flops / dt / peak:.1%} | "
          f"{utils.peak_memory_mb(d.device):.0f} MB peak | {cfg.arch} {cfg.size}px L={cfg.L} V={cfg.V}")


COMMANDS = {"train": (train, Config, PRESETS),
            "encode": (encode, EncodeConfig, utils.presets_for(PRESETS, EncodeConfig, ENCODE_PRESETS)),
            "bench": (bench, BenchConfig, utils.presets_for(PRESETS, BenchConfig, ENCODE_PRESETS))}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
