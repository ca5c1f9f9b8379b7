"""Evaluation: FID / sFID / IS / precision-recall (ADM protocol), Vendi, linear probe, novelty,
and small "judge" classifiers for the toy data (paper Tables 1 and 3, Figures 6-8, Appendix D).

A sub-command is always required (`python evaluate.py CMD --help` lists its options):
fid | judge | probe | novelty | table | plot | report | bench; docs/evaluate.md says what each
writes and the protocol in full.
  python evaluate.py judge --samples samples.npz --data shapes --out runs/eval-samples   # dit.py sample's file
  python evaluate.py probe --dlc runs/dlc-shapes --out runs/eval-probe                  # sem.py encode's set
  python evaluate.py table --inputs runs/eval-samples/metrics.json,runs/eval-probe/metrics.json --out results.md
  python evaluate.py fid --preset imagenet --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
      --inception weights/pt_inception-2015-12-05-6726825d.pth --out runs/eval-imagenet

The ADM protocol (github.com/openai/guided-diffusion/blob/main/evaluations/evaluator.py, read
for facts): uint8 images -> Inception-v3 of the 2015-12-05 TF graph; FID on pool_3 (2048-d),
sFID on the first 7 channels of `mixed_6/conv` (17 x 17 x 7 = 2023-d, flattened H, W, C),
IS = softmax of pool_3 @ W (the logits layer *without bias*) in splits of 5000, precision and
recall with k = 3 nearest-neighbour radii on pool_3 (Kynkaanniemi et al. 2019).
"""
import json, os, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE


#################################################################################
#            Configs: one per sub-command (--key=value fields)                  #
#################################################################################

@dataclass
class Config:  # what fid, judge and novelty share: a batch of samples in, a metrics folder out
    samples: str = ""          # samples: ADM .npz (arr_0 uint8 [N,H,W,C]) or an image folder
    max_samples: int = 0       # 0 = all
    out: str = "runs/evaluate" # output folder (metrics.json, metrics.md, figures)


@dataclass
class FidConfig(Config):  # fid: the ADM metrics on the FID-Inception network
    ref: str = ""              # reference batch (.npz or folder); ADM's carries mu / sigma statistics
    inception: str = "weights/" + INCEPTION_FILE  # FID-Inception weights ("random": untrained, plumbing tests)
    resize: str = "tf1"        # "tf1": the TF graph's bilinear (ADM, exact); "torch": pytorch-fid's
    splits: int = 10           # Inception Score splits (ADM: 10 splits of 5000 for 50k samples)
    k: int = 3                 # nearest neighbours for the precision/recall radii
    allow_low_rank: bool = False  # allow FID with N <= feature dim (singular covariance; biased)
    batch_size: int = 50       # images per forward pass
    device: str = "auto"       # cpu | cuda | mps | auto


@dataclass
class JudgeModelConfig(Config):  # the toy judge of judge and novelty
    data: str = "shapes"       # embedded data the judge knows: digits | shapes
    judge: str = ""            # judge weights file; default runs/evaluate-judge-<data>/judge.pt
    judge_steps: int = 400     # optimiser steps to train a judge (cached afterwards)
    seed: int = 0              # seed of the judge's training (and of novelty's retrieval grid)


@dataclass
class JudgeConfig(JudgeModelConfig):  # judge: judge-FID, attributes, combinations, Vendi
    target_attrs: str = ""     # .npy of target attributes ([N,3] shapes, [N] digits); default: the npz's
    ref_attrs: str = ""        # .npy of attribute triples that count as "seen" (default: the train split)
    allow_low_rank: bool = False  # allow judge-FID with N <= 128 (singular covariance; biased)


@dataclass
class NoveltyConfig(JudgeModelConfig):  # novelty: nearest training images (Appendix D)
    ref: str = ""              # training images (.npz or folder); default: the embedded --data


@dataclass
class ProbeConfig:  # probe: linear probe of a DLC set (Table 3)
    dlc: str = ""              # DLC set folder written by sem.py encode
    out: str = "runs/evaluate" # output folder (metrics.json, metrics.md)
    seed: int = 0              # seed of the 60/20/20 split (and of the torch solver's batches)
    probe_dense_max: int = 2 ** 24  # largest N*L*V one-hot built dense; above, a scipy CSR (L*V = 131072)
    probe_solver: str = "sklearn"  # sklearn (lbfgs) | torch (minibatch Adam on --device: ImageNet)
    probe_epochs: int = 20     # probe_solver torch: passes over the training split
    device: str = "auto"       # cpu | cuda | mps | auto (the torch solver only)


@dataclass
class TableConfig:  # table: metrics.json files as one Markdown table
    inputs: str = ""           # comma-separated metrics.json files
    out: str = "runs/evaluate" # the .md file, or a folder to hold results.md


@dataclass
class PlotConfig:  # plot: a metric against x values (Fig. 8: FID vs eta)
    inputs: str = ""           # comma-separated metrics.json files
    x: str = ""                # comma-separated x values, one per input (e.g. the remasking etas)
    xlabel: str = "x"          # x-axis name
    y: str = "fid"             # the metric on the y axis
    out: str = "runs/evaluate" # the .png (its table goes next to it as .md)


@dataclass
class ReportConfig:  # report: the toy pipeline's results.md and figures
    pipeline: str = ""         # the pipeline's output folder (eval/*/metrics.json, s/*.npz, DLC sets)
    gmm: str = ""              # the toy_gmm run's results.json
    seconds: int = 0           # the pipeline's wall time, printed in the title


@dataclass
class BenchConfig:  # bench: feature-extraction throughput
    resize: str = "tf1"        # as FidConfig.resize
    batch_size: int = 50       # Inception batch on CUDA (4 on a CPU)
    device: str = "auto"       # cpu | cuda | mps | auto


TOY = {"toy": {}}                                        # the toy sizes are the defaults
PRESETS = {**TOY, "imagenet": {"batch_size": 250}}       # fid and bench at ADM's 50k samples


#################################################################################
#                    Metrics on features (numpy, float64)                       #
#################################################################################

def gaussian_stats(feats, allow_low_rank=False, what="features"):
    """mu and the unbiased covariance (ddof 1, as np.cov in the ADM evaluator) of [N, D] features.
    With N <= D the covariance is singular: FID is still defined but biased upwards, so this
    is an error unless allow_low_rank (then it is computed and flagged by the caller)."""
    feats = np.asarray(feats, dtype=np.float64)  # float64: FID subtracts large, nearly equal traces
    n, d = feats.shape
    if n < 2 or (n <= d and not allow_low_rank):
        utils.fail(f"{n} samples give a rank-deficient {d}x{d} covariance of {what}; FID needs more than "
                   f"{d} samples (pass --allow_low_rank to compute a biased value anyway)")
    return feats.mean(0), np.cov(feats, rowvar=False, ddof=1)          # (D,), (D, D)


def frechet_distance(mu1, s1, mu2, s2):
    """FID = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2).
    Eigenvalue form: S1 S2 is similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so its eigenvalues
    are real and >= 0 and tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i); no matrix square root needed."""
    lam = np.linalg.eigvals(s1 @ s2).real          # tiny negative / imaginary parts are round-off
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()  # tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_sqrtm(mu1, s1, mu2, s2):
    """The same through scipy's matrix square root (the ADM / TTUR reference form)."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2).real  # .real: round-off imaginary parts dropped
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs, splits=10):
    """IS = exp E_x KL(p(y|x) || p(y)), averaged over `splits` equal chunks (ADM: 5000 each)."""
    scores = []
    for part in np.array_split(np.asarray(probs, dtype=np.float64), splits):
        py = part.mean(0, keepdims=True)                                   # (1, K) marginal
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1)  # (n,)
        scores.append(np.exp(kl.mean()))  # exp E_x KL(p(y|x) || p(y)) of this split
    return float(np.mean(scores))                                                 # mean over the splits


def pairwise_sq_dists(a, b):
    """Squared Euclidean distances [len(a), len(b)] (ADM compares squared distances too)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.cdist(a, b).pow(2).numpy()


def manifold_radii(feats, k=3):
    """Squared distance of each point to its k-th nearest neighbour, itself excluded."""
    d = pairwise_sq_dists(feats, feats)                                   # (N, N)
    return np.partition(d, k, axis=1)[:, k]      # column 0 is the point itself (distance 0)


def precision_recall(ref, samples, k=3):
    """Improved precision/recall (Kynkaanniemi et al. 2019, as in the ADM evaluator):
    precision = fraction of samples inside some reference k-NN ball, recall = fraction of
    reference points inside some sample k-NN ball."""
    r_ref, r_smp = manifold_radii(ref, k), manifold_radii(samples, k)
    d = pairwise_sq_dists(samples, ref)                                   # (Ns, Nr)
    precision = (d <= r_ref[None, :]).any(1).mean()  # sample inside the k-NN ball of some reference point
    recall = (d.T <= r_smp[None, :]).any(1).mean()  # reference point inside the ball of some sample
    return float(precision), float(recall)


def vendi_score(feats):
    """Vendi = exp(entropy of the eigenvalues of K / n), K_ij = cosine similarity (Friedman &
    Dieng 2023; github.com/vertaix/Vendi-Score). K / n = X X^T / n shares its non-zero
    eigenvalues with X^T X / n, the cheaper one when D < N."""
    x = np.asarray(feats, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)         # rows on the unit sphere
    n = len(x)
    gram = x.T @ x / n if x.shape[1] < n else x @ x.T / n                # (D, D) or (N, N)
    lam = np.clip(np.linalg.eigvalsh(gram), 0, None)  # eigenvalues >= 0, summing to 1 (unit rows)
    lam = lam[lam > 1e-12]                                               # 0 log 0 = 0
    return float(np.exp(-(lam * np.log(lam)).sum()))  # exp(entropy): 1 = all alike, n = all orthogonal


#################################################################################
#      Linear probe of the DLC (Table 3): one protocol, two solvers             #
#################################################################################
# The protocol: a seeded 60/20/20 train / validation / test split; columns standardised with the
# training statistics; logistic regression with an L2 penalty 1 / C; C chosen on validation, the
# test accuracy of that C reported. sklearn solves it on the CPU; at ImageNet size (1.28M rows x
# 131072 one-hot columns) minibatch Adam on the GPU solves the same objective.

def probe_split(n, seed):
    """Row indices of the train, validation and test parts (60/20/20) of n rows."""
    idx = np.random.RandomState(seed).permutation(n)  # same split for every solver and feature
    return np.split(idx, [int(0.6 * n), int(0.8 * n)])                            # [0, 60%), [60%, 80%), [80%, 100%)


def choose_C(fit, accuracy, Cs, va, te):
    """Fit every C in order, keep the best on the validation rows, fit it again, score the test rows."""
    val = {C: accuracy(fit(C), va) for C in Cs}                                   # validation accuracy per C
    best = max(val, key=val.get)                                                  # ties: the first C in Cs
    return {"acc": float(accuracy(fit(best), te)), "C": best, "val_acc": float(val[best])}  # test rows scored once


def one_hot(codes, V, sparse=False):
    """Flattened one-hot (N, L*V) of codes (N, L): dense float32, or a scipy CSR matrix with
    exactly L ones per row (ImageNet at 512 x 256: 1.28M x 131072, 655M non-zeros)."""
    N, L = codes.shape
    cols = (np.arange(L) * V + codes).ravel()                           # (N*L,) column of each one
    if sparse:
        from scipy import sparse as sp
        return sp.csr_matrix((np.ones(N * L, dtype=np.float32), cols.astype(np.int32), np.arange(0, N * L + 1, L)),
                             shape=(N, L * V))                          # row i: entries i*L .. i*L + L - 1
    x = np.zeros((N, L * V), dtype=np.float32)
    x[np.repeat(np.arange(N), L), cols] = 1                                       # row i gets its L ones
    return x


def linear_probe(feats, labels, seed=0, Cs=(0.01, 0.1, 1.0, 10.0), tol=1e-4, max_iter=500):
    """The probe by sklearn on [N, D] features; returns the test accuracy of the chosen C.
    `feats` may be a scipy.sparse matrix (the one-hot at L*V = 131072): then each column is
    only scaled by 1 / sd. The same minimiser: w.(x - mu)/sd + b = w.x/sd + (b - w.mu/sd), the
    intercept is not penalised, so centring only moves b, and sparsity is kept."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    y = np.asarray(labels)
    tr, va, te = probe_split(feats.shape[0], seed)
    if sparse.issparse(feats):
        x = sparse.csr_matrix(feats, dtype=np.float64)
        mu = np.asarray(x[tr].mean(0)).ravel()                          # (D,) train column means
        var = np.asarray(x[tr].multiply(x[tr]).mean(0)).ravel() - mu ** 2  # Var = E[x^2] - mu^2, no dense centring
        sd = np.sqrt(np.where(var > 1e-12, var, 0))    # why: E[x^2] - mu^2 of a constant column is ~1e-16, not 0
        scale = np.where(sd > 0, 1 / (sd + 1e-8), 0.0)  # a column constant on train: weight 0 either way
        x = sparse.csr_matrix(x @ sparse.diags(scale))                            # scaled, not centred: still sparse
    else:
        x = np.asarray(feats, dtype=np.float64)
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8        # train statistics only
        x = (x - mu) / sd
    fit = lambda C: LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(x[tr], y[tr])  # lbfgs, L2 penalty 1/C
    return choose_C(fit, lambda model, rows: model.score(x[rows], y[rows]), Cs, va, te)


def onehot_probe_torch(codes, V, labels, seed=0, Cs=(0.01, 0.1, 1.0, 10.0), device="cpu", epochs=20,
                       batch_size=4096, lr=1e-2):
    """linear_probe's objective on the one-hot DLC (mean cross-entropy + ||W||^2 / (2 C n_train),
    columns scaled by 1 / sd, the same split and choice of C), minimised by minibatch Adam on
    `device`. W . onehot(c) = sum_l W[l V + c_l]: an EmbeddingBag lookup, so no one-hot is
    built (ImageNet at 512 x 256: 1.28M rows, W is 131072 x 1000)."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    N, L = codes.shape
    K = int(y.max()) + 1                                                          # classes 0 .. K-1
    tr, va, te = (torch.from_numpy(a) for a in probe_split(N, seed))              # the split of linear_probe
    cols = codes + torch.arange(L) * V                                       # (N, L) column of each one
    freq = torch.bincount(cols[tr].flatten(), minlength=L * V).double() / len(tr)   # column means on train
    sd = (freq * (1 - freq)).sqrt()                                          # one-hot column sd (ddof 0)
    scale = torch.where(sd > 0, 1 / (sd + 1e-8), torch.zeros_like(sd)).float().to(device)   # (L*V,)
    g = torch.Generator().manual_seed(seed)    # one stream through every fit, in choose_C's order

    def logits(model, rows):
        bag, bias = model
        x = cols[rows].to(device)                                            # (B, L)
        return bag(x, per_sample_weights=scale[x]) + bias                    # (B, K)

    def accuracy(model, rows):
        with torch.no_grad():
            hits = sum(int((logits(model, rows[i:i + batch_size]).argmax(1).cpu() == y[rows[i:i + batch_size]]).sum())
                       for i in range(0, len(rows), batch_size))
        return hits / max(1, len(rows))

    def fit(C):
        bag = nn.EmbeddingBag(L * V, K, mode="sum").to(device)               # W: (L*V, K)
        nn.init.zeros_(bag.weight)                                                # start at W = 0, as sklearn's lbfgs
        bias = torch.zeros(K, device=device, requires_grad=True)  # the intercept is not penalised (as sklearn)
        opt = torch.optim.Adam([bag.weight, bias], lr=lr)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]                      # a fresh shuffle per epoch
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                loss = F.cross_entropy(logits((bag, bias), rows), y[rows].to(device))  # mean over the batch
                loss = loss + bag.weight.pow(2).sum() / (2 * C * len(tr))    # sklearn's L2, per sample
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return bag, bias
    return choose_C(fit, accuracy, Cs, va, te)


#################################################################################
#     FID-Inception: torchvision blocks with the 2015 TF graph's pooling quirks #
#################################################################################
# Architecture facts from github.com/mseitzer/pytorch-fid (src/pytorch_fid/inception.py): the
# TF graph differs from torchvision's Inception-v3 in the pooling of four block types (average
# pools exclude the padding; the last block max-pools) and has 1008 classes. The parameter names
# and shapes are torchvision's, which is why the file pt_inception-2015-12-05-6726825d.pth loads
# into torchvision's Inception3 layout with those blocks swapped in.
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE


def _avg_pool(x):  # why: the TF graph's average pools ignore the zero padding at the borders
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """Mixed_5b-d: torchvision's branches, the TF graph's average pool."""

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))]


class FIDInceptionC(InceptionC):
    """Mixed_6b-e (17 x 17): factorised 7 x 7 branches, the TF graph's average pool."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for name in ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
            bd = getattr(self, name)(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """Mixed_7b-c (8 x 8): split 1x3 / 3x1 branches; the last block max-pools."""

    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool  # Mixed_7c max-pools its pool branch in the TF graph

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)          # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)    # (B, 768, 8, 8)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)  # Mixed_7c max, Mixed_7b avg
        return [self.branch1x1(x), b3, bd, self.branch_pool(pool)]


def resize_bilinear_tf1(x, size=299):
    """TF1 `resize_bilinear(align_corners=False)`, the resize inside the 2015 graph: source
    coordinate = dst * in / out (no half-pixel offset, unlike F.interpolate). torch-fidelity
    documents the same fact; the two filters move FID by a few tenths."""
    def coords(n_in):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)  # dst * in / out
        i0 = src.floor().long().clamp(max=n_in - 1)                               # the source pixel at or before src
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)           # edge pixel repeated; weight of i1
    y0, y1, wy = coords(x.shape[2])                                               # along H
    x0, x1, wx = coords(x.shape[3])                                               # along W
    rows = x[:, :, y0] * (1 - wy)[:, None] + x[:, :, y1] * wy[:, None]    # (B, C, 299, W)
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx                  # (B, C, 299, 299)


class FIDInception(nn.Module):
    """uint8 [B, H, W, 3] -> pool_3 [B, 2048], spatial [B, 2023] (sFID), logits [B, 1008]."""

    def __init__(self, resize="tf1"):
        super().__init__()
        if resize not in ("tf1", "torch"):
            utils.fail(f"--resize must be tf1 or torch, got {resize!r}")
        self.resize = resize
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        for name, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
            setattr(net, name, FIDInceptionA(c, pool_features=pool))
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            setattr(net, name, FIDInceptionC(768, channels_7x7=c7))
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280, max_pool=False), FIDInceptionE(2048, max_pool=True)
        self.net = net.eval()                                                     # BatchNorm on its running statistics
        # sFID layer: TF `mixed_6/conv` = Mixed_6d.branch1x1 (mixed, mixed_1, mixed_2 = 5b-5d,
        # mixed_3 = 6a, so mixed_6 = 6d), the ReLU output of its 1x1 conv, 192 x 17 x 17.
        self._spatial = None  # set by the hook below at every forward
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: setattr(self, "_spatial", o))

    def load(self, path):
        """The official weights file into torchvision's layout (strict: every key, every shape)."""
        if path == "random":  # why: lets the whole FID chain run in tests without the 92 MB file
            utils.print0("warning: FID-Inception with random weights: the numbers mean nothing")
            return self
        if not os.path.isfile(path):
            utils.fail(f"FID-Inception weights {path} not found; download {INCEPTION_FILE} from "
                       f"{INCEPTION_URL} and put it there (or pass --inception PATH)")
        sd = utils.load_checkpoint(path)                                   # unreadable / truncated: one line
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            utils.fail(f"{path} is not a state dict of the FID Inception; download {INCEPTION_FILE} "
                       f"from {INCEPTION_URL}")
        utils.load_weights(self.net, sd, path)  # strict; BatchNorm fills the absent num_batches_tracked
        return self

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float()                             # (B, 3, H, W) in [0, 255]
        if self.resize == "tf1":   # the TF graph: resize, then (x - 128) / 128
            x = (resize_bilinear_tf1(x) - 128) / 128
        else:                      # pytorch-fid: F.interpolate, then 2 * x / 255 - 1
            x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        n = self.net
        # torchvision's _forward through Mixed_7c -> (B, 2048, 8, 8); no dropout (eval), fc below
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,
                      n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        pool = n.avgpool(x).flatten(1)                                     # (B, 2048) pool_3
        spatial = self._spatial[:, :7].permute(0, 2, 3, 1).flatten(1)      # (B, 17*17*7) in H, W, C order
        return pool, spatial, n.fc(pool)                                   # logits (B, 1008)


@torch.no_grad()
def inception_features(model, images, batch_size, device):
    """uint8 [N, H, W, 3] -> float64 pool_3 [N, 2048] and spatial [N, 2023] features, in batches."""
    pools, spatials = [], []
    from tqdm import tqdm
    for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=len(images) <= batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):  # why: fp32 for metrics
            p, s, _ = model(batch)  # logits unused: cmd_fid uses pool_3 @ W, no bias
        pools.append(p.double().cpu().numpy())                                    # float64 from here on
        spatials.append(s.double().cpu().numpy())
    return np.concatenate(pools), np.concatenate(spatials)




#################################################################################
#                  Image input: ADM .npz or an image folder, as uint8           #
#################################################################################

def load_images(path, max_samples=0):
    """uint8 [N, H, W, C] from an ADM .npz (arr_0) or a folder of PNG/JPEG files (all the same
    size). Images are used as stored: no re-quantisation, no JPEG round trip."""
    if not path:
        utils.fail("no image file given; pass --samples / --ref as an .npz or an image folder")
    if os.path.isdir(path):
        from PIL import Image
        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            utils.fail(f"folder {path} has no .png/.jpg images")
        names = names[:max_samples or None]                                       # 0 = all
        arrs = [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]  # grey / RGBA -> RGB
        if len({a.shape for a in arrs}) > 1:
            utils.fail(f"images in {path} have different sizes {sorted({a.shape for a in arrs})[:3]}; "
                       f"resize them first")
        return np.stack(arrs)                                              # (N, H, W, 3)
    if not os.path.isfile(path):
        utils.fail(f"{path} does not exist; pass an ADM .npz (arr_0 uint8 [N,H,W,C]) or an image folder")
    try:
        arr = np.load(path, allow_pickle=False)["arr_0"]                          # no pickle: loading cannot run code
    except Exception as e:     # why: a missing key, a pickle, a truncated zip: all the same one line
        utils.fail(f"could not read arr_0 from {path} ({type(e).__name__}); "
                   f"expected an ADM .npz of uint8 [N,H,W,C] images")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3):
        utils.fail(f"{path}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 [N,H,W,C] with C = 1 or 3")
    if len(arr) == 0:
        utils.fail(f"{path}: arr_0 holds no images (shape {arr.shape})")
    return arr[:max_samples or None]                                              # 0 = all


def load_attrs(path, flag):
    """An integer .npy of attributes ([N] or [N, k]) given as --target_attrs / --ref_attrs."""
    if not os.path.isfile(path):
        utils.fail(f"{flag} {path} does not exist; pass an .npy of integer attributes (e.g. attrs.npy of a DLC set)")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        utils.fail(f"{flag} {path} is not a readable .npy ({type(e).__name__})")
    if a.dtype.kind not in "iu" or a.ndim not in (1, 2) or len(a) == 0:
        utils.fail(f"{flag} {path} is {a.dtype} {a.shape}; expected non-empty integers [N] or [N, k]")
    return a


def check_same_size(a, b, na, nb):
    """Stop unless the two image sets share one resolution."""
    if a.shape[1:] != b.shape[1:]:
        utils.fail(f"{na} images are {a.shape[1:]} but {nb} images are {b.shape[1:]}; "
                   f"compare sets of the same resolution (the protocol resizes both to 299 only inside Inception)")


def to_rgb(arr):
    """Grey [N, H, W, 1] repeated to [N, H, W, 3] (Inception takes RGB); RGB unchanged."""
    return np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr


#################################################################################
#          Toy judges: a small CNN per embedded dataset (FID for tiny images)   #
#################################################################################

def judge_heads(data):
    """Output heads: digits -> the digit; shapes -> (shape, colour, background)."""
    return [10] if data == "digits" else [len(utils.SHAPES), len(utils.COLOURS), len(utils.COLOURS)]


class Judge(nn.Module):
    """Three conv layers (8 px -> 2 x 2, 32 px -> 4 x 4) -> 128-d penultimate features (the
    judge-FID space) -> one linear head per attribute. Trains in seconds on a CPU. The map is
    flattened, not averaged (why: with a global average pool the shape head stays at chance)."""

    def __init__(self, channels, heads):
        super().__init__()
        s = 1 if channels == 1 else 2  # why: 8 px digits keep full resolution; 32 px shapes start at 16
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=s, padding=1), nn.BatchNorm2d(16), nn.ReLU(),  # -> 8 x 8 or 16 x 16
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # -> 4 x 4 or 8 x 8
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),  # -> 2 x 2 or 4 x 4
            nn.Flatten(), nn.Linear(64 * 4 if channels == 1 else 64 * 16, 128), nn.ReLU())  # (B, 64*h*w) -> (B, 128)
        self.heads = nn.ModuleList(nn.Linear(128, k) for k in heads)

    def forward(self, x):
        f = self.body(x)                                                  # (B, 128) judge features
        return f, [h(f) for h in self.heads]                              # and (B, k) logits per head


def judge_data(data, split):
    """Images [-1, 1] and targets [N, n_heads] for training ("train") and held-out testing ("test")."""
    if data == "digits":  # a fixed 80/20 split of the 1797 digits
        d = utils.load_embedded("digits")
        idx = np.random.RandomState(0).permutation(len(d["images"]))              # seed 0: one split for every judge
        idx = idx[:int(0.8 * len(idx))] if split == "train" else idx[int(0.8 * len(idx)):]
        return d["images"][idx], d["labels"][idx, None]                           # targets (N, 1)
    if data == "shapes":  # all combinations (incl. held-out ones); test images from another seed
        d = utils.load_embedded("shapes-all", n=4000 if split == "train" else 1000, seed=0 if split == "train" else 1)
        return d["images"], d["attrs"]  # attrs (N, 3): shape, colour, background
    utils.fail(f"unknown judge data {data!r}; use digits or shapes")


def train_judge(data, steps=400, seed=0, log=print):
    """Adam on the summed cross-entropy of the heads, batches of 128, one-cycle lr up to 3e-3."""
    torch.manual_seed(seed)                                                       # the judge's initial weights
    x, y = judge_data(data, "train")
    model = Judge(x.shape[1], judge_heads(data))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)                           # lr replaced by OneCycleLR's schedule
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)  # 30% warm-up, then cosine down
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(len(x), (128,), generator=g)                            # with replacement
        xb = x[i]
        if data == "digits":  # why: 1.4k images overfit; +-1 px shifts are the cheap fix
            xb = torch.roll(xb, tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
        _, logits = model(xb)
        loss = sum(F.cross_entropy(l, y[i, j]) for j, l in enumerate(logits))     # one cross-entropy per head
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"judge {data} step {step} loss {loss.item():.4f}")
    return model.eval()  # BatchNorm: running statistics from here


@torch.no_grad()
def judge_accuracy(model, data):
    """Held-out accuracy per head."""
    x, y = judge_data(data, "test")
    _, logits = model(x)
    return [float((l.argmax(1) == y[:, j]).float().mean()) for j, l in enumerate(logits)]


def load_or_train_judge(cfg, log=print):
    """The cached judge of cfg.data (runs/evaluate-judge-<data>/judge.pt), trained if absent."""
    path = cfg.judge or os.path.join("runs", f"evaluate-judge-{cfg.data}", "judge.pt")
    x, _ = judge_data(cfg.data, "test")                                           # only for its channel count
    model = Judge(x.shape[1], judge_heads(cfg.data))
    if os.path.isfile(path):
        ck = utils.load_checkpoint(path)
        if ck.get("data") != cfg.data:
            utils.fail(f"judge {path} was trained on {ck.get('data')!r}, not {cfg.data!r}; pass the right --judge")
        model.load_state_dict(ck["model"])
        return model.eval(), ck["heldout_acc"]                                    # accuracy stored at training time
    t = time.time()
    model = train_judge(cfg.data, cfg.judge_steps, cfg.seed, log)
    acc = judge_accuracy(model, cfg.data)
    log(f"judge {cfg.data}: held-out accuracy per head {acc} ({time.time() - t:.1f} s); saved to {path}")
    utils.save_checkpoint({"model": model.state_dict(), "data": cfg.data, "heldout_acc": acc,
                           "steps": cfg.judge_steps, "versions": {"torch": torch.__version__}}, path)
    return model, acc


@torch.no_grad()
def judge_outputs(model, images_uint8, data, batch_size=500):
    """uint8 [N, H, W, C] -> penultimate features [N, 128], predictions [N, n_heads] and the top
    softmax probability of each head [N, n_heads] (how sure the judge is)."""
    want = (1, 8) if data == "digits" else (3, 32)                        # (channels, side) it was trained on
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W)
    if x.shape[1] != want[0]:
        x = x.mean(1, keepdim=True) if want[0] == 1 else x.expand(-1, 3, -1, -1)  # RGB -> grey, or grey -> RGB
    if x.shape[2] == x.shape[3] and x.shape[2] < want[1] and want[1] % x.shape[2] == 0:
        x = F.interpolate(x, size=(want[1], want[1]), mode="bilinear", align_corners=False)  # e.g. 16 px DiT samples
    if x.shape[2:] != (want[1], want[1]):
        utils.fail(f"the {data} judge takes {want[1]}x{want[1]} images (or a divisor of {want[1]}), "
                   f"got {tuple(x.shape[2:])}")
    feats, preds, conf = [], [], []
    for i in range(0, len(x), batch_size):
        f, logits = model(x[i:i + batch_size])
        feats.append(f.double())                                                  # float64 for the covariance
        preds.append(torch.stack([l.argmax(1) for l in logits], 1))              # (b, heads) judged attributes
        conf.append(torch.stack([l.softmax(1).amax(1) for l in logits], 1))      # (b, heads) top probability
    return torch.cat(feats).numpy(), torch.cat(preds).numpy(), torch.cat(conf).numpy()


#################################################################################
#                     Output files: metrics, tables, figures                    #
#################################################################################

def write_text(path, text):
    """A text file written atomically (a reader never sees half a table)."""
    with utils.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported late: most commands draw nothing)."""
    import matplotlib
    matplotlib.use("Agg")                                                         # no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi):
    """A matplotlib figure written atomically as a PNG, then closed."""
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def markdown_table(rows):
    """rows = [(name, {metric: value})] -> a Markdown table over the union of scalar metrics."""
    keys = []
    for _, m in rows:
        keys += [k for k, v in m.items() if isinstance(v, (int, float, str)) and k not in keys]  # first-seen order
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)                # 4 significant digits
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # header and separator rows
    lines += ["| " + name + " | " + " | ".join(fmt(m[k]) if k in m else "" for k in keys) + " |" for name, m in rows]
    return "\n".join(lines) + "\n"


def write_metrics(metrics, out, title):
    """<out>/metrics.json, <out>/metrics.md (the same as a one-row table) and the JSON on stdout."""
    utils.save_json(metrics, os.path.join(out, "metrics.json"))
    write_text(os.path.join(out, "metrics.md"), markdown_table([(title, metrics)]))
    print(json.dumps(metrics, indent=2))


def read_inputs(paths):
    """The metrics.json files named by --inputs, each required to exist."""
    out = []
    for p in paths:
        if not os.path.isfile(p):
            utils.fail(f"{p} does not exist; run the evaluate.py command that writes it first")
        out.append(json.load(open(p)))
    return out


#################################################################################
#                                 Sub-commands                                  #
#################################################################################

def cmd_fid(cfg):
    """FID, sFID, IS, precision / recall of --samples against --ref by the ADM protocol (Table 1)."""
    device = torch.device(utils.pick_device(cfg.device))
    smp, ref = load_images(cfg.samples, cfg.max_samples), load_images(cfg.ref, cfg.max_samples)
    check_same_size(smp, ref, "sample", "reference")
    if min(len(smp), len(ref)) <= 2048 and not cfg.allow_low_rank:  # fail before the slow part
        gaussian_stats(np.zeros((min(len(smp), len(ref)), 2048)), False, "pool_3 features")  # zeros: just the check
    model = FIDInception(cfg.resize).load(cfg.inception).to(device)
    (p_s, s_s), (p_r, s_r) = (inception_features(model, to_rgb(a), cfg.batch_size, device) for a in (smp, ref))
    low = min(len(smp), len(ref)) <= p_s.shape[1]                                 # N <= 2048: singular, flagged
    stats = np.load(cfg.ref) if cfg.ref.endswith(".npz") else {}                  # an ADM batch may hold mu / sigma
    if "mu" in stats:  # ADM reference batches carry whole-dataset statistics; ADM uses them for FID/sFID
        ref_pool, ref_spatial = (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])
    else:
        ref_pool = gaussian_stats(p_r, cfg.allow_low_rank, "pool_3 features (reference)")
        ref_spatial = gaussian_stats(s_r, cfg.allow_low_rank, "spatial features (reference)")
    fid = frechet_distance(*gaussian_stats(p_s, cfg.allow_low_rank, "pool_3 features (sample)"), *ref_pool)
    sfid = frechet_distance(*gaussian_stats(s_s, cfg.allow_low_rank, "spatial features (sample)"), *ref_spatial)
    w = model.net.fc.weight.detach().double().cpu().numpy()               # (1008, 2048)
    probs = torch.softmax(torch.from_numpy(p_s @ w.T), 1).numpy()         # (N, 1008); ADM: logits without bias
    prec, rec = precision_recall(p_r, p_s, cfg.k)                         # on the reference's own arr_0
    m = {"fid": fid, "sfid": sfid, "inception_score": inception_score(probs, cfg.splits),
         "precision": prec, "recall": rec, "vendi_inception": vendi_score(p_s),
         "n_samples": len(smp), "n_ref": len(ref), "resize": cfg.resize, "low_rank": bool(low),
         "samples": cfg.samples, "ref": cfg.ref}
    write_metrics(m, cfg.out, os.path.basename(cfg.samples))


def recombination(pred, sources):
    """Composition of two sources a, b (Sec. 5.2) judged per sample: pred (N, 3) judged
    (shape, colour, background), sources (N, 2, 3). A recombination takes every attribute from
    a or b, is neither a nor b, and is a valid image (colour != background)."""
    a, b = sources[:, 0], sources[:, 1]                                   # (N, 3) each
    from_sources = ((pred == a) | (pred == b)).all(1)                             # each attribute from a or from b
    is_a, is_b = (pred == a).all(1), (pred == b).all(1)                           # an exact copy of a source
    valid = pred[:, 1] != pred[:, 2]                                              # colour != background
    return {"recombination_rate": float((from_sources & ~is_a & ~is_b & valid).mean()),
            "source_copy_rate": float((is_a | is_b).mean())}


def cmd_judge(cfg):
    """The toy metrics of a samples batch (Tables 1, 3, Sec. 5.2 on the shapes): judge-FID against
    the real training images, attribute accuracy against targets, combination rates, Vendi."""
    smp = load_images(cfg.samples, cfg.max_samples)
    given = load_attrs(cfg.target_attrs, "--target_attrs") if cfg.target_attrs else None   # before any work
    ref = load_attrs(cfg.ref_attrs, "--ref_attrs") if cfg.ref_attrs else None
    model, acc = load_or_train_judge(cfg)                                         # acc: held-out accuracy per head
    f_s, pred, conf = judge_outputs(model, smp, cfg.data)                 # (N, 128), (N, heads), (N, heads)
    x_r = utils.load_embedded(cfg.data)["images"]                         # the image models' training data
    if smp.shape[1] < x_r.shape[-1]:   # low-resolution samples: the real images take the same path
        x_r = F.interpolate(x_r, size=smp.shape[1:3], mode="area")         # (area down, as dit.py trains)
    f_r = judge_outputs(model, utils.to_uint8(x_r), cfg.data)[0]                  # (Nr, 128) real features
    m = {"judge_fid": frechet_distance(*gaussian_stats(f_s, cfg.allow_low_rank, "judge features (sample)"),
                                       *gaussian_stats(f_r, cfg.allow_low_rank, "judge features (real)")),
         "vendi_judge": vendi_score(f_s), "n_samples": len(smp), "low_rank": bool(len(f_s) <= f_s.shape[1]),
         "judge_heldout_acc": float(min(acc)), "resolution": int(smp.shape[1]), "samples": cfg.samples}
    npz = np.load(cfg.samples) if cfg.samples.endswith(".npz") else {}            # arrays saved with the samples
    if "cfg_scale" in npz:                                   # dit.py sample records its guidance scale
        m["cfg_scale"] = float(npz["cfg_scale"])
    target = given if given is not None else next(
        (npz[k] for k in ("attrs", "target_attrs", "labels") if k in npz), None)  # else the npz's own targets
    if target is not None:     # the shapes' labels are their shape index
        target = np.asarray(target).reshape(len(target), -1)[:len(pred)]  # (N, 1 or heads)
        if len(target) != len(pred) or target.shape[1] not in (1, pred.shape[1]):
            utils.fail(f"target attributes have shape {target.shape}; "
                       f"expected [{len(pred)}] or [{len(pred)}, {pred.shape[1]}]")
        names = ["digit"] if cfg.data == "digits" else ["shape", "colour", "background"]
        hit = pred[:, :target.shape[1]] == target                         # (N, k) attribute kept
        m.update({f"acc_{n}": float(hit[:, j].mean()) for j, n in enumerate(names[:target.shape[1]])})
        m["acc_all"] = float(hit.all(1).mean())                                   # every given attribute right
    if cfg.data == "shapes":
        triples = utils.shape_combinations() if ref is None else ref.reshape(len(ref), -1).tolist()
        seen = {tuple(a) for a in triples}        # the training split's triples, unless --ref_attrs
        valid = pred[:, 1] != pred[:, 2]                    # colour == background is no image at all
        novel = [tuple(a) not in seen for a in pred[valid].tolist()]     # valid triples never trained on
        m["novel_combination_rate"] = float(np.mean(novel)) if valid.any() else 0.0
        m["invalid_rate"] = float(1 - valid.mean())
        # a valid image: colour != background and a shape the judge recognises (top probability >= 0.5)
        m["valid_rate"] = float((valid & (conf[:, 0] >= 0.5)).mean())
        m["distinct_combinations"] = len({tuple(a) for a in pred.tolist()})       # invalid triples included
        if "source_attrs" in npz:                                          # compositions of two sources
            m.update(recombination(pred, np.asarray(npz["source_attrs"])[:len(pred)]))
    write_metrics(m, cfg.out, os.path.basename(cfg.samples))


def cmd_probe(cfg):
    """Linear probe of a DLC set, per target: its one-hot codes and its embeddings.npy (Table 3)."""
    device = torch.device(utils.pick_device(cfg.device))
    s = utils.load_dlc_set(cfg.dlc)
    codes, meta = np.asarray(s["codes"]).astype(np.int64), s["meta"]      # (N, L)
    L, V = int(meta["L"]), int(meta["V"])
    if "sampler" in meta:  # generated sets keep their source's "data" but are not aligned with it
        utils.fail(f"{cfg.dlc} holds generated codes (meta has 'sampler'); probe a set written by sem.py encode")
    d = utils.load_embedded(**meta["data"]) if isinstance(meta.get("data"), dict) else {}
    if "attrs" in d:  # row i of codes is image i of the embedded data (sem.py encode)
        targets = {n: d["attrs"].numpy()[:, j] for j, n in enumerate(["shape", "colour", "background"])}
    elif "labels" in s or "labels" in d:
        targets = {"label": np.asarray(s["labels"] if "labels" in s else d["labels"])}
    else:
        utils.fail(f"DLC set {cfg.dlc} has neither labels.npy nor a shapes 'data' entry in meta.json; nothing to probe")
    if cfg.probe_solver not in ("sklearn", "torch"):
        utils.fail(f"--probe_solver must be sklearn or torch, got {cfg.probe_solver!r}")
    # the torch solver never builds the one-hot; sklearn's is sparse past probe_dense_max entries
    onehot = None if cfg.probe_solver == "torch" else one_hot(codes, V, sparse=len(codes) * L * V > cfg.probe_dense_max)
    m = {"n": len(codes), "L": L, "V": V}
    emb_path = os.path.join(cfg.dlc, "embeddings.npy")                   # (N, D) float16, if sem.py wrote it
    for t, y in targets.items():
        if onehot is None:
            m[f"probe_dlc_{t}"] = onehot_probe_torch(codes, V, y[:len(codes)], cfg.seed, device=device,
                                                     epochs=cfg.probe_epochs)["acc"]
        else:
            m[f"probe_dlc_{t}"] = linear_probe(onehot, y[:len(codes)], cfg.seed)["acc"]  # dense or CSR
        if os.path.isfile(emb_path):
            m[f"probe_embedding_{t}"] = linear_probe(np.load(emb_path).astype(np.float32), y[:len(codes)], cfg.seed)["acc"]
    if "attrs" in d:  # which attribute each position carries: what token mixing can recombine
        m.update(position_metrics(codes, d["attrs"].numpy()[:len(codes)], list(targets)))
    write_metrics(m, cfg.out, os.path.basename(os.path.normpath(cfg.dlc)))


def position_information(codes, attrs):
    """How the code's positions share the attributes: the plug-in mutual information (nats)
    I(c_l; a) = sum_{t,v} P(t, v) log(P(t, v) / (P(t) P(v))) of each position l with each attribute
    a (columns of attrs), from counts. A position is dominated by the attribute it carries the most
    about; its purity is that attribute's share of its information. Mixing two codes position by
    position recombines attributes only where positions are pure. codes (N, L), attrs (N, A) int.
    Returns the (L, A) information matrix."""
    codes, attrs = np.asarray(codes, dtype=np.int64), np.asarray(attrs, dtype=np.int64)
    N, L = codes.shape
    out = np.zeros((L, attrs.shape[1]))
    for j in range(attrs.shape[1]):
        a, K = attrs[:, j], int(attrs[:, j].max()) + 1
        for l in range(L):
            joint = np.bincount(codes[:, l] * K + a, minlength=(int(codes[:, l].max()) + 1) * K)
            joint = joint.reshape(-1, K) / N                              # (V_l, K) P(token, value)
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)  # P(token) P(value)
            nz = joint > 0                                                # 0 log 0 = 0
            out[l, j] = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    return out


def position_metrics(codes, attrs, names):
    """The probe's summary of position_information: per attribute the information summed over
    positions, the most one position carries, and how many positions it dominates; the mean purity
    of the informative positions. A position that carries nothing (a constant token) dominates
    nothing and has no purity: it is counted in positions_empty."""
    info = position_information(codes, attrs)                             # (L, A)
    live = info.sum(1) > 1e-9                                             # (L,) carries some information
    top = np.where(live, info.argmax(1), -1)                              # (L,) dominant attribute, -1: none
    purity = info.max(1)[live] / info.sum(1)[live]                        # (live,) dominant share
    m = {"purity": float(purity.mean()) if live.any() else 0.0, "positions_empty": int((~live).sum())}
    for j, n in enumerate(names):
        m[f"info_{n}_sum"], m[f"info_{n}_max"] = float(info[:, j].sum()), float(info[:, j].max())
        m[f"positions_{n}"] = int((top == j).sum())
    return m


def cmd_novelty(cfg):
    """Nearest training image of each sample in judge feature space (Appendix D). Baseline: the
    distance of each training image to its nearest *other* training image; a sample closer to a
    training image than 99% of those pairs counts as a copy."""
    smp = load_images(cfg.samples, cfg.max_samples)
    model, _ = load_or_train_judge(cfg)
    train = utils.to_uint8(utils.load_embedded(cfg.data)["images"]) if not cfg.ref else load_images(cfg.ref)
    f_tr = judge_outputs(model, train, cfg.data)[0]                      # (Ntrain, 128)
    f_s = judge_outputs(model, smp, cfg.data)[0]                          # (Ns, 128)
    d_s = np.sqrt(pairwise_sq_dists(f_s, f_tr))                           # (Ns, Ntrain)
    d_loo = np.sqrt(np.partition(pairwise_sq_dists(f_tr, f_tr), 1, axis=1)[:, 1])  # column 0 is itself
    nn_idx = np.argsort(d_s, 1)[:, :5]                                    # (Ns, 5) nearest training images
    m = {"nn_dist_mean": float(d_s.min(1).mean()), "nn_dist_median": float(np.median(d_s.min(1))),
         "nn_dist_train_to_train_mean": float(d_loo.mean()),
         "copy_rate": float((d_s.min(1) <= np.percentile(d_loo, 1)).mean()), "n_samples": len(smp)}
    rows = np.random.RandomState(cfg.seed).choice(len(smp), min(8, len(smp)), replace=False)  # figure rows
    fig, axes = pyplot().subplots(len(rows), 6, figsize=(6, len(rows)), squeeze=False)
    for r, i in enumerate(rows):  # column 0: the sample; then its 5 nearest training images
        for c, img in enumerate([smp[i]] + [train[j] for j in nn_idx[i]]):
            axes[r, c].imshow(img.squeeze(), cmap="gray" if img.shape[2] == 1 else None)
            axes[r, c].axis("off")
    axes[0, 0].set_title("sample", fontsize=7)
    axes[0, 1].set_title("nearest training images", fontsize=7, loc="left")
    save_figure(fig, os.path.join(cfg.out, "retrieval.png"), dpi=80)
    write_metrics(m, cfg.out, os.path.basename(cfg.samples))


def cmd_table(cfg):
    """metrics.json files -> one Markdown table, a row per file named by its folder."""
    if not cfg.inputs:
        utils.fail("table needs --inputs a/metrics.json,b/metrics.json")
    paths = cfg.inputs.split(",")
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) if p.endswith("metrics.json") else p for p in paths]
    text = markdown_table(list(zip(names, read_inputs(paths))))
    write_text(cfg.out if cfg.out.endswith(".md") else os.path.join(cfg.out, "results.md"), text)
    print(text)


def cmd_plot(cfg):
    """One metric of several metrics.json files against given x values (Fig. 8: FID vs eta):
    a PNG at --out and the same numbers as a Markdown table next to it (.md)."""
    files, xs = [p for p in cfg.inputs.split(",") if p], [v for v in cfg.x.split(",") if v]
    if not files or len(files) != len(xs):
        utils.fail(f"plot needs --inputs and --x with one value per input ({len(files)} inputs, {len(xs)} x values)")
    ys = [m.get(cfg.y) for m in read_inputs(files)]                               # None where the metric is absent
    if any(not isinstance(v, (int, float)) for v in ys):
        utils.fail(f"some of {cfg.inputs} have no numeric {cfg.y!r}")
    fig, ax = pyplot().subplots(figsize=(4, 3))
    ax.plot([float(v) for v in xs], ys, "o-")
    if all(float(v) > 0 for v in xs):  # why: a log axis cannot show eta = 0, the no-remasking point
        ax.set_xscale("log")
    ax.set_xlabel(cfg.xlabel)
    ax.set_ylabel(cfg.y)
    fig.tight_layout()
    save_figure(fig, cfg.out, dpi=100)
    rows = [f"| {cfg.xlabel} | {cfg.y} |", "|---|---|"] + [f"| {x} | {y:.4g} |" for x, y in zip(xs, ys)]
    write_text(os.path.splitext(cfg.out)[0] + ".md", "\n".join(rows) + "\n")
    print("\n".join(rows))


#################################################################################
#       report: the toy pipeline's tables, its claims next to the paper's        #
#################################################################################

def pipeline_claims(m, g):
    """The claims of the paper that the toy pipeline checks: (section, what, paper's number, our
    value from the metrics m and the GMM results g, the bar it must clear); met when value >= bar."""
    off = lambda n, v: g[str(n)][v]["off_mode"]  # off-mode fraction of variant v at N = n
    fid = lambda n: m[n]["judge_fid"]
    comp, avg = m["compose-dlc"], m["compose-embedding"]                          # DLC mixing, embedding averaging
    sizes = sorted(int(n) for n in g if n.isdigit())                              # the N keys; g also holds timings
    grows = all(off(a, "uncond") < off(b, "uncond") for a, b in zip(sizes, sizes[1:]))  # strictly at every N
    return [
        ("Sec. 3", "off-mode fraction, unconditional / oracle index, N = 64", "Fig. 2d: KL grows with N for uncond only",
         off(64, "uncond") / max(off(64, "oracle"), 1e-9), 3.0),
        ("Sec. 3", "off-mode fraction, unconditional / oracle index, N = 256", "", off(256, "uncond") / max(off(256, "oracle"), 1e-9), 3.0),
        ("Sec. 3", "unconditional off-mode fraction grows with N (1 = yes)", "", float(grows), 1.0),
        ("Table 3", "probe of the one-hot DLC: shape", "DLC512 85.3% (DINOv2 85.9%) on ImageNet", m["probe"]["probe_dlc_shape"], 0.95),
        ("Table 3", "probe of the one-hot DLC: colour", "", m["probe"]["probe_dlc_colour"], 0.98),
        ("Table 3", "probe of the one-hot DLC: background", "", m["probe"]["probe_dlc_background"], 0.99),
        ("Table 3", "probe: DLC minus continuous embedding, worst attribute", "DLC512 85.3 vs DINOv2 85.9",
         min(m["probe"][f"probe_dlc_{a}"] - m["probe"][f"probe_embedding_{a}"] for a in ("shape", "colour", "background")), -0.02),
        ("Tables 1, 3", "judge-FID: unconditional / DLC (encoded)", "FID 27.30 uncond vs 4.09 DLC512 encoded",
         fid("unconditional") / fid("dlc-encoded"), 2.0),
        ("Tables 1, 3", "judge-FID: DLC (SEDD) < unconditional (1 = yes)", "4.21 (generated) < 27.30",
         float(fid("dlc-sedd") < fid("unconditional")), 1.0),
        ("Tables 1, 3", "judge-FID: DLC (encoded) < DLC (SEDD) (1 = yes)", "4.09 (encoded) < 4.21 (generated)",
         float(fid("dlc-encoded") < fid("dlc-sedd")), 1.0),
        ("Sec. 5.1", "DLC (encoded) samples keep all 3 attributes of their source", "Enc-Dec FID 4.09", m["dlc-encoded"]["acc_all"], 0.80),
        ("Table 1", "label-conditioned samples show the requested shape", "DiT-XL/2 label-conditional", m["label"]["acc_shape"], 0.90),
        ("Table 1", "DLC (SEDD) samples are valid images", "FID 2.00 unguided", m["dlc-sedd"]["valid_rate"], 0.85),
        ("Sec. 5.2, Fig. 6", "DLC token mixing: recombination rate", "novel compositions", comp["recombination_rate"], 0.40),
        ("Sec. 5.2, Fig. 6", "recombination rate: DLC mixing / embedding averaging", "",
         comp["recombination_rate"] / max(avg["recombination_rate"], 1e-9), 1.5),
        ("Sec. 5.2, Fig. 6", "Vendi: DLC mixing minus embedding averaging", "DLC compositions more diverse",
         comp["vendi_judge"] - avg["vendi_judge"], 1e-9),
        ("Sec. 6, Fig. 7", "text -> DLC -> image, held-out prompts, all 3 attributes", "out-of-distribution prompts",
         m["text-heldout"]["acc_all"], 0.50),
        ("Sec. 6, Fig. 7", "text -> image, held-out minus seen prompts", "", m["text-heldout"]["acc_all"] - m["text-seen"]["acc_all"], -0.15),
    ]


def cmd_report(cfg):
    """results.md of the toy pipeline (bash pipeline.sh): each stage's table, then every claim
    with our number, the bar and the paper's number, from the metrics the pipeline wrote."""
    out = cfg.pipeline
    if not out or not os.path.isdir(os.path.join(out, "eval")):
        utils.fail(f"--pipeline {out!r} is not a pipeline output folder (it needs eval/); run bash pipeline.sh")
    if not os.path.isfile(cfg.gmm):
        utils.fail(f"--gmm {cfg.gmm!r} does not exist; it is the toy_gmm run's results.json")
    names = ["real-16px", "unconditional", "label", "embedding-encoded", "embedding-generated", "dlc-encoded",
             "dlc-sedd", "compose-dlc", "compose-embedding", "compose-heldout-dlc", "compose-heldout-embedding",
             "text-seen", "text-heldout", "probe"]
    missing = [n for n in names if not os.path.isfile(os.path.join(out, "eval", n, "metrics.json"))]
    if missing:
        utils.fail(f"{out}/eval lacks {', '.join(missing)}; run the whole of pipeline.sh")
    m = {n: json.load(open(os.path.join(out, "eval", n, "metrics.json"))) for n in names}
    g = json.load(open(cfg.gmm))                                                  # toy_gmm.py's results.json
    L = [f"# Toy pipeline results ({cfg.seconds} s)", ""] + stage_tables(m, g, names) + sedd_tv_table(out)
    claims = pipeline_claims(m, g)
    L += ["", f"## Claims: {sum(v >= bar for *_, v, bar in claims)} of {len(claims)} met", "",  # met: v >= bar
          "| paper | claim | paper's number | ours | bar | met |", "|---|---|---|---|---|---|"]
    L += [f"| {sec} | {what} | {paper} | {v:.3f} | >= {bar:g} | {'yes' if v >= bar else 'NO'} |"
          for sec, what, paper, v, bar in claims]
    L += ["", f"Judge held-out accuracy on real 32 px images (worst attribute): {m['real-16px']['judge_heldout_acc']:.3f}"]
    write_text(os.path.join(out, "results.md"), "\n".join(L) + "\n")
    pipeline_figures(out)
    print("\n".join(L))


def stage_tables(m, g, names):
    """Markdown lines of the pipeline's tables 1-5 from the GMM results g and the metrics m."""
    f3 = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)                 # strings ("-") and ints as they are
    L = ["## 1. Section 3: off-mode samples (> 3 std from every centre) and forward KDE-KL (nats) vs number of modes", "",
         "| modes | off-mode uncond | off-mode oracle | KDE-KL p vs p | KDE-KL uncond | KDE-KL oracle |", "|---" * 6 + "|"]
    for n in sorted((k for k in g if k.isdigit()), key=int):                      # numeric order, not string order
        r = g[n]
        L.append(f"| {n} | {100 * r['uncond']['off_mode']:.1f}% | {100 * r['oracle']['off_mode']:.1f}% | "
                 + " | ".join(f3(r[v]["kde_kl"]) for v in ("baseline", "uncond", "oracle")) + " |")
    L += ["", "## 2. DiT samples (Tables 1, 3): judge-FID on the shapes (lower is better), attributes judged", "",
          "| samples | judge-FID | Vendi | all 3 kept | shape | colour | background | valid |", "|---" * 8 + "|"]
    for n in names[:7]:                                                    # real images and the 6 DiT runs
        r = m[n]
        name = n + (f" (CFG {r['cfg_scale']:g})" if r.get("cfg_scale", 1.0) != 1.0 else "")
        L.append(f"| {name} | {r['judge_fid']:.2f} | {r['vendi_judge']:.2f} | " + " | ".join(
            f3(r.get(k, "-")) for k in ("acc_all", "acc_shape", "acc_colour", "acc_background", "valid_rate")) + " |")
    L += ["", "## 3. Composition (Sec. 5.2): pairs of sources that differ in all 3 attributes", "",
          "| method | recombination rate | copies of a source | Vendi | distinct combos | held-out target produced |", "|---" * 6 + "|"]
    for key, lab in (("dlc", "DLC token mixing"), ("embedding", "embedding averaging")):
        r, h = m[f"compose-{key}"], m[f"compose-heldout-{key}"]                   # h: held-out target pairs
        L.append(f"| {lab} | {r['recombination_rate']:.3f} | {r['source_copy_rate']:.3f} | {r['vendi_judge']:.2f} | "
                 f"{r['distinct_combinations']} | {h['acc_all']:.3f} |")
    L += ["", "## 4. Text -> DLC -> image (Sec. 6): judged attributes equal the prompt's", "",
          "| prompts | all 3 | shape | colour | background |", "|---" * 5 + "|"]
    for n in ("text-seen", "text-heldout"):
        r = m[n]
        L.append(f"| {n[5:]} | " + " | ".join(f3(r[k]) for k in ("acc_all", "acc_shape", "acc_colour", "acc_background")) + " |")
    p = m["probe"]
    L += ["", "## 5. Linear probe (Table 3): one-hot DLC vs the continuous embedding of the same encoder; "
          "what the code's positions carry (token-attribute information, nats)", "",
          "| attribute | DLC | embedding | information summed over positions | most in one position "
          "| positions it dominates |", "|---" * 6 + "|"]
    L += [f"| {a} | {p[f'probe_dlc_{a}']:.3f} | {p[f'probe_embedding_{a}']:.3f} | "
          + " | ".join(f3(p.get(k, "-")) for k in (f"info_{a}_sum", f"info_{a}_max", f"positions_{a}")) + " |"
          for a in ("shape", "colour", "background")]
    if "purity" in p:  # a position's purity: the share of its information that is about its dominant attribute
        L += ["", f"Mean purity of a position: {p['purity']:.2f} (1 = each position carries one attribute)."]
    return L


def sedd_tv_table(out):
    """Table 6: TV distances of the SEDD samples (with / without remasking) to the encoded codes,
    next to a random subset of the encoded codes (what sampling noise alone gives)."""
    enc = utils.load_dlc_set(os.path.join(out, "dlc"))
    ref, V = np.asarray(enc["codes"], dtype=np.int64), int(enc["meta"]["V"])      # encoded codes (N, L)
    L = ["", "## 6. SEDD (Eq. 4): total variation between generated and encoded DLCs (lower is better)", "",
          "| DLCs | n | TV of per-position marginals | TV of position pairs |", "|---|---|---|---|"]
    for n, lab in (("dlc-sedd", "SEDD, remasking (default)"), ("dlc-sedd-eta0", "SEDD, no remasking (eta = 0)")):
        gen = np.asarray(utils.load_dlc_set(os.path.join(out, n))["codes"], dtype=np.int64)
        L.append(f"| {lab} | {len(gen)} | {utils.tv_marginals(ref, gen, V):.4f} | {utils.tv_pairs(ref, gen, V):.4f} |")
    # why: a subset as large as a generated set carries the same sampling noise in its TV
    sub = ref[np.random.RandomState(0).choice(len(ref), len(gen), replace=False)]
    L.append(f"| encoded codes themselves (a random subset: the sampling-noise floor) | {len(sub)} | "
             f"{utils.tv_marginals(ref, sub, V):.4f} | {utils.tv_pairs(ref, sub, V):.4f} |")
    return L


def image_rows_figure(rows, path, title, left=0.22):
    """One labelled strip of images per row (uint8 [k, H, W, 3], label), written as a PNG."""
    fig, axes = pyplot().subplots(len(rows), 1, figsize=(9, 0.62 * len(rows) + 0.5))
    for ax, (imgs, label) in zip(np.atleast_1d(axes), rows):
        h, w = imgs.shape[1:3]
        strip = np.full((h, len(imgs) * (w + 2) - 2, 3), 255, np.uint8)      # 2 px white gaps
        for k, im in enumerate(imgs):
            strip[:, k * (w + 2):k * (w + 2) + w] = im                            # image k at x = k (w + 2)
        ax.imshow(strip, interpolation="nearest")                                 # no smoothing of the pixels
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=0.2)
    fig.subplots_adjust(left=left)                 # room for the row labels, left of the strips
    save_figure(fig, path, dpi=110)


def pipeline_figures(out, k=12):
    """The README's three figures from the pipeline's sample files: samples per conditioning,
    compositions of source pairs, text -> image per prompt."""
    s = lambda n: np.load(os.path.join(out, "s", f"{n}.npz"))                     # one sample file
    image_rows_figure([(s(n)["arr_0"][:k], lab) for n, lab in (
        ("real-16px", "training images"), ("dlc-encoded", "DLC (encoded)"), ("embedding-encoded", "embedding (encoded)"),
        ("dlc-sedd", "DLC (SEDD)"), ("embedding-generated", "embedding (GMM)"), ("label", "label"),
        ("unconditional", "unconditional"))], os.path.join(out, "pipeline_samples.png"),
        "DiT samples, 16 px (first three rows: the same training images / their codes, column by column)")
    c, e, real = s("compose"), s("compose_embavg"), s("real-16px")
    K, rows = len(c["arr_0"]) // len(c["pairs"]), []                       # K samples per source pair
    srcs = dict(zip(map(tuple, real["attrs"].tolist()), real["arr_0"]))     # a real image per attribute triple
    for j in range(min(3, len(c["pairs"]))):
        a, b = (tuple(v) for v in c["source_attrs"][j * K].tolist())              # the pair's source triples
        blank = np.full_like(real["arr_0"][0], 255)                               # white: no real image of that triple
        rows += [(np.stack([srcs.get(a, blank), srcs.get(b, blank)]), f"pair {j}: sources A, B"),
                 (c["arr_0"][j * K:(j + 1) * K], f"pair {j}: DLC mix"), (e["arr_0"][j * K:(j + 1) * K], "embedding avg")]
    image_rows_figure(rows, os.path.join(out, "pipeline_compose.png"),
                      "Composition of two sources: DLC token mixing vs averaged embeddings")
    rows = []
    for split in ("seen", "heldout"):
        t = s(f"text-{split}")
        prompts = [l.strip() for l in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", f"{split}.txt")) if l.strip()]
        per = len(t["arr_0"]) // len(prompts)                              # samples per prompt, in order
        rows += [(t["arr_0"][i * per:i * per + 10], ("held out: " if split == "heldout" else "") + p.replace(" background", ""))
                 for i, p in enumerate(prompts)]
    image_rows_figure(rows, os.path.join(out, "pipeline_text.png"), "Text -> DLC (text2dlc.py) -> image (dit.py)", left=0.33)



#################################################################################
#                 bench: feature-extraction throughput                          #
#################################################################################

def cmd_bench(cfg):
    """Images/s of feature extraction: FID-Inception (random weights) at 299 px and the judge."""
    device = torch.device(utils.pick_device(cfg.device))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # bench only: TF32 matmuls and convs
    model = FIDInception(cfg.resize).to(device)                                   # random weights: speed only
    bs = cfg.batch_size if device.type == "cuda" else 4
    imgs = torch.randint(0, 256, (bs, 64, 64, 3), dtype=torch.uint8, device=device)  # resized to 299 inside
    with torch.no_grad():   # each: one untimed call (the warm-up, FLOPs counted), then `iters` timed
        inc, _ = utils.measure(lambda: model(imgs), device, iters=10 if device.type == "cuda" else 2, warmup=0)
        judge = Judge(3, judge_heads("shapes")).to(device).eval()
        x = torch.randn(1024, 3, 32, 32, device=device)                           # the shapes judge's input size
        jud, _ = utils.measure(lambda: judge(x), device, iters=5, warmup=0)
    print(f"bench device {device} | inception (64 px -> 299, batch {bs}) {bs / inc:.1f} img/s | "
          f"judge (32 px, batch 1024) {1024 / jud:.0f} img/s | peak memory {utils.peak_memory_mb(device):.0f} MB")


COMMANDS = {"fid": (cmd_fid, FidConfig, PRESETS), "judge": (cmd_judge, JudgeConfig, TOY),
            "probe": (cmd_probe, ProbeConfig, TOY), "novelty": (cmd_novelty, NoveltyConfig, TOY),
            "table": (cmd_table, TableConfig, TOY), "report": (cmd_report, ReportConfig, TOY),
            "plot": (cmd_plot, PlotConfig, TOY), "bench": (cmd_bench, BenchConfig, PRESETS)}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv, default=None)   # no default: evaluate.py CMD


if __name__ == "__main__":
    main()
