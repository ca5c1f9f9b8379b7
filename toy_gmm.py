"""Section 3 of the DLC paper: "Generating highly modal continuous distributions is hard".

A 2-D mixture of N equal-weight Gaussians on a sqrt(N) x sqrt(N) grid gets harder to fit for an
unconditional diffusion model as N grows, while a model conditioned on the index of the mode
(the oracle index, the index inferred by a fitted GMM, or a discrete index learned end to end
as in DisCo-Diff) keeps fitting it (paper Fig. 2, Fig. 11, Appendix C). This is the argument
for conditioning image diffusion on a discrete code.

Model: a 4-layer MLP denoiser with a timestep embedding and an optional index embedding, trained
as an improved DDPM (Nichol & Dhariwal 2021, https://github.com/openai/improved-diffusion:
cosine schedule, learned variance interpolation, hybrid loss L_simple + lambda L_vlb), sampled
ancestrally, optionally over respaced steps. All (variant, N) models are trained at once as a
batched ensemble (weights of shape (E, in, out), torch.baddbmm): Adam treats every element
independently, so this is exactly E separate trainings, with larger matmuls that run closer to
the machine's peak (about 60% of a CPU's at width 384 and batch 512; BENCHMARKS.md).

Data: centres on a grid with spacing 1.0, every mode with std 0.1 (= 0.1 x spacing) for every N
(the paper's two values did not survive in its text). Data are divided by the mixture's
per-coordinate std before training, so that every N is seen by the diffusion at unit scale.

Commands:
  python toy_gmm.py                          # default sweep N = 4, 16, 64, 256 on a CPU
  python toy_gmm.py --modes=4,16 --steps=500  # quicker
  python toy_gmm.py --preset paper --compile=true  # width 256, batch 2048, 300M samples per model (GPU)
  python toy_gmm.py bench                     # matmul peak, samples/s, achieved FLOP/s, MFU
torchrun is not used: the whole sweep is one small batched model that fills one device.
"""
import dataclasses, json, math, os, sys, time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

VARIANTS = ("uncond", "oracle", "gmm", "disco")  # no index; true index; GMM-inferred index; learned index


@dataclass
class Config:
    run: str = "toy"                 # run folder runs/toy_gmm-<run>/
    overwrite: bool = False          # replace an earlier run's results in the same folder
    modes: list[int] = field(default_factory=lambda: [4, 16, 64, 256])  # numbers of modes N (squares)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # conditionings to train
    spacing: float = 1.0             # distance between neighbouring centres
    std: float = 0.1                 # std of every mode (paper value unknown)
    width: int = 384                 # hidden width of the 4-layer MLP
    T: int = 1000                    # diffusion steps in training
    sample_steps: int = 100          # respaced steps for ancestral sampling (T = no respacing)
    vlb_weight: float = 0.001        # lambda in L_simple + lambda * L_vlb (IDDPM)
    steps: int = 2500                # optimiser steps (paper: 300M samples / 2048 = 146k)
    batch_size: int = 512            # samples per step per model (paper: 2048)
    lr: float = 2e-3                 # Adam learning rate, cosine-decayed to 0
    warmup: int = 100                # linear warm-up steps
    gumbel_tau: float = 1.0          # DisCo-Diff Gumbel-softmax temperature, annealed to tau/10
    pool: int = 1 << 19              # training samples drawn once per model (524,288), reused
    n_eval: int = 10000              # samples per model for the metrics
    seed: int = 0                    # global seed
    device: str = "auto"             # auto | cpu | cuda | mps
    compile: bool = False            # torch.compile the forward + loss (for GPUs: fewer, fused kernels)
    log_every: int = 100             # log a line every this many steps
    POSITIVE = ("width", "T", "sample_steps", "steps", "batch_size", "pool", "n_eval", "log_every")


PRESETS = {"toy": {},                                                             # "toy": the Config defaults
           "paper": {"steps": 146_484, "batch_size": 2048, "width": 256, "lr": 1e-3, "pool": 1 << 24,
                     "sample_steps": 250}}  # 146,484 steps x 2048 = about 300M samples per model


#################################################################################
#                      The data: a grid of equal-weight Gaussians               #
#################################################################################

def grid_centres(n_modes, spacing=1.0):
    """(N, 2) centres of a sqrt(N) x sqrt(N) grid, centred on the origin."""
    side = math.isqrt(n_modes)
    if side * side != n_modes or n_modes < 1:
        utils.fail(f"the number of modes must be a perfect square (4, 16, 64, ...), got {n_modes}")
    ax = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing  # (side,) coordinates, symmetric about 0
    return torch.cartesian_prod(ax, ax)  # (N, 2); centre k = (ax[k // side], ax[k % side])


def sample_gmm(centres, std, n, gen=None):
    """x ~ sum_k (1/N) N(mu_k, std^2 I); returns (x (n, 2), oracle index k (n,))."""
    k = torch.randint(len(centres), (n,), generator=gen)  # equal weights: k ~ Uniform{0, ..., N-1}
    return centres[k] + std * torch.randn(n, 2, generator=gen, dtype=centres.dtype), k  # mu_k + std z, z ~ N(0, I)


def gmm_logpdf(x, centres, std):
    """Exact log p(x) = logsumexp_k [log N(x; mu_k, std^2 I)] - log N."""
    d2 = torch.cdist(x.double(), centres.double()) ** 2                                  # (n, N)
    logn = -d2 / (2 * std ** 2) - math.log(2 * math.pi * std ** 2)                # 2-D log N(x; mu_k, std^2 I), (n, N)
    return torch.logsumexp(logn, 1) - math.log(len(centres))  # weights 1/N; logsumexp stays finite far from every mode


def data_scale(n_modes, spacing, std):
    """Per-coordinate std of the mixture: a grid of s points has variance spacing^2 (s^2-1)/12."""
    s = math.isqrt(n_modes)
    return math.sqrt(spacing ** 2 * (s * s - 1) / 12 + std ** 2)  # variance between the centres + within a mode


def fit_gmm_index(x, n_modes, seed=0):
    """Fit sklearn's GaussianMixture on training samples; return (means, vars, log weights)
    as tensors so the index k = argmax_k p(k | x) is computed in torch during training."""
    from sklearn.mixture import GaussianMixture
    gm = GaussianMixture(n_modes, covariance_type="spherical", random_state=seed, max_iter=200).fit(x.numpy())
    return (torch.tensor(gm.means_), torch.tensor(gm.covariances_), torch.tensor(np.log(gm.weights_)))


def gmm_predict(x, means, var, logw):
    """argmax_k [log w_k + log N(x; mean_k, var_k I)]: the GMM index of each point."""
    d2 = torch.cdist(x.double(), means) ** 2  # float64: the modes are narrow
    return (logw - d2 / (2 * var) - torch.log(var)).argmax(1)  # 2-D log N = -d2 / (2 var) - log var + const -> (n,)


#################################################################################
#            Improved DDPM: cosine schedule, learned variance, hybrid loss      #
#################################################################################

class Diffusion:
    """Schedule tensors of IDDPM, optionally respaced to a subset of the T training steps."""

    def __init__(self, T=1000, steps=None):
        # alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008 (IDDPM Eq. 17)
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)
        ab = torch.cumprod(1 - betas, 0)  # alpha_bar_t = prod_{s <= t} (1 - beta_s)
        self.timesteps = torch.arange(T)                      # the model sees original step indices
        if steps is not None and steps < T:                   # respacing (IDDPM Sec. 4): keep alpha_bar
            keep = torch.linspace(0, T - 1, steps).round().long()  # `steps` evenly spaced original step indices
            ab = ab[keep]  # alpha_bar at the kept steps is unchanged
            betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # beta_i = 1 - ab_i / ab_{i-1}
            self.timesteps = keep                                                 # respaced index i -> original t
        self.betas, self.ab = betas, ab
        self.ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
        # posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta_tilde) (DDPM Eq. 6-7)
        self.beta_tilde = betas * (1 - self.ab_prev) / (1 - ab)  # beta_tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
        self.log_beta_tilde = torch.log(torch.cat([self.beta_tilde[1:2], self.beta_tilde[1:]]))  # clipped at t=0
        self.c0 = betas * self.ab_prev.sqrt() / (1 - ab)  # coefficient of x_0 in the posterior mean
        self.ct = (1 - self.ab_prev) * (1 - betas).sqrt() / (1 - ab)  # coefficient of x_t; 1 - beta_t = alpha_t
        # float32 columns [sqrt ab, sqrt(1-ab), log beta, log beta_tilde, c0, ct], gathered once per call
        self.table = torch.stack([ab.sqrt(), (1 - ab).sqrt(), betas.log(), self.log_beta_tilde,
                                  self.c0, self.ct], 1).float()                   # (steps, 6)

    def at(self, i):
        """The six schedule columns at indices i (E, B), each shaped (E, B, 1)."""
        return [c[..., None] for c in self.table.to(i.device)[i].unbind(-1)]      # table[i] (E, B, 6) -> six (E, B, 1)

    def to(self, device):
        """Keep the gathered tables on the training device (no copy per step)."""
        self.table, self.timesteps = self.table.to(device), self.timesteps.to(device)
        return self

    def __len__(self):
        return len(self.betas)  # steps of this (possibly respaced) chain

    def q_sample(self, x0, i, eps):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (DDPM Eq. 4); i indexes this schedule."""
        sab, s1ab = self.at(i)[:2]  # sqrt(ab_t), sqrt(1 - ab_t), each (E, B, 1)
        return sab * x0 + s1ab * eps

    def p_mean_logvar(self, x, i, eps_hat, v, clip=None):
        """Model p(x_{t-1} | x_t): mean from eps (DDPM Eq. 11), log-variance interpolated
        between log beta and log beta_tilde by v in [-1, 1] (IDDPM Eq. 15). At sampling the
        predicted x_0 is clipped to the data's bounding box, as IDDPM clips images to [-1, 1]
        (at large t, 1 / sqrt(alpha_bar) would otherwise blow up the error of eps_hat)."""
        sab, s1ab, logb, logbt, c0, ct = self.at(i)
        x0_hat = (x - s1ab * eps_hat) / sab                                       # q_sample solved for x_0
        if clip is not None:
            x0_hat = torch.maximum(torch.minimum(x0_hat, clip), -clip)            # clip (E, 1, 1): one box per member
        frac = (v + 1) / 2  # v = 1: log beta; v = -1: log beta_tilde (v is not clamped)
        return c0 * x0_hat + ct * x, frac * logb + (1 - frac) * logbt             # (mean, log sigma^2), each (E, B, 2)

    def loss(self, model_out, x0, xt, i, eps):
        """Hybrid loss L_simple + lambda L_vlb (IDDPM Eq. 16), per sample (E, B).
        L_vlb uses a stop-gradient on the mean so that it only trains the variance; it is
        T * L_t, the one-sample estimate of the sum over t; L_0 is the Gaussian NLL of x_0."""
        eps_hat, v = model_out[..., :2], model_out[..., 2:]                       # (E, B, 2) each
        l_simple = ((eps_hat - eps) ** 2).mean(-1)  # ||eps_hat - eps||^2, mean over the 2 coordinates
        mean, logvar = self.p_mean_logvar(xt, i, eps_hat.detach(), v)             # no clip in training
        _, _, _, logbt, c0, ct = self.at(i)
        true_mean = c0 * x0 + ct * xt                                             # mean of q(x_{t-1} | x_t, x_0)
        kl = 0.5 * (-1 + logvar - logbt + torch.exp(logbt - logvar)  # KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))                     # KL of Gaussians
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * torch.exp(-logvar))  # continuous NLL of x_0
        l_vlb = torch.where(i[..., None] == 0, nll, kl).mean(-1) * len(self)      # L_0 at i = 0, L_t otherwise
        return l_simple, l_vlb


#################################################################################
#         A batched ensemble of 4-layer MLP denoisers (one per variant, N)      #
#################################################################################

class Linears(nn.Module):
    """E independent Linear(din, dout) layers applied with one batched matmul."""

    def __init__(self, E, din, dout):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, din, dout) / math.sqrt(din))         # (E, din, dout), variance 1/din
        self.b = nn.Parameter(torch.zeros(E, 1, dout))                            # (E, 1, dout): broadcast over B

    def forward(self, x):                                     # x (E, B, din) -> (E, B, dout)
        return torch.baddbmm(self.b, x, self.w)                                   # b + x @ w, per member


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding of integer timesteps t (...) -> (..., dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))  # 1 down to ~1/10000
    a = t.float()[..., None] * freqs                                              # (..., dim/2)
    return torch.cat([torch.cos(a), torch.sin(a)], -1)                            # (..., dim): [cos | sin]


class EnsembleMLP(nn.Module):
    """E denoisers eps_theta(x_t, t, k): 4 linear layers with SiLU. The first layer reads x_t
    and the sinusoidal embedding of t concatenated (one matmul instead of two plus an add); the
    index embedding (a table of K rows per member, all zero for unconditional members) is added
    to its output. DisCo-Diff training replaces the row lookup by a Gumbel-softmax vector times
    the table, so that gradients reach the encoder. Output: 2 eps coordinates + 2 variance
    interpolation values v."""

    def __init__(self, E, K, width, T=1000):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = Linears(E, 2 + 64, width), Linears(E, width, width), \
            Linears(E, width, width), Linears(E, width, 4)  # in: x_t (2) + t (64); out: eps (2) + v (2)
        self.index_table = nn.Parameter(torch.randn(E, K, width) * 0.5)           # (E, K, W); rows >= N_e unused
        self.register_buffer("cond_mask", torch.ones(E, 1, 1))  # 0 for unconditional members
        self.register_buffer("t_table", timestep_embedding(torch.arange(T)))  # (T, 64), looked up
        nn.init.zeros_(self.l4.w)  # zero output at init (bias is 0 too): eps_hat = v = 0

    def forward(self, x, t, k, soft=None):                      # x (E, B, 2), t (E, B), k (E, B)
        """k: the integer index per member (ignored by members whose cond_mask is 0). DisCo-Diff
        training passes `soft` = {member e: (B, N_e) Gumbel-softmax vectors} for its members."""
        E, K, W = self.index_table.shape                                          # members, index rows (max N), width
        table = self.index_table * self.cond_mask                             # (E, K, W)
        rows = k + K * torch.arange(E, device=x.device)[:, None]              # row of (e, k) in E*K
        emb = F.embedding(rows, table.reshape(E * K, W))                      # (E, B, W)
        if soft:                                                              # soft (B, N_e) @ rows (N_e, W)
            mixed = torch.stack([s @ table[e, :s.shape[1]] for e, s in soft.items()]).to(emb.dtype)  # (Ed, B, W)
            ids = torch.tensor(list(soft)).to(x.device, non_blocking=True)    # (no GPU sync)
            emb = emb.index_copy(0, ids, mixed)                                   # DisCo members take the soft mixes
        h = self.l1(torch.cat([x, self.t_table[t].to(x.dtype)], -1)) + emb        # l1 of (E, B, 66) + index embedding
        h = self.l3(F.silu(self.l2(F.silu(h))))                                   # (E, B, W)
        return self.l4(F.silu(h))                                             # (E, B, 4)


class Encoder(nn.Module):
    """DisCo-Diff's q(k | x_0): an MLP from x_0 to K logits, one per DisCo member (batched)."""

    def __init__(self, E, K, width=64):
        super().__init__()
        self.l1, self.l2, self.l3 = Linears(E, 2, width), Linears(E, width, width), Linears(E, width, K)

    def forward(self, x0):
        return self.l3(F.silu(self.l2(F.silu(self.l1(x0)))))                      # (Ed, B, K) logits


#################################################################################
#                  The sweep: every (variant, N) member trained at once         #
#################################################################################

class Sweep:
    """Holds the members, their data and their conditioning rules."""

    def __init__(self, cfg, device):
        bad = [v for v in cfg.variants if v not in VARIANTS]
        if bad:
            utils.fail(f"unknown variant {bad[0]!r}; valid variants: {', '.join(VARIANTS)}")
        self.cfg, self.device = cfg, device
        self.members = [(v, n) for n in cfg.modes for v in cfg.variants]  # (variant, N) per member
        for n in cfg.modes:
            grid_centres(n)                                               # fails early on bad N
        self.K = max(cfg.modes)                                                   # index tables padded to the largest N
        E = len(self.members)
        self.net = EnsembleMLP(E, self.K, cfg.width, cfg.T).to(device)
        self.net.cond_mask[[e for e, (v, _) in enumerate(self.members) if v == "uncond"]] = 0  # uncond: no index
        self.disco = [e for e, (v, _) in enumerate(self.members) if v == "disco"]  # members with a learned index
        self.enc = Encoder(max(len(self.disco), 1), self.K).to(device)  # one encoder per DisCo member; a dummy if none
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # training-step noise is drawn where it is used: on a GPU a CPU draw + copy would make
        # the host wait for the GPU at every step (on a CPU this is the same generator)
        self.dgen = self.gen if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed)
        self.centres = {n: grid_centres(n, cfg.spacing) for n in cfg.modes}
        self.scale = {n: data_scale(n, cfg.spacing, cfg.std * cfg.spacing) for n in cfg.modes}  # divides the data
        self.gmm = {}
        if "gmm" in cfg.variants:                                         # fitted once, on training samples
            for n in cfg.modes:
                x, _ = sample_gmm(self.centres[n], cfg.std * cfg.spacing, max(10000, 40 * n), self.gen)  # 40+ per mode
                self.gmm[n] = fit_gmm_index(x, n, cfg.seed)
        self.prior = {}                                                   # DisCo prior over k, fitted after training
        # per-member tensors for fast batches: centres padded to K rows, N, scale
        self.std = cfg.std * cfg.spacing                                          # cfg.std is in units of the spacing
        self.padded = torch.zeros(E, self.K, 2)                                   # (E, K, 2); rows >= N never drawn
        for e, (_, n) in enumerate(self.members):
            self.padded[e, :n] = self.centres[n].float()
        self.n_of = torch.tensor([float(n) for _, n in self.members])[:, None]    # (E, 1)
        self.scale_of = torch.tensor([self.scale[n] for _, n in self.members])[:, None, None]  # (E, 1, 1)
        self.gmm_members = [e for e, (v, _) in enumerate(self.members) if v == "gmm"]
        self.forward_loss = torch.compile(forward_loss) if cfg.compile else forward_loss

    def batch(self, B, gen=None):
        """Fresh samples for every member: x0 scaled (E, B, 2) and index k (E, B); the GMM
        members' index is the fitted GMM's argmax posterior."""
        E = len(self.members)
        gen = gen or self.gen
        k = (torch.rand(E, B, generator=gen) * self.n_of).long()                      # oracle index
        x = self.padded[torch.arange(E)[:, None], k] + self.std * torch.randn(E, B, 2, generator=gen)  # (E, B, 2)
        for e in self.gmm_members:                                                    # GMM index
            k[e] = torch.cat([gmm_predict(c, *self.gmm[self.members[e][1]]) for c in x[e].split(65536)])
        return (x / self.scale_of).to(self.device), k.to(self.device)             # unit-scale data for the model

    def make_pool(self, size):
        """Draw `size` training samples per member once, so a training step only gathers rows
        (drawing and GMM-indexing fresh samples every step cost more than the MLP itself)."""
        self.pool_x, self.pool_k = self.batch(size)  # (E, size, 2), (E, size) on the device

    def pool_batch(self, B):
        rows = torch.randint(self.pool_x.shape[1], (len(self.members), B), generator=self.dgen, device=self.device)
        return self.pool_x.gather(1, rows[..., None].expand(-1, -1, 2)), self.pool_k.gather(1, rows)

    def train_flops_per_sample(self):
        """Model FLOPs of one training sample, summed over members: a (din x dout) matmul costs
        2 din dout forward and twice that backward (input and weight gradients), except in a
        first layer, whose input needs no gradient. Counted: every denoiser, and for each DisCo
        member its encoder and its soft index times its table over its own N indices only (the
        padding to K is waste, so it lowers the MFU rather than raising it)."""
        mm = lambda din, dout, first=False: 2 * din * dout * (2 if first else 3)
        W, H = self.cfg.width, self.enc.l2.w.shape[-1]                            # denoiser width, encoder width
        total = len(self.members) * (mm(2 + 64, W, True) + 2 * mm(W, W) + mm(W, 4))  # l1, l2 + l3, l4
        for e in self.disco:
            n = self.members[e][1]
            total += mm(2, H, True) + mm(H, H) + mm(H, n) + mm(n, W)  # encoder, then soft (B, n) @ table (n, W)
        return total

    def soft_index(self, x0, tau):
        """DisCo-Diff: {member e: Gumbel-softmax samples (B, N_e) of the encoder's q(k | x0)
        over the member's N_e index values} (None without DisCo members)."""
        if not self.disco:
            return None
        logits = self.enc(x0[self.disco])                                 # (Ed, B, K)
        soft = {}
        for j, e in enumerate(self.disco):
            lj = logits[j, :, :self.members[e][1]]                                # (B, N_e): padding logits dropped
            # Gumbel-softmax written out: -log(-log U) is several times faster on a CPU than
            # the exponential draws of F.gumbel_softmax
            u = torch.rand(lj.shape, generator=self.dgen, device=lj.device).clamp_(1e-20, 1)  # U > 0: log U finite
            soft[e] = F.softmax((lj - torch.log(-torch.log(u))) / tau, dim=-1)    # softmax((logits + Gumbel) / tau)
        return soft


def lr_at(cfg, step):
    """Linear warm-up then cosine decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup                                   # linear ramp up to lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def forward_loss(net, diff, x0, xt, i, eps, t, k, soft):
    """The hybrid loss terms (L_simple, L_vlb), each (E, B), in fp32 (TF32 matmuls on a GPU): bf16
    would round x_t (up to |x_t| ~ 2) by about a fifth of a mode's std at N = 256. One graph for
    torch.compile (--compile), which fuses the element-wise work."""
    return diff.loss(net(xt, t, k, soft), x0, xt, i, eps)


def train_step(sweep, diff, opt, step):
    """One optimiser step of every member at once (the training loop and `bench` both use it);
    returns the per-member hybrid loss and L_simple, each (E,)."""
    cfg, dev = sweep.cfg, sweep.device
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, step)                                                # no torch scheduler: lr_at per step
    x0, k = sweep.pool_batch(cfg.batch_size)                                      # (E, B, 2), (E, B)
    i = torch.randint(len(diff), (len(sweep.members), cfg.batch_size), device=dev)  # uniform step per sample and member
    eps = torch.randn_like(x0)                                                    # (E, B, 2)
    xt = diff.q_sample(x0, i, eps)                                                # noised to step i
    tau = cfg.gumbel_tau * 0.1 ** (min(step / max(1, cfg.steps - 1), 1))   # anneal tau -> tau / 10
    l_simple, l_vlb = sweep.forward_loss(sweep.net, diff, x0, xt, i, eps, diff.timesteps[i], k,
                                         sweep.soft_index(x0, tau))               # soft: None without DisCo members
    per_member = (l_simple + cfg.vlb_weight * l_vlb).mean(1)               # (E,)
    opt.zero_grad(set_to_none=True)
    per_member.sum().backward()                                           # members are independent
    opt.step()
    return per_member.detach(), l_simple.mean(1).detach()


def make_optimizer(sweep):
    """Adam over every member's denoiser and encoder; the fused kernel on CPU and CUDA (one pass
    over the parameters instead of several)."""
    return torch.optim.Adam(list(sweep.net.parameters()) + list(sweep.enc.parameters()), lr=sweep.cfg.lr,
                            fused=sweep.device.type in ("cpu", "cuda"))  # other devices (MPS): the default kernel


def train(sweep, diff, log=print):
    """Train every member for cfg.steps steps; returns the per-member loss history."""
    cfg, diff = sweep.cfg, diff.to(sweep.device)
    opt = make_optimizer(sweep)
    E, hist, t0 = len(sweep.members), [], time.time()
    sweep.make_pool(min(cfg.steps * cfg.batch_size, cfg.pool))                    # no larger than training can use
    for step in range(cfg.steps):
        loss, l_simple = train_step(sweep, diff, opt, step)
        hist.append(l_simple)                                                     # (E,) on the device: no sync
        if step % cfg.log_every == 0 or step == cfg.steps - 1:   # the only host syncs: a GPU runs ahead
            if not torch.isfinite(loss).all():                  # a NaN stays NaN: caught at the next log
                utils.fail(f"loss became {loss.tolist()} by step {step}; lower --lr")
            dt = (time.time() - t0) / (step + 1)                                  # mean seconds per step so far
            log(f"step {step:6d} | loss {loss.mean().item():.4f} | lr {lr_at(cfg, step):.2e} "
                f"| {1000 * dt:.0f} ms/step | {E * cfg.batch_size / dt:.0f} samples/s")
    if not all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"]):   # the last update
        utils.fail("the weights became NaN or inf in the last update; lower --lr")
    if sweep.disco:                                        # DisCo-Diff: categorical prior over k
        with torch.no_grad():
            x0, _ = sweep.batch(20000)                                            # fresh samples, not the pool
            logits = sweep.enc(x0[sweep.disco])                                   # (Ed, 20000, K)
        for j, e in enumerate(sweep.disco):                # the member's own N codes only
            n = sweep.members[e][1]
            sweep.prior[e] = torch.bincount(logits[j, :, :n].argmax(-1).cpu(), minlength=n).float()  # code counts
    return torch.stack(hist).cpu()                                        # (steps, E)


@torch.no_grad()
def sample(sweep, diff, n, gen=None):
    """Ancestral sampling for every member: (E, n, 2) in data units. The index is drawn from the
    member's prior: uniform (oracle), fitted GMM weights (gmm), fitted categorical (disco)."""
    dev, E = sweep.device, len(sweep.members)
    ks = []
    for e, (v, m) in enumerate(sweep.members):
        if v == "gmm":
            probs = sweep.gmm[m][2].exp()                                         # fitted mixture weights
        elif v == "disco":
            probs = sweep.prior[e]                                                # the encoder's code counts
        else:
            probs = torch.ones(m)                                                 # uniform (ignored by uncond members)
        ks.append(torch.multinomial(probs.float(), n, replacement=True, generator=gen))  # weights need no normalising
    k = torch.stack(ks).to(dev)                                                   # (E, n)
    x = torch.randn(E, n, 2, generator=gen).to(dev)                               # x_T ~ N(0, I), model units
    box = torch.stack([sweep.centres[m].abs().max() + 5 * sweep.std for _, m in sweep.members])  # data units
    clip = (box.float()[:, None, None] / sweep.scale_of).to(dev)         # (E, 1, 1) in model units
    for i in reversed(range(len(diff))):                                          # i indexes the respaced chain
        ii = torch.full((E, n), i, device=dev)
        out = sweep.net(x, diff.timesteps.to(dev)[ii], k)                         # the net sees the original t
        mean, logvar = diff.p_mean_logvar(x, ii, out[..., :2], out[..., 2:], clip)
        x = mean + (torch.exp(0.5 * logvar) * torch.randn(E, n, 2, generator=gen).to(dev) if i > 0 else 0)
    scale = torch.tensor([sweep.scale[m] for _, m in sweep.members], device=dev)[:, None, None]
    return (x * scale).double().cpu()                                             # (E, n, 2) float64, data units


#################################################################################
#            Metrics: KDE-KL (the paper's), reverse KL, off-mode, coverage      #
#################################################################################

def kde_logpdf(samples, x):
    """log q_hat(x) with q_hat a Gaussian KDE of `samples` (scipy, Silverman bandwidth)."""
    from scipy.stats import gaussian_kde
    kde = gaussian_kde(samples.numpy().T, bw_method="silverman")  # (2, n); Silverman factor n^(-1/6) in 2-D
    return torch.tensor(kde.logpdf(x.numpy().T))                                  # (m,)


def kde_kl(samples, centres, std, n_eval=5000, gen=None):
    """KL(p || q_hat) = E_{x~p}[log p(x) - log q_hat(x)], with its Monte Carlo standard error."""
    x, _ = sample_gmm(centres, std, n_eval, gen)                                  # x ~ p, fresh draws
    d = gmm_logpdf(x, centres, std) - kde_logpdf(samples, x)                      # log p(x) - log q_hat(x)
    return d.mean().item(), (d.std() / math.sqrt(n_eval)).item()                  # mean and its standard error


def metrics(samples, centres, std, gen=None):
    """Every number for one model's samples (n, 2): forward KDE-KL, reverse KL
    E_q[log q_hat - log p] (q_hat fitted on one half, evaluated on the other), off-mode
    fraction (> 3 std from every centre) and mode coverage (modes with a sample within 3 std)."""
    kl, se = kde_kl(samples, centres, std, gen=gen)
    a, b = samples[: len(samples) // 2], samples[len(samples) // 2:]  # a KDE scored on its own points is biased up
    rd = kde_logpdf(a, b) - gmm_logpdf(b, centres, std)                           # log q_hat(x) - log p(x), x ~ q
    d = torch.cdist(samples, centres)                                     # (n, N)
    near = d.min(1).values <= 3 * std  # (n,) within 3 std of its nearest centre
    covered = torch.zeros(len(centres), dtype=torch.bool)
    covered[d.argmin(1)[near]] = True                                             # nearest mode of every near sample
    return {"kde_kl": kl, "kde_kl_se": se, "reverse_kl": rd.mean().item(),
            "reverse_kl_se": (rd.std() / math.sqrt(len(rd))).item(),
            "off_mode": 1 - near.double().mean().item(), "coverage": covered.double().mean().item()}


#################################################################################
#                                   Figures                                     #
#################################################################################

def figures(sweep, diff, samples, results, run_dir):
    """samples.png (Fig. 2a-c), kl_vs_modes.png (Fig. 2d) and vector_field.png (Fig. 2e-f)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = sweep.cfg
    # Fig. 2a-c / Fig. 11: samples of every variant (rows) for every N (columns)
    rows = ["data"] + list(cfg.variants)                                          # row 0: the true mixture
    fig, axes = plt.subplots(len(rows), len(cfg.modes), figsize=(3 * len(cfg.modes), 3 * len(rows)), squeeze=False)
    for c, n in enumerate(cfg.modes):
        for r, v in enumerate(rows):
            if v == "data":
                pts, _ = sample_gmm(sweep.centres[n], cfg.std * cfg.spacing, 5000, sweep.gen)
            else:
                pts = samples[sweep.members.index((v, n))][:5000]                 # member (v, N)
            ax = axes[r, c]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.5)
            lim = sweep.centres[n].abs().max() + 1                                # margin of 1 beyond the outer centres
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(f"N = {n}")
            if c == 0:
                ax.set_ylabel(v)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "samples.png"), dpi=80)
    plt.close(fig)
    # Fig. 2d: metrics vs N, all variants, with the p-vs-p KDE baseline
    keys = [("kde_kl", "forward KDE-KL(p || q) [nats]"), ("reverse_kl", "reverse KL E_q[log q - log p]"),
            ("off_mode", "fraction of samples > 3 std off every mode")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, keys):
        for v in ["baseline"] + list(cfg.variants):                               # baseline: true samples (p vs p)
            ys = [results[str(n)][v][key] for n in cfg.modes]
            ax.plot(cfg.modes, ys, "o-" if v != "baseline" else "k--", label=v)
        ax.set(xscale="log", xlabel="number of modes N", title=title)
        ax.set_xticks(cfg.modes, [str(n) for n in cfg.modes])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "kl_vs_modes.png"), dpi=80)
    plt.close(fig)
    vector_field_figure(sweep, diff, run_dir, plt)


def vector_field_figure(sweep, diff, run_dir, plt):
    """Fig. 2e-f: the denoising direction x0_hat - x_t of the unconditional and the oracle model
    on a grid, at three noise levels, for N = 16 modes (the oracle given a central mode k)."""
    cfg = sweep.cfg
    n = 16 if 16 in cfg.modes else cfg.modes[0]
    shown = [v for v in ("uncond", "oracle") if v in cfg.variants]
    ts = [int(len(diff) * f) for f in (0.1, 0.3, 0.6)]                            # 10%, 30%, 60% of T
    fig, axes = plt.subplots(len(shown), len(ts), figsize=(4 * len(ts), 4 * len(shown)), squeeze=False)
    lim = float(sweep.centres[n].abs().max() + 1)
    g = torch.linspace(-lim, lim, 21)                                             # 21 x 21 grid
    grid = torch.cartesian_prod(g, g)                                      # (441, 2) data units
    E = len(sweep.members)
    with torch.no_grad():
        for r, v in enumerate(shown):
            e = sweep.members.index((v, n))  # every member runs (one batched net); e is read
            for c, i in enumerate(ts):
                x = (grid / sweep.scale[n]).float()[None].expand(E, -1, -1).to(sweep.device)  # (E, 441, 2)
                ii = torch.full(x.shape[:2], i, device=sweep.device)
                k = torch.full(x.shape[:2], n // 2 + math.isqrt(n) // 2, device=sweep.device)  # a central mode
                out = sweep.net(x, diff.timesteps.to(sweep.device)[ii], k)
                ab = diff.ab[i].float()                                           # alpha_bar_t of the T-step schedule
                x0 = (x - (1 - ab).sqrt() * out[..., :2]) / ab.sqrt()             # x0_hat, unclipped
                dirn = ((x0 - x)[e] * sweep.scale[n]).cpu()                       # member e, data units
                ax = axes[r, c]
                ax.quiver(grid[:, 0], grid[:, 1], dirn[:, 0], dirn[:, 1], angles="xy")
                ax.scatter(*sweep.centres[n].T, c="r", s=8)
                ax.set(title=f"{v}{' (k = centre mode)' if v != 'uncond' else ''}, t = {diff.timesteps[i].item()}",
                       xticks=[], yticks=[])
                ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "vector_field.png"), dpi=80)
    plt.close(fig)


#################################################################################
#                                Entry points                                   #
#################################################################################

def run_sweep(cfg):
    d = utils.setup_dist(cfg.device)
    utils.seed_all(cfg.seed, d)
    run_dir = os.path.join("runs", f"toy_gmm-{cfg.run}")
    sweep = Sweep(cfg, d.device)                     # checks --modes / --variants before anything is written
    utils.check_run_dir(run_dir, False, cfg.overwrite, results=("results.json",))
    if cfg.overwrite and d.main:
        utils.clear_run_dir(run_dir, ("results.json", "samples.png", "kl_vs_modes.png", "vector_field.png"))
    os.makedirs(run_dir, exist_ok=True)
    utils.save_json(dataclasses.asdict(cfg), os.path.join(run_dir, "config.json"))  # config next to the results
    log = utils.Logger(run_dir, d)
    log(f"{len(sweep.members)} models ({', '.join(cfg.variants)}) x N = {cfg.modes}, width {cfg.width}, "
        f"{cfg.steps} steps of {cfg.batch_size} on {d.device}")
    t0 = time.time()
    hist = train(sweep, Diffusion(cfg.T), log)                                    # trained on all T steps
    t_train = time.time() - t0
    diff_s = Diffusion(cfg.T, cfg.sample_steps)                                   # sampled on respaced steps
    gen = torch.Generator().manual_seed(cfg.seed + 1)                             # own stream: sampling and metrics
    samples = sample(sweep, diff_s, cfg.n_eval, gen)
    results = {"train_seconds": t_train}
    for n in cfg.modes:
        std = cfg.std * cfg.spacing                                               # data units
        ref, _ = sample_gmm(sweep.centres[n], std, cfg.n_eval, gen)       # the KDE's own bias: p vs p
        results[str(n)] = {"baseline": metrics(ref, sweep.centres[n], std, gen)}
        for v in cfg.variants:
            results[str(n)][v] = metrics(samples[sweep.members.index((v, n))], sweep.centres[n], std, gen)
            r = results[str(n)][v]
            log(f"N={n:5d} {v:7s} KDE-KL {r['kde_kl']:.3f}+-{r['kde_kl_se']:.3f} (baseline "
                f"{results[str(n)]['baseline']['kde_kl']:.3f}) | reverse KL {r['reverse_kl']:.3f} | "
                f"off-mode {100 * r['off_mode']:.1f}% | coverage {100 * r['coverage']:.1f}%")
    results["seconds"] = time.time() - t0
    results["final_loss"] = {f"{v}-{n}": hist[-50:, e].mean().item() for e, (v, n) in enumerate(sweep.members)}
    utils.save_json(results, os.path.join(run_dir, "results.json"))
    figures(sweep, Diffusion(cfg.T), samples, results, run_dir)
    log(f"done in {results['seconds']:.0f} s; results.json and figures in {run_dir}")
    return results


def bench(cfg):
    """Training throughput and MFU of one model and of the whole-sweep ensemble. The matmul peak
    is measured right before each of 3 timed windows (a shared machine's speed drifts), and the
    MFU reported is the median of the 3 window / peak ratios."""
    d = utils.setup_dist(cfg.device)
    print(f"device {d.device}, {torch.get_num_threads()} threads, peak: fp32 square matmul (TF32 on CUDA, as training)")
    n_steps = 100 if d.device.type == "cuda" else 10              # windows of about a second
    diff = Diffusion(cfg.T).to(d.device)
    for label, variants, modes in (("one model", ["oracle"], [cfg.modes[-1]]),
                                   ("sweep ensemble", cfg.variants, cfg.modes)):
        c = dataclasses.replace(cfg, variants=variants, modes=modes, steps=10 ** 9)  # huge steps: no lr or tau decay
        sweep = Sweep(c, d.device)
        opt = make_optimizer(sweep)
        E = len(sweep.members)
        sweep.make_pool(1 << 16)                                                  # 65,536 samples per member
        for step in range(3):                                    # warm-up (and compilation)
            train_step(sweep, diff, opt, step)
        flops_per_step, dts, peaks = sweep.train_flops_per_sample() * c.batch_size, [], []
        for _ in range(3):
            peaks.append(utils.matmul_peak_flops(d.device, torch.float32))        # peak just before each window
            utils.sync(d.device)                                                  # queued work done before timing
            t = time.perf_counter()
            for step in range(n_steps):
                train_step(sweep, diff, opt, step)
            utils.sync(d.device)
            dts.append((time.perf_counter() - t) / n_steps)                       # seconds per step
        if d.device.type == "cuda":                              # the model's memory, not the peak matmul's
            torch.cuda.reset_peak_memory_stats()
            train_step(sweep, diff, opt, 0)
        dt, mem = float(np.median(dts)), utils.peak_memory_mb(d.device)
        mfus = [100 * flops_per_step / t / p for t, p in zip(dts, peaks)]         # achieved / peak FLOP/s, in %
        print(f"{label:15s}: {E:2d} models x batch {c.batch_size} | {1000 * dt:.0f} ms/step | "
              f"{E * c.batch_size / dt:,.0f} samples/s | {flops_per_step / dt / 1e9:.1f} GFLOP/s | MFU "
              f"{np.median(mfus):.0f}% (windows {'/'.join(f'{m:.0f}' for m in mfus)}%, peak "
              f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s) | peak memory {mem:.0f} MB")


COMMANDS = {"train": (run_sweep, Config, PRESETS), "bench": (bench, Config, PRESETS)}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
