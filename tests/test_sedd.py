"""Tests for sedd.py: score entropy vs its closed forms, the samplers against an oracle with
exact scores, the remasking schedule, attention / rotary, resume, torchrun, bad input."""
import json, math, os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import sedd
import utils
from conftest import ROOT, assert_same_optimizer_state, structured_dlc_set, torchrun

EPS = 1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster than two fighting over a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_log_score(x_t, x0, sigma, V, p=None):
    """log s at masked positions: log r + log p(y) (p = one-hot of x0 when None); 0 at x_t."""
    B, L = x_t.shape
    r = 1 / torch.expm1(sigma)[:, None, None]
    if p is None:
        p = F.one_hot(x0, V + 1).double()[..., :V]
    log_s = torch.log(r) + torch.log(p)                                # (B, L, V)
    log_s = torch.cat([log_s, torch.zeros(B, L, 1, dtype=log_s.dtype)], -1)
    return torch.scatter(log_s, -1, x_t[..., None], 0.0)


def noisy_batch(B=64, L=12, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = EPS + (1 - EPS) * torch.rand(B, generator=g, dtype=torch.float64)
    sigma, dsigma = sedd.log_linear_noise(t, EPS)
    x0 = torch.randint(V, (B, L), generator=g)
    x_t = sedd.forward_mask(x0, sigma, V, g)
    return t, sigma, dsigma, x0, x_t


# ----------------------------------------------------------------------------- loss
def test_score_entropy_zero_at_exact_scores_positive_otherwise():
    V = 7
    t, sigma, dsigma, x0, x_t = noisy_batch(V=V)
    assert (x_t == V).any() and (x_t != V).any()
    loss = sedd.score_entropy(exact_log_score(x_t, x0, sigma, V), x_t, x0, sigma, V)
    assert loss.abs().max() < 1e-4
    wrong = exact_log_score(x_t, x0, sigma, V) + 0.3 * torch.randn(*x_t.shape, V + 1, dtype=torch.float64)
    wrong = torch.where(torch.isinf(wrong), torch.full_like(wrong, -2.0), wrong)   # finite mass off x0
    loss = sedd.score_entropy(wrong, x_t, x0, sigma, V)
    assert (loss[x_t == V] > 1e-3).all() and (loss[x_t != V] == 0).all()


def test_loss_is_one_over_t_weighted_cross_entropy():
    """Normalised scores s = r q (sum q = 1): dsigma * SE = -(1/t) log q(x0) (MDLM's loss).
    Unnormalised q with Q = sum q: the same plus the penalty (1/t) (Q - 1 - log Q) >= 0."""
    V = 7
    t, sigma, dsigma, x0, x_t = noisy_batch(V=V)
    logits = torch.randn(*x_t.shape, V, dtype=torch.float64)
    for scale in (1.0, 2.5):   # Q = 1 (normalised), then Q = 2.5
        q = scale * logits.softmax(-1)
        z = torch.log(V * q)                                           # raw output of the ideal net
        z = torch.cat([z, torch.zeros_like(z[..., :1])], -1)
        log_s = sedd.absorb_log_score(z, x_t, sigma, V)
        lhs = dsigma[:, None] * sedd.score_entropy(log_s, x_t, x0, sigma, V)
        Q = q.sum(-1)
        ce = -torch.log(q.gather(-1, x0[..., None]).squeeze(-1) / Q)
        rhs = torch.where(x_t == V, (ce + Q - 1 - torch.log(Q)) / t[:, None], torch.zeros_like(ce))
        assert torch.allclose(lhs.double(), rhs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- samplers
def chi2_ok(counts, probs, alpha=1e-6):
    """Pearson chi-square goodness of fit; passes unless p < alpha (seeded, so not flaky)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0
    return stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue > alpha


def product_joint(L=3, V=4, seed=0):
    pis = torch.distributions.Dirichlet(torch.ones(V)).sample((L,)) if seed is None else \
        torch.tensor(np.random.RandomState(seed).dirichlet(np.ones(V), L))
    joint = pis[0]
    for i in range(1, L):
        joint = joint[..., None] * pis[i]
    return pis.double(), joint


@pytest.mark.parametrize("eta", [0.0, 0.05])
def test_tau_leaping_matches_product_distribution(eta):
    """Oracle scores of p(x) = prod_i pi_i(x_i). At every traced time s, each position of x_s must
    follow the forward marginal q_s = (1-eps)s mask + (1 - (1-eps)s) pi_i (this is what a wrong
    step formula breaks), and the final codes must follow pi_i, with and without remasking."""
    L, V, n, steps = 3, 4, 4000, 20
    pis, joint = product_joint(L, V)
    checks = []
    def trace(i, s, x):
        if i % 4 == 3:
            checks.append((s, x.clone()))
    g = torch.Generator().manual_seed(1)
    x, _ = sedd.sample(sedd.oracle_raw_fn(joint, V), n, L, V, steps, "analytic", eta, 0.3, 0.55, EPS,
                       generator=g, trace=trace)
    assert len(checks) == 5
    for s, xs in checks:
        m = (1 - EPS) * s
        for i in range(L):
            counts = np.bincount(xs[:, i].numpy(), minlength=V + 1)
            probs = np.append((1 - m) * pis[i].numpy(), m)
            assert chi2_ok(counts, probs), (s, i, counts, probs)
    for i in range(L):
        assert chi2_ok(np.bincount(x[:, i].numpy(), minlength=V), pis[i].numpy())
    pair = np.bincount(x[:, 0].numpy() * V + x[:, 1].numpy(), minlength=V * V)   # independence kept
    assert chi2_ok(pair, torch.outer(pis[0], pis[1]).reshape(-1).numpy())


def test_samplers_converge_on_correlated_joint():
    """A joint with strong dependence: unmasking both positions in one step draws them
    independently (TV far from 0); as steps grow both samplers converge to the joint."""
    V, n = 3, 4000
    joint = torch.tensor([[0.30, 0.02, 0.01], [0.02, 0.25, 0.03], [0.01, 0.06, 0.30]], dtype=torch.float64)
    joint = joint / joint.sum()
    def tv(x):
        h = np.bincount(x[:, 0].numpy() * V + x[:, 1].numpy(), minlength=V * V) / n
        return 0.5 * np.abs(h - joint.reshape(-1).numpy()).sum()
    for sampler in ("euler", "analytic"):
        errs = []
        for steps in (1, 4, 64):
            g = torch.Generator().manual_seed(steps)
            x, _ = sedd.sample(sedd.oracle_raw_fn(joint, V), n, 2, V, steps, sampler, eps=EPS, generator=g)
            errs.append(tv(x))
        assert errs[0] > 0.2 and errs[2] < 0.04 and errs[0] > errs[1] > errs[2], (sampler, errs)


def test_masked_fraction_tracks_schedule_with_remasking():
    L, V, n, steps, eta = 8, 5, 1000, 100, 0.05
    _, joint = product_joint(3, V)
    pis = torch.tensor(np.random.RandomState(3).dirichlet(np.ones(V), L))
    def raw_fn(x, sigma):  # product oracle written directly: z = log(V pi_i(y))
        z = torch.log(V * pis).float().expand(x.shape[0], L, V)
        return torch.cat([z, torch.zeros(x.shape[0], L, 1)], -1)
    seen, prev = [], [torch.full((n, L), V)]
    def trace(i, s, x):
        remasked = ((prev[0] != V) & (x == V)).sum().item()
        seen.append((s, (x == V).float().mean().item(), remasked))
        prev[0] = x.clone()
    sedd.sample(raw_fn, n, L, V, steps, "analytic", eta, 0.3, 0.55, EPS, generator=torch.Generator().manual_seed(0),
                trace=trace)
    window = [(s, f, r) for s, f, r in seen if 0.25 < s < 0.6]
    assert sum(r for *_, r in window) > 500                            # remasking really happened
    assert sum(r for s, f, r in seen if s < 0.25 or s > 0.6) == 0      # and only in the window
    for s, f, _ in seen:
        assert abs(f - (1 - EPS) * s) < 0.025, (s, f)


def test_caching_reuses_output_only_when_nothing_changed():
    """The oracle is time-independent (like the ideal absorb network), so cached and uncached
    runs with the same seed must agree exactly; caching must save forwards on many steps."""
    _, joint = product_joint(3, 4)
    calls = []
    oracle = sedd.oracle_raw_fn(joint, 4)
    def raw_fn(x, sigma):
        calls.append(len(x))
        return oracle(x, sigma)
    out = {}
    for cache in (True, False):
        calls.clear()
        x, st = sedd.sample(raw_fn, 50, 3, 4, 200, eta=0.02, cache=cache, generator=torch.Generator().manual_seed(5))
        out[cache] = (x, st, sum(calls))
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1]["forwards"] == out[True][2] < 0.5 * out[False][2]
    assert out[True][1]["saved"] > 0 and out[False][1]["saved"] == 0


def test_sampling_builds_no_autograd_graph():
    """The sampler runs without gradients: a network with parameters would otherwise keep every
    step's graph alive (memory growing with steps x batch)."""
    net = torch.nn.Linear(1, 3)                                     # V + 1 = 3 outputs per position
    seen = []

    def raw_fn(x, sigma):
        z = net(x[..., None].float())                               # (n, L, V+1), depends on parameters
        seen.append(torch.is_grad_enabled() or z.requires_grad)
        return z
    x, _ = sedd.sample(raw_fn, 4, 3, 2, steps=3)
    assert seen and not any(seen) and x.shape == (4, 3)


def test_float64_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([1e-3, 0.5, 2.0, 0.0], dtype=torch.float64)      # unnormalised, a zero
    x = sedd.sample_categorical(p.expand(200000, 4), g)
    assert (x != 3).all()
    assert chi2_ok(np.bincount(x.numpy(), minlength=4), (p / p.sum()).numpy())


def chain_joint(V=3):
    """p(a, b, c) proportional to (1 + 8 [a = b]) (1 + 8 [b = c]) (1 + a + 2 c): neighbours agree,
    so the conditional of a position given the others is far from its marginal."""
    a, b, c = torch.meshgrid(*[torch.arange(V, dtype=torch.float64)] * 3, indexing="ij")
    joint = (1 + 8 * (a == b)) * (1 + 8 * (b == c)) * (1 + a + 2 * c)
    return joint / joint.sum()


@pytest.mark.parametrize("eta", [0.0, 0.05])
def test_infilling_draws_the_exact_conditional(eta):
    """Keep positions 0 and 2 of a 3-token joint: position 1 must follow p(x1 | x0, x2), exactly at
    any step count (one free position, exact scores), and not its marginal (what a leak of the kept
    tokens, i.e. a network that never saw them, would give). Kept tokens never change, not even with
    remasking on, at any step."""
    V, per = 3, 1500
    joint = chain_joint(V)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))                  # (9, 2): (x0, x2)
    given = torch.stack([pairs[:, 0], torch.zeros(9, dtype=torch.long), pairs[:, 1]], 1).repeat(per, 1)
    keep = torch.tensor([True, False, True])
    def trace(i, s, x):
        assert torch.equal(x[:, keep], given[:, keep]), i                           # never masked or moved
    x, _ = sedd.sample(sedd.oracle_raw_fn(joint, V), len(given), 3, V, 12, "analytic", eta, 0.3, 0.55, EPS,
                       generator=torch.Generator().manual_seed(2), trace=trace, given=given, keep=keep)
    assert torch.equal(x[:, keep], given[:, keep])
    marginal = joint.sum((0, 2)).numpy()
    for a, c in pairs.tolist():
        rows = (given[:, 0] == a) & (given[:, 2] == c)
        counts = np.bincount(x[rows, 1].numpy(), minlength=V)
        cond = (joint[a, :, c] / joint[a, :, c].sum()).numpy()
        assert chi2_ok(counts, cond), (a, c, counts, cond)
        if np.abs(cond - marginal).sum() > 0.4:                                     # where a leak would show
            assert not chi2_ok(counts, marginal)


def test_infilling_two_free_positions_converges_to_conditional():
    """Keep position 0 only: (x1, x2) ~ p(x1, x2 | x0) as the steps grow (two correlated free
    positions unmasked in one step are drawn independently: that is the step error)."""
    V, per = 3, 2000
    joint = chain_joint(V)
    given = torch.arange(V).repeat(per)[:, None].expand(-1, 3).contiguous()
    keep = torch.tensor([True, False, False])
    x, _ = sedd.sample(sedd.oracle_raw_fn(joint, V), len(given), 3, V, 128, "analytic", 0.02, 0.3, 0.55, EPS,
                       generator=torch.Generator().manual_seed(3), given=given, keep=keep)
    assert torch.equal(x[:, 0], given[:, 0])
    marginal = joint.sum(0).reshape(-1).numpy()
    for a in range(V):
        h = np.bincount(x[given[:, 0] == a, 1].numpy() * V + x[given[:, 0] == a, 2].numpy(), minlength=V * V) / per
        cond = (joint[a] / joint[a].sum()).reshape(-1).numpy()
        assert 0.5 * np.abs(h - cond).sum() < 0.05, (a, h, cond)
        assert 0.5 * np.abs(cond - marginal).sum() > 0.2                           # a leak would fail above


# ----------------------------------------------------------------------------- network
def test_sdpa_equals_explicit_attention(monkeypatch):
    torch.manual_seed(0)
    blk = sedd.DDiTBlock(32, 4, 16, 0.0).eval()
    torch.nn.init.normal_(blk.ada.weight, std=0.5)                     # switch adaLN-Zero on
    x, c = torch.randn(3, 10, 32), torch.randn(3, 16)
    fused = blk(x, c)
    def explicit(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)   # (B, H, L, L)
        return w @ v
    monkeypatch.setattr(sedd.F, "scaled_dot_product_attention", explicit)
    assert torch.allclose(fused, blk(x, c), atol=1e-5)
    assert not torch.allclose(fused, x, atol=1e-3)                     # the block does something


def test_rotary_preserves_norms_and_is_relative():
    q = torch.randn(2, 3, 11, 16)
    assert torch.allclose(sedd.rotary(q).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    a, b = torch.randn(16).expand(1, 1, 11, 16), torch.randn(16).expand(1, 1, 11, 16)
    dots = sedd.rotary(a)[0, 0] @ sedd.rotary(b)[0, 0].T               # (L, L): depends on i - j only
    assert torch.allclose(dots[1:, 1:], dots[:-1, :-1], atol=1e-4)
    assert not torch.allclose(dots[0, 1], dots[0, 2])


def test_model_output_parameterisation():
    m = sedd.DDiT(6, 9, "toy", 16, 0.0)
    x = torch.randint(10, (4, 6)); sigma = torch.rand(4) + 0.1
    log_s = m(x, sigma)
    assert log_s.shape == (4, 6, 10) and log_s.dtype == torch.float32
    assert (log_s.gather(-1, x[..., None]) == 0).all()
    r = 1 / torch.expm1(sigma)   # zero-initialised output: scores r / V, i.e. a uniform p(x0 | x_t)
    masked = x == 9
    assert torch.allclose(log_s[..., :9].exp().sum(-1)[masked], r[:, None].expand(4, 6)[masked], rtol=1e-4)


# ----------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("sedd")
    cwd = os.getcwd(); os.chdir(d)
    try:
        structured_dlc_set("dlc", n=300, L=8, V=16)
        sedd.main(["--dlc", "dlc", "--run", "full", "--steps", "6", "--batch_size", "16", "--ckpt_every", "3",
                   "--eval_every", "3", "--warmup", "2"])
    finally:
        os.chdir(cwd)
    return d


def test_resume_equality(toy, monkeypatch):
    monkeypatch.chdir(toy)
    common = ["--dlc", "dlc", "--run", "part", "--batch_size", "16", "--ckpt_every", "3", "--eval_every", "3",
              "--warmup", "2"]
    sedd.main(common + ["--steps", "3"])
    sedd.main(common + ["--steps", "6", "--resume"])
    a = torch.load("runs/sedd-full/checkpoints/ckpt_0000006.pt", weights_only=True)
    b = torch.load("runs/sedd-part/checkpoints/ckpt_0000006.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert_same_optimizer_state(a["opt"], b["opt"])
    assert "held-out loss" in open("runs/sedd-part/log.txt").read()


def test_sample_writes_dlc_set(toy, monkeypatch):
    monkeypatch.chdir(toy)
    sedd.main(["sample", "--ckpt", "runs/sedd-full", "--n", "37", "--out", "gen", "--steps", "16",
               "--batch_size", "20"])
    codes = np.load("gen/codes.npy")
    meta = json.load(open("gen/meta.json"))
    assert codes.shape == (37, 8) and codes.dtype == np.uint16 and codes.max() < 16
    assert meta["sampler"]["eta"] == 0.01 and meta["data"]["name"] == "shapes" and meta["N"] == 37
    assert 0 < meta["tv"]["marginal"] <= 1 and meta["stats"]["forwards_per_dlc"] <= 17


def test_sample_infill_command_keeps_given_tokens(toy, monkeypatch):
    """--given / --keep: rows cycle through the given set, kept positions come back unchanged,
    labels follow their rows; a bad position list or a missing half is one line."""
    monkeypatch.chdir(toy)
    sedd.main(["sample", "--ckpt", "runs/sedd-full", "--given", "dlc", "--keep", "0-2,5", "--n", "7",
               "--out", "infill", "--steps", "8", "--batch_size", "3", "--eta", "0.05"])
    codes, given = np.load("infill/codes.npy"), np.load("dlc/codes.npy")
    keep = [0, 1, 2, 5]
    assert codes.shape == (7, 8) and np.array_equal(codes[:, keep], given[:7, keep])
    assert np.array_equal(np.load("infill/labels.npy"), np.load("dlc/labels.npy")[:7])
    meta = json.load(open("infill/meta.json"))
    assert meta["infill"]["kept_positions"] == keep and meta["sampler"]["given"] == "dlc"
    for extra, word in ((["--keep", "3-9"], "--keep"), (["--keep", "0-7"], "nothing is left"), ([], "both")):
        with pytest.raises(SystemExit) as e:
            sedd.main(["sample", "--ckpt", "runs/sedd-full", "--given", "dlc", "--n", "2", "--out", "bad"] + extra)
        assert word in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists("bad")


def test_imagenet_sampling_presets_are_the_authors_scripts(capsys):
    """scripts/gen_50k_sedd-1024_cfg-1.7.sh: --steps 1024 with the default analytic sampler;
    scripts/gen_50k_sedd-4096-remask.sh: --steps 4096 --sample_name corrector --eta=0.01 (t0 0.3, t1 0.55)."""
    a = utils.parse_config(sedd.SampleConfig, ["--preset", "imagenet-1024"], sedd.SAMPLE_PRESETS)
    b = utils.parse_config(sedd.SampleConfig, ["--preset", "imagenet-4096-remask"], sedd.SAMPLE_PRESETS)
    assert (a.sampler, a.steps, a.eta, a.t_end, a.batch_size) == ("analytic", 1024, 0.0, 1e-5, 256)
    assert (b.sampler, b.steps, b.eta, b.t0, b.t1, b.t_end) == ("analytic", 4096, 0.01, 0.3, 0.55, 1e-5)
    p = utils.parse_config(sedd.SampleConfig, ["--preset", "imagenet-4096-remask", "--eta", "1e-4"], sedd.SAMPLE_PRESETS)
    assert p.eta == 1e-4                                               # the paper's table value stays a flag
    sedd.main(["sample", "--help"])
    out = capsys.readouterr().out
    assert "imagenet-1024" in out and "gen_50k_sedd-4096-remask.sh" in out and "--keep" in out


def test_bench_runs(capsys):
    sedd.main(["bench", "--bench_iters", "1", "--bench_n", "4", "--bench_steps", "4", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "DLCs/s" in out


def test_torchrun_two_processes(toy, tmp_path):
    # no --run here: torchrun's own parser rejects it as an abbreviation of --run-path
    torchrun([os.path.join(ROOT, "sedd.py"), "--dlc", str(toy / "dlc"), "--steps", "3",
              "--batch_size", "8", "--eval_every", "3", "--ckpt_every", "3"], cwd=tmp_path, timeout=120)
    assert os.path.isfile(tmp_path / "runs/sedd-toy/checkpoints/ckpt_0000003.pt")
    log = open(tmp_path / "runs/sedd-toy/log.txt").read()
    assert "world=2" in log and "samples/s" in log


def write_raw_set(path, codes, L, V):
    os.makedirs(path)
    np.save(os.path.join(path, "codes.npy"), np.asarray(codes, dtype=np.uint16).reshape(-1, L))
    json.dump({"L": L, "V": V, "N": len(codes)}, open(os.path.join(path, "meta.json"), "w"))


def test_bad_input_one_line_nothing_written(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_raw_set("big", [[0, 1, 16, 2]], 4, 16)                      # a token >= V
    write_raw_set("empty", np.zeros((0, 4)), 4, 16)
    for bad, word in (("big", ">= V"), ("empty", "empty")):
        with pytest.raises(SystemExit) as e:
            sedd.main(["--dlc", bad, "--run", "x", "--steps", "1"])
        msg = str(e.value)
        assert msg.startswith("error:") and word in msg and "\n" not in msg
    assert not os.path.exists("runs")
    monkeypatch.chdir(toy)                                             # L=4 set vs the L=8 checkpoint
    before = sorted(os.listdir("runs/sedd-full/checkpoints")), open("runs/sedd-full/log.txt").read()
    write_raw_set("l4", [[0, 1, 2, 3]] * 30, 4, 16)
    with pytest.raises(SystemExit) as e:
        sedd.main(["--dlc", "l4", "--run", "full", "--steps", "9", "--resume"])
    assert "L=8" in str(e.value) and "L=4" in str(e.value)
    assert (sorted(os.listdir("runs/sedd-full/checkpoints")), open("runs/sedd-full/log.txt").read()) == before
    with pytest.raises(SystemExit) as e:                               # trained with the exact GELU (the default)
        sedd.main(["--dlc", "dlc", "--run", "full", "--steps", "9", "--resume", "--gelu", "tanh"])
    assert "--gelu exact" in str(e.value) and "\n" not in str(e.value)
    assert (sorted(os.listdir("runs/sedd-full/checkpoints")), open("runs/sedd-full/log.txt").read()) == before
    with pytest.raises(SystemExit) as e:
        sedd.main(["--preset", "imagenet512", "--dlc", "dlc", "--run", "y"])   # preset expects L=512
    assert "L=512" in str(e.value) and not os.path.exists("runs/sedd-y")


def test_training_presets_keep_the_papers_optimiser():
    """The toy trains at lr 1e-3 (minutes of CPU); the imagenet presets keep SEDD's 3e-4, batch 512,
    warm-up 2500 and EMA 0.9999 whatever the toy default is."""
    assert utils.parse_config(sedd.Config, [], sedd.PRESETS).lr == 1e-3
    for name in ("imagenet512", "imagenet128", "imagenet32"):
        c = utils.parse_config(sedd.Config, ["--preset", name], sedd.PRESETS)
        assert (c.lr, c.batch_size, c.warmup, c.ema, c.size) == (3e-4, 512, 2500, 0.9999, "medium")
