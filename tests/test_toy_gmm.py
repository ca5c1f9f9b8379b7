"""Tests for toy_gmm.py: the GMM density, the KDE-KL metric, the IDDPM schedule and loss,
the GMM index, training, sampling, bad input, and the real command line."""
import json, math, os

import numpy as np
import pytest
import torch

import toy_gmm as tg
from conftest import ROOT, run_script


def test_gmm_logpdf_exact_vs_monte_carlo():
    c, std = tg.grid_centres(4), 0.3
    # normalisation: E_{x ~ U(box)}[p(x)] * area = 1 (importance-free Monte Carlo over a box)
    g = torch.Generator().manual_seed(0)
    box = 3.0
    x = (torch.rand(400_000, 2, generator=g, dtype=torch.float64) - 0.5) * 2 * box
    integral = tg.gmm_logpdf(x, c, std).exp().mean().item() * (2 * box) ** 2
    assert abs(integral - 1) < 0.01
    # at a centre, by hand: (1/N) sum_k exp(-|c0 - c_k|^2 / (2 std^2)) / (2 pi std^2)
    at = tg.gmm_logpdf(c[:1], c, std).item()
    by_hand = sum(math.exp(-((c[0] - ck) ** 2).sum().item() / (2 * std ** 2)) for ck in c) / 4 / (2 * math.pi * std ** 2)
    assert abs(at - math.log(by_hand)) < 1e-9


def test_grid_and_bad_modes():
    c = tg.grid_centres(16, 2.0)
    assert c.shape == (16, 2) and torch.allclose(c.mean(0), torch.zeros(2, dtype=c.dtype))
    assert sorted(set(c[:, 0].tolist())) == [-3.0, -1.0, 1.0, 3.0]
    with pytest.raises(SystemExit, match="perfect square"):
        tg.grid_centres(12)
    assert abs(tg.data_scale(16, 1.0, 0.1) - tg.sample_gmm(tg.grid_centres(16), 0.1, 200_000)[0].std(0).mean().item()) < 0.01


def test_kde_kl_near_baseline_for_p_and_larger_when_modes_dropped():
    c, std = tg.grid_centres(16), 0.2
    g = torch.Generator().manual_seed(0)
    base, _ = tg.kde_kl(tg.sample_gmm(c, std, 4000, g)[0], c, std, 2000, g)
    again, se = tg.kde_kl(tg.sample_gmm(c, std, 4000, g)[0], c, std, 2000, g)
    assert abs(again - base) < 5 * se + 0.05
    x, k = tg.sample_gmm(c, std, 8000, g)
    half = x[k < 8][:4000]                                       # half of the modes dropped
    dropped, _ = tg.kde_kl(half, c, std, 2000, g)
    assert dropped > base + 0.5
    x, k = tg.sample_gmm(c, 0.1, 4000, g)                         # narrow modes for coverage
    m = tg.metrics(x[k < 8], c, 0.1, g)
    assert m["coverage"] == 0.5 and abs(m["off_mode"] - math.exp(-4.5)) < 0.006   # P(|z| > 3) in 2-D
    far = tg.metrics(x[k < 8] + 0.5, c, 0.1, g)                   # every sample between modes
    assert far["off_mode"] > 0.99 and far["reverse_kl"] > m["reverse_kl"] + 5


def test_schedule_identities():
    d = tg.Diffusion(1000)
    assert (d.ab[1:] < d.ab[:-1]).all() and d.ab[0] < 1 and d.ab[-1] < 1e-3       # alpha-bar decreasing
    t = torch.arange(1, 1000)
    # posterior variance beta_tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t), written from alphas
    alphas = 1 - d.betas
    direct = (1 - alphas[t]) * (1 - d.ab[t - 1]) / (1 - d.ab[t])
    torch.testing.assert_close(d.beta_tilde[t], direct)
    # posterior mean coefficients reproduce x_{t-1} exactly when x_t is noiseless... check via
    # E[x_{t-1} | x_t, x_0] computed by Gaussian conditioning of the joint (x_{t-1}, x_t | x_0)
    i = 500
    var_prev, cov = 1 - d.ab[i - 1], alphas[i].sqrt() * (1 - d.ab[i - 1])
    var_t = 1 - d.ab[i]
    coef_t = cov / var_t
    coef_0 = d.ab[i - 1].sqrt() - coef_t * d.ab[i].sqrt()
    torch.testing.assert_close(d.ct[i], coef_t)
    torch.testing.assert_close(d.c0[i], coef_0)
    torch.testing.assert_close(d.beta_tilde[i], var_prev - coef_t * cov)


def test_respacing_keeps_alpha_bar():
    full, resp = tg.Diffusion(1000), tg.Diffusion(1000, 50)
    torch.testing.assert_close(resp.ab, full.ab[resp.timesteps])
    assert len(resp) == 50 and resp.timesteps[0] == 0 and resp.timesteps[-1] == 999


def test_learned_variance_loss_finite_at_init_and_training_lowers_it():
    cfg = tg.Config(modes=[4], variants=["uncond", "oracle"], steps=150, batch_size=256, width=32,
                    log_every=1000, lr=3e-3)
    torch.manual_seed(0)
    sweep = tg.Sweep(cfg, torch.device("cpu"))
    d = tg.Diffusion(cfg.T)
    x0, k = sweep.batch(256)
    i = torch.randint(len(d), (2, 256))
    eps = torch.randn_like(x0)
    ls, lv = d.loss(sweep.net(d.q_sample(x0, i, eps), i, k), x0, d.q_sample(x0, i, eps), i, eps)
    assert torch.isfinite(ls).all() and torch.isfinite(lv).all()
    hist = tg.train(sweep, d, log=lambda m: None)
    assert hist[-20:].mean() < 0.8 * hist[:5].mean()
    xs = tg.sample(sweep, tg.Diffusion(cfg.T, 20), 33)
    assert xs.shape == (2, 33, 2) and torch.isfinite(xs).all()


def test_gmm_index_recovers_oracle_index():
    c, std = tg.grid_centres(16), 0.05
    g = torch.Generator().manual_seed(0)
    x, k = tg.sample_gmm(c, std, 4000, g)
    pred = tg.gmm_predict(x, *tg.fit_gmm_index(x, 16))
    # the GMM's components are a permutation of the modes: map each to its majority mode
    mapping = {p: np.bincount(k[pred == p].numpy()).argmax() for p in pred.unique().tolist()}
    agree = np.mean([mapping[p] == t for p, t in zip(pred.tolist(), k.tolist())])
    assert agree >= 0.99 and len(set(mapping.values())) == 16


def test_unknown_variant_and_subcommand():
    with pytest.raises(SystemExit, match="unknown variant 'label'"):
        tg.Sweep(tg.Config(variants=["oracle", "label"]), torch.device("cpu"))
    with pytest.raises(SystemExit, match="unknown sub-command"):
        tg.main(["plot"])
    with pytest.raises(SystemExit, match="perfect square"):
        tg.main(["--modes=4,10"])


def test_command_line_end_to_end(tmp_path):
    p = run_script([os.path.join(ROOT, "toy_gmm.py"), "--modes=4", "--steps=30", "--batch_size=128",
                    "--width=16", "--n_eval=400", "--sample_steps=10", "--run=t"], cwd=tmp_path, timeout=300)
    run = tmp_path / "runs" / "toy_gmm-t"
    res = json.load(open(run / "results.json"))
    assert set(res["4"]) == {"baseline", "uncond", "oracle", "gmm", "disco"}
    assert all(np.isfinite(res["4"][v]["kde_kl"]) for v in res["4"])
    for f in ("samples.png", "kl_vs_modes.png", "vector_field.png", "config.json", "log.txt"):
        assert (run / f).is_file()
    assert "KDE-KL" in p.stdout


def test_ensemble_is_independent_mlps_and_soft_one_hot_is_the_lookup():
    """The batched ensemble equals E separate 4-layer MLPs written out here, a member's loss
    reaches only its own weights, and a one-hot DisCo soft index gives the hard lookup."""
    torch.manual_seed(0)
    E, K, W, B = 3, 5, 8, 7
    net = tg.EnsembleMLP(E, K, W)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)                          # l4 starts at zero: randomise all
    net.cond_mask[1] = 0                                           # member 1 is unconditional
    x, t, k = torch.randn(E, B, 2), torch.randint(1000, (E, B)), torch.randint(K, (E, B))
    out = net(x, t, k)
    silu = lambda z: z * torch.sigmoid(z)
    for e in range(E):
        half = torch.arange(32)                                    # sinusoid: cos then sin, 32 freqs
        a = t[e, :, None].float() * torch.exp(-math.log(10000) * half / 32)
        h = torch.cat([x[e], torch.cos(a), torch.sin(a)], 1) @ net.l1.w[e] + net.l1.b[e]
        h = h + (net.index_table[e, k[e]] if e != 1 else 0)
        for lin in (net.l2, net.l3):
            h = silu(h) @ lin.w[e] + lin.b[e]
        torch.testing.assert_close(out[e], silu(h) @ net.l4.w[e] + net.l4.b[e], rtol=1e-4, atol=1e-4)
    out[2].sum().backward()
    assert net.l2.w.grad[:2].abs().max() == 0 and net.l2.w.grad[2].abs().max() > 0
    assert net.index_table.grad[:2].abs().max() == 0
    soft = {2: torch.nn.functional.one_hot(k[2].clamp(max=3), 4).float()}   # member 2 with N = 4
    k2 = k.clone()
    k2[2] = k[2].clamp(max=3)
    torch.testing.assert_close(net(x, t, k, soft), net(x, t, k2))


def test_train_flops_counted_by_hand():
    cfg = tg.Config(modes=[4, 16], variants=["uncond", "disco"], width=32)
    sweep = tg.Sweep(cfg, torch.device("cpu"))
    # forward 2 x multiply-adds, backward twice that, but no input gradient for a first layer
    mlp = 2 * (2 * 66 * 32 + 3 * (32 * 32 + 32 * 32 + 32 * 4))       # x + sinusoid -> W -> W -> W -> 4
    disco = sum(2 * (2 * 2 * 64 + 3 * (64 * 64 + 64 * n + n * 32)) for n in (4, 16))  # encoder, soft @ table
    assert sweep.train_flops_per_sample() == 4 * mlp + disco


def test_compiled_forward_loss_matches_eager():
    import dataclasses
    cfg = tg.Config(modes=[4], variants=["oracle", "disco"], width=16, batch_size=64)
    torch.manual_seed(0)
    eager = tg.Sweep(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    comp = tg.Sweep(dataclasses.replace(cfg, compile=True), torch.device("cpu"))
    d = tg.Diffusion(cfg.T)
    x0, k = eager.batch(64)
    i = torch.randint(len(d), (2, 64))
    eps = torch.randn_like(x0)
    xt = d.q_sample(x0, i, eps)
    soft = {e: s.detach() for e, s in eager.soft_index(x0, 1.0).items()}
    losses = []
    for sw in (eager, comp):
        ls, lv = sw.forward_loss(sw.net, d, x0, xt, i, eps, d.timesteps[i], k, soft)
        (ls + lv).sum().backward()
        losses.append(torch.stack([ls, lv]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager.net.l2.w.grad, comp.net.l2.w.grad, rtol=1e-3, atol=1e-5)


def test_nan_loss_is_one_clear_line():
    cfg = tg.Config(modes=[4], variants=["oracle"], steps=30, batch_size=64, width=16, lr=1e30, warmup=1,
                    log_every=10)
    sweep = tg.Sweep(cfg, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"loss became \[nan\] by step \d+; lower --lr"):
        tg.train(sweep, tg.Diffusion(cfg.T), log=lambda m: None)


def test_nan_weights_after_the_last_update_is_one_clear_line():
    # one step: its loss is computed before the update (finite); the update itself overflows
    cfg = tg.Config(modes=[4], variants=["oracle"], steps=1, batch_size=64, width=16, lr=1e39, warmup=1)
    sweep = tg.Sweep(cfg, torch.device("cpu"))
    with pytest.raises(SystemExit, match="weights became NaN or inf in the last update; lower --lr"):
        tg.train(sweep, tg.Diffusion(cfg.T), log=lambda m: None)
