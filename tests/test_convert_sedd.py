"""`sedd.py convert`: a tiny SEDD in the authors' layouts (their training run folder and a Hugging
Face folder with the same tensor names), converted, against a reference forward written here from
the equations of their model (github.com/lavoiems/DiscreteLatentCode, sedd/model/transformer.py
and rotary.py); the released size's parameter count; bad input."""
import json, math, os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sedd
import utils

L, V, D, DEPTH, HEADS, COND = 6, 9, 32, 2, 4, 16


# ----------------------------------------------------------------------------- their layout
class _Weight(nn.Module):  # their LayerNorm / EmbeddingLayer: one parameter named `weight` / `embedding`
    def __init__(self, name, shape):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.randn(shape)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = _Weight("weight", D)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = _Weight("weight", D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))
        self.adaLN_modulation = nn.Linear(COND, 6 * D)


class _Final(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_final = _Weight("weight", D)
        self.linear = nn.Linear(D, V + 1)
        self.adaLN_modulation = nn.Linear(COND, 2 * D)


class AuthorsSEDD(nn.Module):
    """Only the module tree of their SEDD class, attributes in the order its __init__ sets them,
    so state_dict() has their key names and parameters() their order (the EMA's list order)."""
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_embed = _Weight("embedding", (V + 1, D))
        self.pos_embed = nn.Parameter(torch.randn(L, D))
        self.sigma_map = nn.Module()
        self.sigma_map.mlp = nn.Sequential(nn.Linear(256, COND), nn.SiLU(), nn.Linear(COND, COND))
        self.rotary_emb = nn.Module()
        d = D // HEADS
        self.rotary_emb.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        self.blocks = nn.ModuleList(_Block() for _ in range(DEPTH))
        self.output_layer = _Final()
        with torch.no_grad():  # every weight random and of order one, the adaLN ones included
            for n, p in self.named_parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.3 * torch.randn_like(p))


def authors_forward(sd, x, sigma, heads=HEADS, approximate="tanh"):
    """Their forward from its equations, in float32: h = E[x] + P; c = SiLU(MLP(sinusoid(sigma)));
    per block h += g1 * W_o Attn(rot(q), rot(k), v) on LN_w(h) (1 + scale1) + shift1 with q, k, v
    packed (three, heads, head_dim) and rotate-half rotary; h += g2 * MLP(LN_w(h) (1 + scale2) + shift2);
    out = W (LN_w(h) (1 + scale) + shift) + b - log(e^sigma - 1) - log V, 0 at the current token."""
    B, Dm = x.shape[0], sd["pos_embed"].shape[1]
    d = Dm // heads
    def lin(v, name, bias=True):
        return v @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)
    def ln(v, w):  # LayerNorm without bias, eps 1e-5, times its weight
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * w
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    c = F.silu(lin(F.silu(lin(torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1),
                              "sigma_map.mlp.0")), "sigma_map.mlp.2"))                # (B, cond)
    ang = torch.arange(L)[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))  # (L, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]  # (L, 1, d)
    def rot(q):  # q cos + rotate_half(q) sin, rotate_half(q) = (-q[d/2:], q[:d/2])
        return q * cos + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin
    h = sd["vocab_embed.embedding"][x] + sd["pos_embed"]                                # (B, L, D)
    for b in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{b}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(c, p + "adaLN_modulation")[:, None].chunk(6, -1)
        a = ln(h, sd[p + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = lin(a, p + "attn_qkv", bias=False).view(B, L, 3, heads, d)                # (B, L, 3, H, d)
        q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]                    # (B, L, H, d)
        w = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d), -1)
        o = torch.einsum("bhlm,bmhd->blhd", w, v).reshape(B, L, Dm)
        h = h + g1 * lin(o, p + "attn_out", bias=False)
        m = ln(h, sd[p + "norm2.weight"]) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, p + "mlp.0"), approximate=approximate), p + "mlp.2")
    shift, scale = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
    out = lin(ln(h, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift, "output_layer.linear")
    out = out - torch.log(torch.expm1(sigma))[:, None, None] - math.log(out.shape[-1] - 1)
    return torch.scatter(out, -1, x[..., None], 0.0)


CONFIG_YAML = f"""\
ngpus: 4
tokens: {V}
training:
  batch_size: 512
  ema: 0.9999
graph:
  type: absorb
  file: data
noise:
  type: loglinear
  sigma_min: 1e-4
  sigma_max: 20
model:
  name: tiny
  type: ddit
  hidden_size: {D}
  cond_dim: {COND}
  length: {L}
  n_blocks: {DEPTH}
  n_heads: {HEADS}
  scale_by_sigma: True
  dropout: 0.1
  shared_embedding: True
"""


def write_run(path, model, ema, config=CONFIG_YAML):
    """Their training run folder: .hydra/config.yaml + checkpoints-meta/checkpoint.pth."""
    os.makedirs(path / ".hydra"); os.makedirs(path / "checkpoints-meta")
    (path / ".hydra" / "config.yaml").write_text(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict(),
                "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": [p.detach().clone() for p in ema.parameters()]},
                "step": 7}, path / "checkpoints-meta" / "checkpoint.pth")
    return path


def write_hf(path, sd, fmt="safetensors", prefix="", config=None):
    """A local Hugging Face folder: config.json + model.safetensors (or pytorch_model.bin)."""
    os.makedirs(path)
    cfg = config if config is not None else {"tokens": V, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
                                             "model": {"hidden_size": D, "cond_dim": COND, "length": L,
                                                       "n_blocks": DEPTH, "n_heads": HEADS, "scale_by_sigma": True}}
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {prefix + k: v.detach().clone().contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    return path


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V + 1, (5, L), generator=g)
    x[0] = V                                                     # one all-mask row
    return x, torch.tensor([1e-3, 0.05, 0.4, 1.5, 6.0])


def close(ours, ref):
    """fp32 agreement: 1e-5 of the output's scale (outputs reach ~30: log(e^sigma - 1) at small sigma)."""
    return (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def converted(ck_path):
    ck = torch.load(ck_path, weights_only=True)
    cfg = ck["config"]
    m = sedd.DDiT(cfg["L"], cfg["V"], cfg["size"], cfg["cond_dim"], cfg["dropout"]).eval()
    m.load_state_dict(ck["ema"])
    return m, ck


# ----------------------------------------------------------------------------- conversion
def test_run_folder_converts_to_their_ema_forward(tmp_path, capsys):
    model, ema = AuthorsSEDD(0), AuthorsSEDD(1)                  # training weights != EMA weights
    run = write_run(tmp_path / "run", model, ema)
    sedd.main(["convert", "--authors", str(run), "--out", str(tmp_path / "c.pt")])
    assert "params=" in capsys.readouterr().out
    m, ck = converted(tmp_path / "c.pt")
    assert ck["config"]["L"] == L and ck["config"]["V"] == V and ck["config"]["size"] == f"{D}x{DEPTH}x{HEADS}"
    for k in ck["model"]:
        assert torch.equal(ck["model"][k], ck["ema"][k])             # model gets the EMA weights too
    x, sigma = inputs()
    with torch.no_grad():
        ours = m(x, sigma)
        ref_ema = authors_forward({k: v.detach() for k, v in ema.state_dict().items()}, x, sigma)
        ref_model = authors_forward({k: v.detach() for k, v in model.state_dict().items()}, x, sigma)
    assert close(ours, ref_ema)
    assert (ours - ref_model).abs().max() > 0.1                      # the EMA, not the training weights
    assert ref_ema[1:].std() > 0.3                                   # a forward far from trivial


@pytest.mark.parametrize("fmt,prefix", [("safetensors", "model."), ("bin", "")])
def test_hf_folder_converts_and_samples(tmp_path, monkeypatch, fmt, prefix):
    sd = AuthorsSEDD(2).state_dict()
    hf = write_hf(tmp_path / "hf", sd, fmt, prefix)
    sedd.main(["convert", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
    m, _ = converted(tmp_path / "c.pt")
    x, sigma = inputs(1)
    with torch.no_grad():
        assert close(m(x, sigma), authors_forward(sd, x, sigma))
    monkeypatch.chdir(tmp_path)                                      # the usual sample command runs on it
    sedd.main(["sample", "--ckpt", "c.pt", "--n", "7", "--out", "gen", "--steps", "8"])
    codes = np.load("gen/codes.npy")
    assert codes.shape == (7, L) and codes.max() < V


def test_gelu_exact_is_the_toy_default_tanh_for_theirs_imagenet_and_old_checkpoints(tmp_path, monkeypatch):
    """--gelu exact (the toy) uses GELU's erf form, tanh SEDD's approximation: each DDiT equals
    their forward with its GELU and not with the other. Converted models, the imagenet presets and
    checkpoints saved without the key sample with tanh."""
    sd = AuthorsSEDD(5).state_dict()
    hf = write_hf(tmp_path / "hf", sd)
    sedd.main(["convert", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ck["config"]["gelu"] == "tanh"
    x, sigma = inputs(3)
    for gelu, approx, other in (("exact", "none", "tanh"), ("tanh", "tanh", "none")):
        m = sedd.DDiT(L, V, ck["config"]["size"], ck["config"]["cond_dim"], 0.0, gelu).eval()
        m.load_state_dict(ck["ema"])
        with torch.no_grad():
            ours = m(x, sigma)
            assert close(ours, authors_forward(sd, x, sigma, approximate=approx))
            assert not close(ours, authors_forward(sd, x, sigma, approximate=other))
    assert utils.parse_config(sedd.Config, [], sedd.PRESETS).gelu == "exact"
    assert utils.parse_config(sedd.Config, ["--preset", "imagenet512"], sedd.PRESETS).gelu == "tanh"
    del ck["config"]["gelu"]                                         # a checkpoint saved before the key
    torch.save(ck, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="unknown --gelu"):
        sedd.DDiT(L, V, "toy", 16, 0.0, "relu")
    real, built = sedd.DDiT, []
    def spy(*args):
        built.append(args)
        return real(*args)
    monkeypatch.setattr(sedd, "DDiT", spy)
    monkeypatch.chdir(tmp_path)
    sedd.main(["sample", "--ckpt", "old.pt", "--n", "2", "--out", "gen", "--steps", "4"])
    assert [a[-1] for a in built] == ["tanh"]


def test_heads_from_flag_when_files_do_not_say(tmp_path):
    """Without the rotary buffer and without n_heads in config.json, --heads decides."""
    sd = {k: v for k, v in AuthorsSEDD(3).state_dict().items() if k != "rotary_emb.inv_freq"}
    hf = write_hf(tmp_path / "hf", sd, config={"tokens": V})
    with pytest.raises(SystemExit) as e:
        sedd.main(["convert", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
    assert "--heads" in str(e.value) and "\n" not in str(e.value) and not os.path.exists(tmp_path / "c.pt")
    sedd.main(["convert", "--authors", str(hf), "--out", str(tmp_path / "c.pt"), "--heads", str(HEADS)])
    m, _ = converted(tmp_path / "c.pt")
    x, sigma = inputs(2)
    with torch.no_grad():
        assert close(m(x, sigma), authors_forward(sd, x, sigma))


def test_released_size_parameter_count():
    """SEDD medium at L512 V256 (lavoies/DLC_SEDD_L512): 322,549,249 parameters, one per theirs."""
    with torch.device("meta"):
        m = sedd.DDiT(512, 256, "medium")
    assert sum(p.numel() for p in m.parameters()) == 322_549_249
    names = sedd.authors_names(24)
    assert len(names) == len(m.state_dict()) == 24 * 10 + 11
    assert sorted(sedd.our_name(n) for n in names) == sorted(m.state_dict())
    assert [n for n, _ in AuthorsSEDD(0).named_parameters()] == sedd.authors_names(DEPTH)   # the EMA's order


# ----------------------------------------------------------------------------- bad input
def fails(argv, *words):
    with pytest.raises(SystemExit) as e:
        sedd.main(argv)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_bad_input_one_line_nothing_written(tmp_path):
    out = str(tmp_path / "c.pt")
    conv = lambda p, *more: ["convert", "--authors", str(p), "--out", out, *more]
    model = AuthorsSEDD(0)
    # a checkpoint of another layout: DiT-like tensor names in an HF folder; our own checkpoint in a run folder
    dit = {"x_embedder.proj.weight": torch.zeros(4, 4), "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}
    fails(conv(write_hf(tmp_path / "dit", dit)), "not in the SEDD layout", "unexpected keys", "x_embedder.proj.weight",
          "missing keys pos_embed")
    run = write_run(tmp_path / "ours", model, model)
    torch.save({"model": {}, "ema": {"embed.weight": torch.zeros(2)}, "step": 1}, run / "checkpoints-meta" / "checkpoint.pth")
    fails(conv(run), "not a SEDD training checkpoint")
    # a missing file in the run folder
    run = write_run(tmp_path / "nock", model, model)
    os.remove(run / "checkpoints-meta" / "checkpoint.pth")
    fails(conv(run), "checkpoints-meta/checkpoint.pth")
    run = write_run(tmp_path / "nocfg", model, model)
    os.remove(run / ".hydra" / "config.yaml")
    fails(conv(run), ".hydra/config.yaml")
    fails(conv(tmp_path / "nowhere"), "neither a SEDD run folder")
    # sizes: a flag or the config against the weights; a different graph
    good = write_run(tmp_path / "good", model, model)
    fails(conv(good, "--V", "10"), f"V={V}", "--V says 10")
    fails(conv(good, "--L", "7"), f"L={L}", "--L says 7")
    fails(conv(write_run(tmp_path / "tok", model, model, CONFIG_YAML.replace(f"tokens: {V}", "tokens: 12"))),
          f"V={V}", "config says 12")
    fails(conv(write_run(tmp_path / "heads", model, model, CONFIG_YAML.replace(f"n_heads: {HEADS}", "n_heads: 2"))),
          f"n_heads={HEADS}", "config says 2")
    fails(conv(write_run(tmp_path / "unif", model, model, CONFIG_YAML.replace("type: absorb", "type: uniform"))),
          "graph.type=uniform")
    assert not os.path.exists(out)
    open(out, "w").close()                                           # never overwrites
    fails(conv(good), "exists")
    assert os.path.getsize(out) == 0
