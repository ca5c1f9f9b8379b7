"""Tests for dit.py: official DiT names and shapes, zero init, classifier-free guidance, the
diffusion formulas against closed forms, composition, resume, torchrun, sharded sampling and
bad input. CPU, tiny models."""
import json, math, os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from conftest import (ROOT, assert_same_optimizer_state, authors_ditsem, official_shapes, reference_ditsem,
                      run_script, torchrun, write_accelerate_run)
import authors, dit
import utils

TINY = ["--model", "DiT-toy/4", "--image_size", "8", "--batch_size", "8", "--sample_steps", "4",
        "--diffusion_steps", "100", "--ckpt_every", "2", "--log_every", "1"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One BLAS thread: the shared 2-core test machine is much faster that way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)


def make_set(path, n=64, L=8, V=16, rows=None, emb=True):
    """A small synthetic DLC set row-aligned with utils.load_embedded('shapes', n=64)."""
    data = {"name": "shapes", "n": n, "size": 32, "seed": 0}
    attrs = utils.load_embedded(**data)["attrs"].numpy()
    codes = (attrs[:, [0, 1, 2, 0, 1, 2, 0, 1][:L]] * 3 + np.arange(L)) % V
    rows = rows or n
    extra = {"embeddings.npy": np.random.RandomState(0).randn(rows, 6).astype(np.float16)} if emb else None
    utils.save_dlc_set(str(path), codes[:rows], {"L": L, "V": V, "data": data}, extra=extra)
    return str(path)


def test_official_keys_and_shapes_xl2_meta():
    with torch.device("meta"):
        m = dit.DiT("DiT-XL/2", 32, 4, "label", num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == official_shapes(28, 1152, 2)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 675) < 1      # DiT paper: 675M


def test_official_state_dict_loads(capsys):
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in official_shapes(12, 384, 8).items()}  # DiT-S/8 official format
    label = dit.DiT("DiT-S/8", 32, 4, "label", num_classes=1000)
    dit.load_official(label, sd)                                               # strict
    assert torch.equal(label.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    m = dit.DiT("DiT-S/8", 32, 4, "dlc", L=8, V=16)
    missing, skipped = dit.load_official(m, sd)
    assert missing == ["sem_embedder.embedding_table"] and skipped == ["y_embedder.embedding_table.weight"]
    assert "sem_embedder.embedding_table" in capsys.readouterr().out                  # reported
    assert torch.equal(m.final_layer.linear.weight, sd["final_layer.linear.weight"])
    sd.pop("blocks.0.mlp.fc1.bias")
    with pytest.raises(SystemExit):
        dit.load_official(m, sd)


def randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("cond", ["dlc", "label", "embedding", "none"])
def test_zero_output_at_init(cond):
    m = dit.DiT("DiT-toy/2", 8, 3, cond, num_classes=4, L=8, V=16, emb_dim=6)
    y = {"dlc": torch.randint(0, 16, (2, 8)), "label": torch.tensor([0, 3]), "embedding": torch.randn(2, 6), "none": None}[cond]
    out = m(torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), y)
    assert out.shape == (2, 6, 8, 8) and out.abs().max() == 0


def test_cfg_scale_one_and_channels():
    m = randomised(dit.DiT("DiT-toy/2", 8, 3, "dlc", L=8, V=16))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900]), torch.randint(0, 16, (3, 8))
    cond, uncond = m(x, t, y), m(x, t, y, torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(m.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5)
    g = m.forward_with_cfg(x, t, y, 3.0, channels=2)
    assert torch.allclose(g[:, :2], uncond[:, :2] + 3 * (cond[:, :2] - uncond[:, :2]), rtol=1e-3, atol=1e-3)
    assert torch.allclose(g[:, 2:], cond[:, 2:], atol=1e-5)                  # channel 2 and variances untouched
    assert not torch.allclose(g[:, :2], cond[:, :2], atol=1e-3)
    gi = m.forward_with_cfg(x, t, y, 3.0, channels=3, interval=[0.0, 0.6], T=1000)
    assert torch.allclose(gi[2], cond[2], atol=1e-5) and not torch.allclose(gi[:2, :3], cond[:2, :3], atol=1e-3)


def test_dlc_embedder_drop_and_average():
    e = dit.DLCEmbedder(4, 5, 7)
    codes = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])
    out = e(codes, torch.tensor([False, True]))
    assert torch.allclose(out[0], torch.stack([e.embedding_table[l, codes[0, l]] for l in range(4)]).mean(0))
    assert torch.allclose(out[1], e.embedding_table[:, 5].mean(0))          # index V = drop token everywhere


def test_dlc_pool_sum_is_the_toy_default_mean_for_imagenet_and_old_checkpoints():
    """pool = sum: the condition is sum_l E[l, c_l] (the drop token summed the same way; soft SEM
    by its probabilities). The toy config sums, the imagenet preset averages as the paper and
    the authors do, and model_args without dlc_pool (checkpoints saved before it, converted
    authors' checkpoints) build the average."""
    L, V, D = 4, 5, 7
    e = dit.DLCEmbedder(L, V, D, pool="sum")
    codes, drop = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]]), torch.tensor([False, True])
    out = e(codes, drop)
    torch.testing.assert_close(out[0], sum(e.embedding_table[l, codes[0, l]] for l in range(L)))
    torch.testing.assert_close(out[1], e.embedding_table[:, V].sum(0))
    torch.testing.assert_close(e(F.one_hot(codes, V).float(), drop), out)
    info = {"num_classes": 0, "L": L, "V": V, "emb_dim": 0}
    for argv, scale in (([], L), (["--preset", "imagenet", "--model", "DiT-toy/4"], 1)):
        cfg = utils.parse_config(dit.Config, argv, dit.PRESETS)
        assert dit.DiT(**dit.model_args(cfg, info, 3, 8)).sem_embedder.scale == scale
    assert dit.DiT("DiT-toy/4", 8, 3, "dlc", L=L, V=V).sem_embedder.scale == 1
    with pytest.raises(SystemExit, match="--dlc_pool must be mean or sum"):
        dit.DLCEmbedder(L, V, D, pool="max")


def test_label_init_std_is_the_toy_default_002_for_imagenet_and_old_checkpoints():
    """The label table starts N(0, label_std^2): 1.0 in the toy (a row as large as the timestep
    embedding; with DiT's 0.02 the label model drew the requested shape in 0.63 of samples after
    2000 steps, 0.78 with 1.0), DiT's 0.02 in the imagenet preset and for checkpoints saved
    without the key."""
    torch.manual_seed(0)
    info = {"num_classes": 50, "L": 0, "V": 0, "emb_dim": 0}
    for argv, std in (([], 1.0), (["--preset", "imagenet", "--model", "DiT-toy/4"], 0.02)):
        cfg = utils.parse_config(dit.Config, argv + ["--cond", "label"], dit.PRESETS)
        w = dit.DiT(**dit.model_args(cfg, info, 3, 8)).y_embedder.embedding_table.weight
        assert abs(w.std().item() - std) < 0.1 * std                 # 51 x 128 draws: within 10%
    old = dit.DiT("DiT-toy/4", 8, 3, "label", num_classes=50).y_embedder.embedding_table.weight
    assert abs(old.std().item() - 0.02) < 0.002


def check_bayes_posterior(D, steps):
    """q(x_{t-1} | x_t, x_0) by Bayes: N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) N(x_t; sqrt(a_t) x_{t-1}, beta_t)."""
    for s in steps:
        x0, xt = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        a, b, abp = 1 - D.betas[s], D.betas[s], D.abar[s - 1]
        var = 1 / (1 / (1 - abp) + a / b)
        mean = var * (math.sqrt(abp) * x0 / (1 - abp) + math.sqrt(a) * xt / b)
        m, v, _ = D.q_posterior(x0, xt, torch.full((5,), s))
        assert torch.allclose(m, mean) and torch.allclose(v, torch.full_like(v, var))


def test_diffusion_closed_forms():
    D = dit.GaussianDiffusion.linear(1000)
    assert np.isclose(D.betas[0], 1e-4) and np.isclose(D.betas[-1], 0.02)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 300)
    xt = D.q_sample(x0, t, torch.randn_like(x0))
    ab = D.abar[300]
    assert abs(xt.mean() - math.sqrt(ab) * 0.7) < 0.02 and abs(xt.var() - (1 - ab)) < 0.02
    check_bayes_posterior(D, [1, 50, 999])
    # KL of identical Gaussians is 0; against the closed form otherwise
    mu, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert dit.normal_kl(mu, lv, mu, lv).abs().max() < 1e-12
    kl = dit.normal_kl(torch.tensor(0.), torch.tensor(0.), torch.tensor(1.), torch.tensor(math.log(4)))
    assert abs(kl - (math.log(2) + (1 + 1) / 8 - 0.5)) < 1e-6


def test_vlb_at_t0_is_decoder_nll():
    D = dit.GaussianDiffusion.linear(1000)
    x0 = torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    xt = x0 + 0.01
    out = torch.cat([torch.full_like(x0, 0.3), torch.full_like(x0, -0.5)], 1)    # (eps, v)
    t = torch.zeros(1, dtype=torch.long)
    mean, logvar, _, _ = D.p_mean_variance(out, xt, t)
    sd = math.exp(0.5 * logvar.flatten()[0].item())
    ref = []
    for x, m in zip(x0.flatten().tolist(), mean.flatten().tolist()):
        hi = 1.0 if x > 0.999 else norm.cdf((x + 1 / 255 - m) / sd)
        lo = 0.0 if x < -0.999 else norm.cdf((x - 1 / 255 - m) / sd)
        ref.append(-math.log(hi - lo) / math.log(2))
    assert abs(D.vb_terms(out, x0, xt, t).item() - np.mean(ref)) < 1e-6
    t1 = torch.ones(1, dtype=torch.long)                                      # t > 0: a KL, not the NLL
    assert D.vb_terms(out, x0, xt, t1).item() >= 0


def test_respacing_keeps_alpha_bar():
    D = dit.GaussianDiffusion.linear(1000)
    R = D.respace(250)
    keep = R.timestep_map.numpy()
    assert R.T == 250 and keep[0] == 0 and keep[-1] == 999 and len(set(keep)) == 250
    assert np.allclose(R.abar, D.abar[keep], rtol=1e-12)


def test_cosine_schedule_closed_form():
    """IDDPM eq. 17: abar_t = f(t) / f(0) with f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), as long as
    no beta is clipped; the posterior is still the Bayes posterior under these betas."""
    T, s = 1000, 0.008
    D = dit.GaussianDiffusion.cosine(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    clipped = D.betas >= 0.999
    assert clipped.sum() <= 2 and clipped[-1]                                  # only at the very end
    for t in [0, 10, 250, 500, 900, 990]:
        assert abs(D.abar[t] - f(t + 1) / f(0)) < 1e-12                         # chain step t = time t+1
    assert np.all(np.diff(D.abar) < 0) and 0 < D.abar[-1] < 1e-4
    check_bayes_posterior(D, [1, 300, 998])
    with pytest.raises(SystemExit, match="schedule"):
        dit.GaussianDiffusion.make("quadratic")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampler_with_exact_epsilon_recovers_gaussian_data(schedule):
    """Data x0 ~ N(m, s^2): the exact epsilon is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) /
    (ab s^2 + 1 - ab). Ancestral sampling over the full chain, with either end of the learned
    variance range (v = -1: posterior variance, v = +1: beta_t), and DDIM, driven by it, must give
    back N(m, s^2) under either schedule (a wrong alpha-bar anywhere in the chain shifts both)."""
    m, s, n = 0.4, 0.3, 10000
    D = dit.GaussianDiffusion.make(schedule, 1000)
    for v in (-1.0, 1.0):
        def model_fn(x, t):
            ab = float(D.abar[int(t[0])])                                    # one timestep per call
            eps = math.sqrt(1 - ab) * (x - math.sqrt(ab) * m) / (ab * s * s + 1 - ab)
            return torch.cat([eps, torch.full_like(x, v)], 1)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        for ddim in (False, True):
            x = D.sample(model_fn, noise, lambda i: torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64),
                         clip=False, ddim=ddim)
            assert abs(x.mean() - m) < 0.015 and abs(x.std() - s) < 0.01, (schedule, v, ddim, x.mean(), x.std())


def test_composition_tokens():
    a, b = torch.arange(32), torch.arange(32) + 100                            # all positions differ
    c = dit.compose_codes(a, b, 200, 0.5, torch.Generator().manual_seed(0))
    from_a = c == a
    assert ((c == a) | (c == b)).all() and (c != 500).all()                  # only source tokens, never V
    assert abs(from_a.float().mean() - 0.5) < 0.03
    assert dit.compose_codes(a, b, 10, 1.0, torch.Generator()).eq(a).all()


def test_pick_pairs():
    at = utils.make_shapes(500, split="train")["attrs"].numpy()
    pairs, t = dit.pick_pairs(at, "differ", 20)
    assert t is None and len(pairs) == 20 and all((at[a] != at[b]).all() for a, b in pairs)
    pairs, t = dit.pick_pairs(at, "heldout", 12)
    names = list(utils.COLOURS)
    held = {(utils.SHAPES.index(s), names.index(c), names.index(b)) for s, c, b in utils.HELD_OUT}
    assert {tuple(h) for h in t.tolist()} == held                       # every held-out combination, twice
    for (a, b), h in zip(pairs, t):
        assert (at[a] != at[b]).all() and ((h == at[a]) | (h == at[b])).all()
        assert not (h == at[a]).all() and not (h == at[b]).all()      # a recombination, not a source
    with pytest.raises(SystemExit, match="found only"):
        dit.pick_pairs(at[:2], "differ", 5)


def test_train_resume_sample_compose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = make_set(tmp_path / "set")
    base = ["--cond", "dlc", "--dlc", s, *TINY]
    dit.main(["train", *base, "--steps", "4", "--run", "full"])
    dit.main(["train", *base, "--steps", "2", "--run", "half"])
    dit.main(["train", *base, "--steps", "4", "--run", "half", "--resume"])
    a = torch.load("runs/dit-full/checkpoints/ckpt_0000004.pt", weights_only=True)
    b = torch.load("runs/dit-half/checkpoints/ckpt_0000004.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k
    assert_same_optimizer_state(a["opt"], b["opt"])
    log = open("runs/dit-full/log.txt").read()
    assert log.count("| loss ") == 4 and "ms/step" in log and os.path.isfile("runs/dit-full/samples_0000004.png")
    # the CFG flags reach the network in both sample and compose
    seen = []
    orig = dit.DiT.forward_with_cfg
    def spy(self, x, t, y, scale, channels=3, interval=None, T=1000):
        seen.append((scale, channels, tuple(interval or ())))
        return orig(self, x, t, y, scale, channels, interval, T)
    monkeypatch.setattr(dit.DiT, "forward_with_cfg", spy)
    flags = ["--cfg_scale", "2.5", "--cfg_channels", "2", "--cfg_interval", "0,0.5", "--diffusion_steps", "100"]
    dit.main(["sample", "--ckpt", "runs/dit-full", "--dlc", s, "--n", "3", "--sample_steps", "4", "--out", "s.npz", *flags])
    assert len(seen) == 4 and set(seen) == {(2.5, 2, (0.0, 0.5))}
    z = np.load("s.npz")
    assert z["arr_0"].shape == (3, 8, 8, 3) and z["arr_0"].dtype == np.uint8 and os.path.isfile("s.png")
    assert np.array_equal(z["codes"], np.load(os.path.join(s, "codes.npy"))[:3])
    dit.main(["train", "--cond", "embedding", "--dlc", s, *TINY, "--steps", "1", "--run", "emb"])
    seen.clear()
    dit.main(["compose", "--ckpt", "runs/dit-full", "--emb_ckpt", "runs/dit-emb", "--dlc", s, "--pairs", "0:1,2:3",
              "--n_per_pair", "2", "--sample_steps", "3", "--out", "c.npz", *flags])
    assert len(seen) == 2 * 4 * 3 and set(seen) == {(2.5, 2, (0.0, 0.5))}
    c = np.load("c.npz")
    assert c["arr_0"].shape == (4, 8, 8, 3) and c["codes"].shape == (4, 8) and os.path.isfile("c.png")


@pytest.mark.parametrize("cond", ["label", "none"])
def test_train_baselines(tmp_path, monkeypatch, cond):
    monkeypatch.chdir(tmp_path)
    dit.main(["train", "--cond", cond, "--data", "shapes", "--data_n", "64", *TINY, "--steps", "1", "--run", cond])
    dit.main(["sample", "--ckpt", f"runs/dit-{cond}", "--n", "2", "--sample_steps", "2", "--diffusion_steps", "100",
              "--labels", "1,3", "--out", "s.npz"])
    z = np.load("s.npz")
    assert z["arr_0"].shape == (2, 8, 8, 3) and (cond != "label" or list(z["labels"]) == [1, 3])


def test_torchrun_train_and_sharded_sampling(tmp_path):
    s = make_set(tmp_path / "set")
    script = os.path.join(ROOT, "dit.py")   # "--" below: torchrun's argparse takes --run / --n as abbreviations of its own options
    torchrun([script, "--", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "2", "--run", "ddp"], cwd=tmp_path)
    log = open(tmp_path / "runs/dit-ddp/log.txt").read()
    assert "world=2" in log and log.count("| loss ") == 2
    args = ["sample", "--ckpt", str(tmp_path / "runs/dit-ddp"), "--dlc", s, "--n", "5", "--sample_steps", "3",
            "--diffusion_steps", "100", "--cfg_scale", "2", "--batch_size", "2"]
    torchrun([script, "--", *args, "--out", str(tmp_path / "sharded.npz")], cwd=tmp_path)
    dit.main([*args, "--out", str(tmp_path / "single.npz"), "--batch_size", "5"])
    a, b = np.load(tmp_path / "sharded.npz"), np.load(tmp_path / "single.npz")
    assert np.array_equal(a["codes"], b["codes"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1   # float batch effects only


def test_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = make_set(tmp_path / "short", rows=50)                              # 64 images, 50 codes
    with pytest.raises(SystemExit, match="row-aligned"):
        dit.main(["train", "--cond", "dlc", "--dlc", short, *TINY, "--steps", "1", "--run", "bad"])
    assert not os.path.exists("runs")
    good = make_set(tmp_path / "good")
    dit.main(["train", "--cond", "dlc", "--dlc", good, *TINY, "--steps", "1", "--run", "ok"])
    other = make_set(tmp_path / "other", L=4, V=16)
    with pytest.raises(SystemExit, match="L=4"):
        dit.main(["sample", "--ckpt", "runs/dit-ok", "--dlc", other, "--n", "2", "--out", "x.npz"])
    other_v = make_set(tmp_path / "otherv", V=32)
    with pytest.raises(SystemExit, match="V=32"):
        dit.main(["compose", "--ckpt", "runs/dit-ok", "--dlc", other_v, "--out", "y.npz"])
    os.makedirs("imgs/cls")
    p = run_script([os.path.join(ROOT, "dit.py"), "extract", "--data_path", "imgs", "--vae", "no/such/vae",
                    "--latents", "lat"], cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "--vae" in p.stderr
    assert not any(os.path.exists(f) for f in ["x.npz", "y.npz", "x.png", "lat"])


def test_extract_and_latent_sampling_with_a_tiny_vae(tmp_path, monkeypatch):
    """The paper path end to end on a randomly initialised diffusers AutoencoderKL of the SD-VAE's
    layout (4 blocks: /8 downsampling, 4 latent channels), saved in the diffusers folder format:
    extract writes scaled latents of the centre crop and of its flip, training reads them, and
    sampling decodes through the VAE."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32).eval()
    with torch.no_grad():  # posterior std ~ e^-15: the stored "sample" is then the mean, checkable exactly
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30.0
    vae.save_pretrained("vae")
    rng = np.random.RandomState(0)
    raw = {}
    for c in ("a", "b"):
        os.makedirs(f"imgs/{c}")
        for i in range(3):
            raw[(c, i)] = rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(raw[(c, i)]).save(f"imgs/{c}/{i}.png")
    dit.main(["extract", "--data_path", "imgs", "--vae", "vae", "--latents", "lat", "--image_size", "32",
              "--batch_size", "4"])
    lat = np.load("lat/latents.npy")
    assert lat.shape == (6, 2, 4, 4, 4) and lat.dtype == np.float16
    assert np.load("lat/labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    # the stored latent is 0.18215 x the VAE posterior (here its mean) of the ADM-style centre crop
    # (index 0) and of its mirror image (index 1)
    from torchvision import transforms
    crop = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    x = crop(Image.fromarray(raw[("b", 1)]))[None] * 2 - 1
    for f, im in enumerate((x, x.flip(-1))):
        with torch.no_grad():
            mean = vae.encode(im).latent_dist.mean[0]
        z = torch.from_numpy(lat[4, f].astype(np.float32))
        assert torch.allclose(z, 0.18215 * mean, rtol=2e-3, atol=2e-3), (f, (z - 0.18215 * mean).abs().max())
    assert not np.allclose(lat[4, 0], lat[4, 1])
    dit.main(["train", "--latents", "lat", "--cond", "label", "--model", "DiT-toy/2", "--steps", "2",
              "--batch_size", "4", "--diffusion_steps", "100", "--ckpt_every", "2", "--run", "lat"])
    dit.main(["sample", "--ckpt", "runs/dit-lat", "--vae", "vae", "--n", "3", "--sample_steps", "2",
              "--diffusion_steps", "100", "--out", "s.npz"])
    s = np.load("s.npz")
    assert s["arr_0"].shape == (3, 32, 32, 3) and s["arr_0"].dtype == np.uint8 and s["labels"].tolist() == [0, 1, 0]


def test_ema_warms_up(tmp_path, monkeypatch):
    """The EMA decay is min(ema, (1 + step) / (10 + step)): 0.1 after the first step, so the EMA is
    already 90% the trained weights and not the zero-output init (whose samples are noise)."""
    monkeypatch.chdir(tmp_path)
    s = make_set(tmp_path / "set")
    dit.main(["train", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "2", "--ckpt_every", "1", "--run", "w"])
    one = torch.load("runs/dit-w/checkpoints/ckpt_0000001.pt", weights_only=True)
    two = torch.load("runs/dit-w/checkpoints/ckpt_0000002.pt", weights_only=True)
    torch.manual_seed(0)                                                    # train's init
    init = dit.DiT(**one["model_args"]).state_dict()
    for k in one["model"]:
        assert torch.allclose(one["ema"][k], 0.1 * init[k] + 0.9 * one["model"][k], atol=1e-6), k
        d = 2 / 11                                                          # step 1: (1 + 1) / (10 + 1)
        assert torch.allclose(two["ema"][k], d * one["ema"][k] + (1 - d) * two["model"][k], atol=1e-6), k
    moved = [k for k in one["model"] if not torch.equal(one["model"][k], init[k])]
    assert moved                                                            # the check is not vacuous


def test_extract_refuses_a_used_folder_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    """extract checks --latents before any work; an interrupted extraction keeps its finished
    batches and the next run does only the rest, giving the same latents as one run."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32).eval()
    with torch.no_grad():  # posterior std ~ e^-15: latents are the (deterministic) mean
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30.0
    vae.save_pretrained("vae")
    rng = np.random.RandomState(0)
    for i in range(5):
        os.makedirs(f"imgs/c{i % 2}", exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"imgs/c{i % 2}/{i}.png")
    calls, real = [], dit.vae_decoder
    def counting(cfg, device, fail_after=None):
        v, dec = real(cfg, device)
        enc = v.encode
        def encode(x):
            calls.append(len(x))
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt                                    # the user's Ctrl-C mid-run
            return enc(x)
        v.encode = encode
        return v, dec
    args = ["extract", "--data_path", "imgs", "--vae", "vae", "--image_size", "32", "--batch_size", "2"]
    # a folder that holds something else: refused before the VAE encodes anything, left as it was
    os.makedirs("mine")
    open("mine/notes.txt", "w").write("keep me")
    monkeypatch.setattr(dit, "vae_decoder", counting)
    with pytest.raises(SystemExit, match="did not write"):
        dit.main([*args, "--latents", "mine"])
    assert calls == [] and os.listdir("mine") == ["notes.txt"] and open("mine/notes.txt").read() == "keep me"
    dit.main([*args, "--latents", "whole"])
    # interrupted after 2 batches (4 images x 2 flips): those are kept, the re-run encodes only the last one
    calls.clear()
    monkeypatch.setattr(dit, "vae_decoder", lambda cfg, dev: counting(cfg, dev, fail_after=4))
    with pytest.raises(KeyboardInterrupt):
        dit.main([*args, "--latents", "lat"])
    assert json.load(open("lat/progress.json"))["done"] == 4
    with pytest.raises(SystemExit, match="not a finished extraction"):
        dit.main(["train", "--latents", "lat", "--cond", "label", "--model", "DiT-toy/2", "--steps", "1"])
    calls.clear()
    monkeypatch.setattr(dit, "vae_decoder", counting)
    dit.main([*args, "--latents", "lat"])
    assert calls == [1, 1] and not os.path.exists("lat/progress.json")
    np.testing.assert_allclose(np.load("lat/latents.npy").astype(np.float32),
                               np.load("whole/latents.npy").astype(np.float32), atol=1e-3)
    assert np.load("lat/labels.npy").tolist() == np.load("whole/labels.npy").tolist() == [0, 0, 0, 1, 1]
    # a finished folder is never overwritten
    before = os.path.getmtime("lat/latents.npy")
    calls.clear()
    with pytest.raises(SystemExit, match="finished latents"):
        dit.main([*args, "--latents", "lat"])
    assert calls == [] and os.path.getmtime("lat/latents.npy") == before
#################################################################################
#  The authors' DiT (converted by authors.py): GELU, schedule, VAE; soft SEM    #
#################################################################################


def test_gelu_exact_is_the_toy_default_tanh_for_imagenet_authors_and_old_checkpoints(tmp_path, monkeypatch):
    """--gelu exact (the toy) is x Phi(x) with the erf, tanh DiT's approximation: each model equals
    the written-out forward with its GELU and not with the other one. The imagenet preset, the
    authors' converted models and checkpoints saved without the key build tanh; resuming a run with
    the other GELU stops with one line."""
    sd = authors_ditsem(seed=0)
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 3]), torch.randint(0, 10, (3, 6), generator=g)
    for gelu, approx, other in (("exact", "none", "tanh"), ("tanh", "tanh", "none")):
        m = dit.DiT("DiT-toy/2", 8, 4, "dlc", L=6, V=10, gelu=gelu).eval()
        m.load_state_dict(sd)
        with torch.no_grad():
            out = m(x, t, y)
            torch.testing.assert_close(out, reference_ditsem(sd, x, t, y, 4, approximate=approx), atol=1e-5, rtol=1e-5)
            assert (out - reference_ditsem(sd, x, t, y, 4, approximate=other)).abs().max() > 1e-4
    info = {"num_classes": 0, "L": 6, "V": 10, "emb_dim": 0}
    for argv, want in (([], "exact"), (["--preset", "imagenet", "--model", "DiT-toy/4"], "tanh")):
        cfg = utils.parse_config(dit.Config, argv, dit.PRESETS)
        assert dit.DiT(**dit.model_args(cfg, info, 3, 8)).blocks[0].mlp.approximate == {"exact": "none", "tanh": "tanh"}[want]
    assert dit.DiT("DiT-toy/4", 8, 3, "none").blocks[0].mlp.approximate == "tanh"      # model_args without gelu
    with pytest.raises(SystemExit, match="unknown --gelu"):
        dit.DiT("DiT-toy/4", 8, 3, "none", gelu="relu")
    monkeypatch.chdir(tmp_path)
    s = make_set(tmp_path / "set")
    dit.main(["train", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "2", "--run", "r", "--gelu", "tanh"])
    with pytest.raises(SystemExit) as e:
        dit.main(["train", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "4", "--run", "r", "--resume"])
    assert "--gelu tanh" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir("runs/dit-r/checkpoints")) == ["ckpt_0000002.pt"]


def test_compose_pairs_of_a_latent_model_decodes_through_the_vae(tmp_path, monkeypatch):
    """compose --pairs with a latent (4-channel) DiT writes images decoded by the SD-VAE, as sample
    and compose --images do, not the raw latents."""
    ema = authors_ditsem(seed=0)
    ck = write_accelerate_run(tmp_path / "run", ema, ema, {"model": "DiTSEM-toy/2", "L": 6, "V": 10, "image_size": 64})
    out = str(tmp_path / "ours.pt")
    authors.main(["dit", "--authors", str(ck), "--out", out])
    codes = np.random.RandomState(0).randint(0, 10, (4, 6))
    utils.save_dlc_set(str(tmp_path / "set"), codes, {"L": 6, "V": 10})
    decoded = []
    def fake_vae(cfg, device):                             # latents (B, 4, 8, 8) -> images (B, 3, 64, 64)
        def decode(z):
            decoded.append(tuple(z.shape))
            return F.interpolate(z[:, :3].clamp(-1, 1), scale_factor=8)
        return None, decode
    monkeypatch.setattr(dit, "vae_decoder", fake_vae)
    dit.main(["compose", "--ckpt", out, "--dlc", str(tmp_path / "set"), "--pairs", "0:1,2:3", "--n_per_pair", "2",
              "--sample_steps", "2", "--vae", "vae", "--out", str(tmp_path / "c.npz")])
    z = np.load(tmp_path / "c.npz")
    assert z["arr_0"].shape == (4, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    assert decoded and all(s[1:] == (4, 8, 8) for s in decoded)
    assert float(z["cfg_scale"]) == 1.0                    # recorded, as `sample` does
    # a checkpoint converted when convert still recorded the toy's cosine schedule samples on the linear one
    state = utils.load_checkpoint(out)
    state["config"]["schedule"] = "cosine"
    np.testing.assert_array_equal(dit.trained_diffusion(state).abar, dit.GaussianDiffusion.linear(1000).abar)


def test_compose_images_runs_on_the_schedule_the_model_trained_on(tmp_path, monkeypatch):
    """compose --images respaces the model's own schedule (the toy's cosine here), as --pairs does."""
    monkeypatch.chdir(tmp_path)
    s = make_set(tmp_path / "set", L=4, V=8)
    dit.main(["train", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "1", "--run", "c"])
    model, state = dit.load_for_sampling("runs/dit-c", torch.device("cpu"))
    assert state["config"]["schedule"] == "cosine"
    monkeypatch.setattr(dit, "encode_image_files", lambda cfg, L, V: (torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), None))
    used = []
    real_respace = dit.GaussianDiffusion.respace
    monkeypatch.setattr(dit.GaussianDiffusion, "respace", lambda self, n: used.append(self.abar) or real_respace(self, n))
    cfg = utils.parse_config(dit.ComposeConfig, ["--images", "a.png", "b.png", "--n_per_pair", "2", "--sample_steps", "2",
                                                 "--cfg_scale", "2", "--out", "m.npz"])
    dit.compose_images(cfg, model, state, torch.device("cpu"))
    np.testing.assert_array_equal(used[-1], dit.GaussianDiffusion.cosine(state["config"]["diffusion_steps"]).abar)
    assert float(np.load("m.npz")["cfg_scale"]) == 2.0


def test_soft_sem_embedding_agrees_with_theirs():
    e = dit.DLCEmbedder(4, 5, 7)
    assert torch.equal(e.embedding_table[:, 5], e.embedding_table[:1, 5].expand(4, 7))   # one shared drop vector at init
    with torch.no_grad():
        e.embedding_table.add_(torch.randn_like(e.embedding_table))          # trained: rows differ
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 4, 5, generator=g), -1)
    padded = torch.cat([p, torch.zeros(3, 4, 1)], -1)                        # their zero drop-token column
    theirs = (padded.transpose(0, 1) @ e.embedding_table).mean(0)
    drop = torch.tensor([False, True, False])
    out = e(p, drop)
    torch.testing.assert_close(out[0::2], theirs[0::2])
    torch.testing.assert_close(out[1], e.embedding_table[:, 5].mean(0))
    codes = torch.randint(0, 5, (3, 4), generator=g)                         # one-hot probabilities = the codes
    torch.testing.assert_close(e(F.one_hot(codes, 5).float(), drop), e(codes, drop))


def test_released_dit_keys_and_parameter_count_on_meta():
    with torch.device("meta"):
        m = dit.DiT("DiT-XL/2", 32, 4, "dlc", L=512, V=256)
    keys = set(official_shapes(28, 1152, 2)) - {"y_embedder.embedding_table.weight"} | {"sem_embedder.embedding_table"}
    assert set(m.state_dict()) == keys and len(keys) == 292
    assert sum(p.numel() for p in m.parameters()) == 825_561_248                    # DiTSEM-XL/2 L512 V256


#################################################################################
#                 compose --images: encode (sem.py), mix N codes, decode        #
#################################################################################

def test_mixing_distribution_is_the_source_mean():
    codes = torch.tensor([[0, 1, 2], [0, 3, 2], [4, 3, 1]])                 # 3 sources, L = 3, V = 5
    mix = dit.mixing_distribution(codes, 5)
    assert torch.allclose(mix[0], torch.tensor([2, 0, 0, 0, 1.0], dtype=torch.float64) / 3)
    draws = dit.sample_mixed_codes(mix, 30000, torch.Generator().manual_seed(0))
    assert draws.shape == (30000, 3)
    freq = F.one_hot(draws, 5).double().mean(0)                             # (L, V)
    assert (freq - mix).abs().max() < 0.015 and (freq[mix == 0] == 0).all()
    soft = torch.softmax(torch.randn(3, 3, 5) / 1e-4, -1)                  # temperature -> 0: the one-hot mean again
    assert torch.allclose(dit.mixing_distribution(soft.argmax(-1), 5), dit.mixing_distribution(None, 5, soft), atol=1e-6)


def test_compose_image_files_end_to_end(tmp_path, monkeypatch):
    import dataclasses, sem
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(sem.Config(), L=4, V=8, size=16, patch=8, pos_grid=2, prototypes=16,
                              head_hidden=16, head_bottleneck=8)
    torch.manual_seed(0)
    st = sem.Student(cfg)
    utils.save_checkpoint({"model": st.state_dict(), "ema": st.state_dict(), "step": 0,
                           "config": dataclasses.asdict(cfg)}, str(tmp_path / "sem.pt"))
    s = make_set(tmp_path / "set", L=4, V=8)
    dit.main(["train", "--cond", "dlc", "--dlc", s, *TINY, "--steps", "1", "--run", "c"])
    rng = np.random.RandomState(0)
    names = [f"im{i}.png" for i in range(3)]
    for n in names:
        Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / n)
    base = [os.path.join(ROOT, "dit.py"), "compose", "--ckpt", "runs/dit-c", "--images", *names, "--sem_ckpt", "sem.pt",
            "--n_per_pair", "4", "--sample_steps", "2", "--diffusion_steps", "100", "--device", "cpu"]
    run_script([*base, "--out", "u.npz"], cwd=tmp_path)
    run_script([*base, "--out", "t.npz", "--temp", "0.5"], cwd=tmp_path)
    u, t = np.load(tmp_path / "u.npz"), np.load(tmp_path / "t.npz")
    assert u["arr_0"].shape == (4, 8, 8, 3) and u["sources"].shape == (3, 4) and os.path.isfile(tmp_path / "u.png")
    assert ((u["codes"][:, None] == u["sources"][None]).any(1)).all()       # every token from one of the 3 sources
    assert np.array_equal(u["sources"], t["sources"]) and t["codes"].max() < 8
    p = run_script([*base[:6], "missing.png", *base[8:], "--out", "x.npz"], cwd=tmp_path, check=False)
    assert p.returncode == 1 and "missing.png does not exist" in p.stderr and not os.path.exists(tmp_path / "x.npz")
