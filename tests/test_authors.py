"""authors.py: tiny models in each of the authors' layouts (their DINOv2-fork SEM teacher, their SEDD
run folder, their accelerate DiT folder, the Hugging Face folders with the same tensor names, their
DLC dataset as parquet / Arrow IPC), converted, against reference forwards written here from the
equations of their models (github.com/lavoiems/DiscreteLatentCode); bad input."""
import json, math, os, shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, authors_ditsem, authors_teacher, reference_ditsem, run_script, write_accelerate_run
from test_sem import TINY as SEM_TINY
import authors, dit, sedd, sem
import utils

AUTHORS, SEM = os.path.join(ROOT, "authors.py"), os.path.join(ROOT, "sem.py")
torch.set_num_threads(1)  # why: one thread is faster on the shared 2-core test machine


#################################################################################
#        sedd: their run folder / HF folder against their forward written out    #
#################################################################################

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
def test_sedd_run_folder_converts_to_their_ema_forward(tmp_path, capsys):
    model, ema = AuthorsSEDD(0), AuthorsSEDD(1)                  # training weights != EMA weights
    run = write_run(tmp_path / "run", model, ema)
    authors.main(["sedd", "--authors", str(run), "--out", str(tmp_path / "c.pt")])
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
def test_sedd_hf_folder_converts_and_samples(tmp_path, monkeypatch, fmt, prefix):
    sd = AuthorsSEDD(2).state_dict()
    hf = write_hf(tmp_path / "hf", sd, fmt, prefix)
    authors.main(["sedd", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
    m, _ = converted(tmp_path / "c.pt")
    x, sigma = inputs(1)
    with torch.no_grad():
        assert close(m(x, sigma), authors_forward(sd, x, sigma))
    monkeypatch.chdir(tmp_path)                                      # the usual sample command runs on it
    sedd.main(["sample", "--ckpt", "c.pt", "--n", "7", "--out", "gen", "--steps", "8"])
    codes = np.load("gen/codes.npy")
    assert codes.shape == (7, L) and codes.max() < V


def test_sedd_gelu_exact_is_the_toy_default_tanh_for_theirs_imagenet_and_old_checkpoints(tmp_path, monkeypatch):
    """--gelu exact (the toy) uses GELU's erf form, tanh SEDD's approximation: each DDiT equals
    their forward with its GELU and not with the other. Converted models, the imagenet presets and
    checkpoints saved without the key sample with tanh."""
    sd = AuthorsSEDD(5).state_dict()
    hf = write_hf(tmp_path / "hf", sd)
    authors.main(["sedd", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
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


def test_sedd_heads_from_flag_when_files_do_not_say(tmp_path):
    """Without the rotary buffer and without n_heads in config.json, --heads decides."""
    sd = {k: v for k, v in AuthorsSEDD(3).state_dict().items() if k != "rotary_emb.inv_freq"}
    hf = write_hf(tmp_path / "hf", sd, config={"tokens": V})
    with pytest.raises(SystemExit) as e:
        authors.main(["sedd", "--authors", str(hf), "--out", str(tmp_path / "c.pt")])
    assert "--heads" in str(e.value) and "\n" not in str(e.value) and not os.path.exists(tmp_path / "c.pt")
    authors.main(["sedd", "--authors", str(hf), "--out", str(tmp_path / "c.pt"), "--heads", str(HEADS)])
    m, _ = converted(tmp_path / "c.pt")
    x, sigma = inputs(2)
    with torch.no_grad():
        assert close(m(x, sigma), authors_forward(sd, x, sigma))


def test_sedd_released_size_parameter_count():
    """SEDD medium at L512 V256 (lavoies/DLC_SEDD_L512): 322,549,249 parameters, one per theirs."""
    with torch.device("meta"):
        m = sedd.DDiT(512, 256, "medium")
    assert sum(p.numel() for p in m.parameters()) == 322_549_249
    names = authors.authors_names(24)
    assert len(names) == len(m.state_dict()) == 24 * 10 + 11
    assert sorted(authors.our_name(n) for n in names) == sorted(m.state_dict())
    assert [n for n, _ in AuthorsSEDD(0).named_parameters()] == authors.authors_names(DEPTH)   # the EMA's order


# ----------------------------------------------------------------------------- bad input
def fails(argv, *words):
    with pytest.raises(SystemExit) as e:
        authors.main(argv)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_sedd_bad_input_one_line_nothing_written(tmp_path):
    out = str(tmp_path / "c.pt")
    conv = lambda p, *more: ["sedd", "--authors", str(p), "--out", out, *more]
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


#################################################################################
#        sem: their DINOv2-fork teacher / HF folder against their forward        #
#################################################################################


def reference_sem(sd, x, L, V, heads, temp):
    """Their forward written out (DinoVisionTransformerWithSEM.forward_features with
    interpolate_antialias=True, offset 0; NestedTensorBlock; DINOHead), explicit attention."""
    w = lambda k: sd["backbone." + k]
    B, _, H, W = x.shape
    p, D = w("patch_embed.proj.weight").shape[-1], w("cls_token").shape[-1]
    t = F.conv2d(x, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([w("cls_token").expand(B, -1, -1), t], 1)
    pos, M = w("pos_embed"), math.isqrt(w("pos_embed").shape[1] - 1)
    grid = F.interpolate(pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2), size=(H // p, W // p),
                         mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, D)
    t = t + torch.cat([pos[:, :1], grid], 1)
    R = w("register_tokens").shape[1]
    t = torch.cat([t[:, :1], w("register_tokens").expand(B, -1, -1), t[:, 1:]], 1)
    ln = lambda z, k, n: F.layer_norm(z, (n,), w(k + ".weight"), w(k + ".bias"), 1e-6)
    i = 0
    while f"backbone.blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        h = ln(t, b + "norm1", D)
        q, k, v = F.linear(h, w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias")).view(B, -1, 3, heads, D // heads).unbind(2)
        a = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, -1, D)
        t = t + w(b + "ls1.gamma") * F.linear(o, w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        h = F.gelu(F.linear(ln(t, b + "norm2", D), w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias")))
        t = t + w(b + "ls2.gamma") * F.linear(h, w(b + "mlp.fc2.weight"), w(b + "mlp.fc2.bias"))
        i += 1
    z = ln(F.linear(t[:, :1 + R].reshape(B, -1), w("sem_embed.weight")), "sem_norm", L * V)
    probs = torch.softmax(z.view(B, L, V) / temp, -1)
    cls = ln(F.linear(probs.reshape(B, -1), w("sem_out.weight")), "norm", D)       # x_norm_clstoken
    hd = lambda k: sd["dino_head." + k]
    e = F.gelu(F.linear(cls, hd("mlp.0.weight"), hd("mlp.0.bias")))
    e = F.gelu(F.linear(e, hd("mlp.2.weight"), hd("mlp.2.bias")))
    e = F.normalize(F.linear(e, hd("mlp.4.weight"), hd("mlp.4.bias")), dim=-1)
    v_ = hd("last_layer.weight_v")
    logits = F.linear(e, hd("last_layer.weight_g") * v_ / v_.norm(dim=1, keepdim=True))   # weight_norm, dim 0
    return {"cls": cls, "probs": probs, "patch": ln(t, "norm", D)[:, 1 + R:], "logits": logits}


def converted_student(ck):
    cfg = sem.Config(**ck["config"])
    st = sem.Student(cfg)
    st.load_state_dict(ck["ema"])
    return st.eval(), cfg


def test_sem_teacher_matches_their_forward(tmp_path):
    sd = authors_teacher()
    (tmp_path / "run/eval/training_99").mkdir(parents=True)
    torch.save({"teacher": sd}, tmp_path / "run/eval/training_99/teacher_checkpoint.pth")
    (tmp_path / "run/config.yaml").write_text("student:\n  arch: vit_large_sem\n  L: 4\n  V: 8\n")
    out = str(tmp_path / "ck.pt")
    authors.main(["sem", "--authors", str(tmp_path / "run/eval/training_99/teacher_checkpoint.pth"), "--out", out])
    ck = utils.load_checkpoint(out)
    st, cfg = converted_student(ck)
    assert (cfg.arch, cfg.patch, cfg.registers, cfg.pos_grid, cfg.L, cfg.V, cfg.size) == ("toy", 8, 4, 5, 4, 8, 40)
    assert cfg.prototypes == 24 and "backbone.sem_cls_norm.weight" not in ck["ema"]
    x = torch.randn(3, 3, 32, 32)                       # 4 x 4 patches: the stored 5 x 5 grid is interpolated
    for temp in (1.0, 0.05):
        ref = reference_sem(sd, x, 4, 8, heads=4, temp=temp)
        with torch.no_grad():
            got = st.backbone(x, tau=temp)
            logits = st.head(got["cls"])
        for k in ("cls", "probs", "patch"):
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
        torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=1e-5)
    # encode / probe read it as usual (and at its own resolution: --size comes from the checkpoint)
    enc, ecfg, _, head = sem.load_encoder(sem.EncodeConfig(ckpt=out))
    assert ecfg.size == 40 and head == "trained"


def test_sem_hf_folder_and_g_not_one(tmp_path):
    from safetensors.torch import save_file
    sd = authors_teacher(g=torch.rand(24, 1) + 0.5)      # a trained weight_g: our head cannot hold it
    hf = tmp_path / "hf"
    hf.mkdir()
    back = {"model." + k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    save_file(back, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"L": 4, "V": 8}))
    out = str(tmp_path / "hf.pt")
    authors.main(["sem", "--authors", str(hf), "--out", out])
    enc, cfg, _, _ = sem.load_encoder(sem.EncodeConfig(ckpt=out))
    x = torch.randn(2, 3, 40, 40)
    ref = reference_sem(sd, x, 4, 8, heads=4, temp=1.0)
    with torch.no_grad():
        got = enc.eval()(x)
    for k in ("cls", "probs", "patch"):
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    # their .pth with a g != 1: the backbone converts, the head does not, and resuming says why
    torch.save({"teacher": sd}, tmp_path / "t.pth")
    p = run_script([AUTHORS, "sem", "--authors", str(tmp_path / "t.pth"), "--out", str(tmp_path / "g.pt"),
                    "--L", "4", "--V", "8"], cwd=tmp_path)
    assert "weight_g is not 1" in p.stdout
    (tmp_path / "runs/sem-a/checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "g.pt", tmp_path / "runs/sem-a/checkpoints/ckpt_0000000.pt")
    p = run_script([SEM, *SEM_TINY, "--run", "a", "--resume", "--arch", "toy", "--patch", "8", "--pos_grid", "5"],
                   cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "without the DINO head" in p.stderr


def test_sharded_hf_folder_reads_every_shard(tmp_path):
    """A Hugging Face folder whose weights are split in shards named by model.safetensors.index.json
    converts to exactly what the single-file folder converts to; a missing shard is one line."""
    from safetensors.torch import save_file
    back = {"model." + k.removeprefix("backbone."): v for k, v in authors_teacher().items() if k.startswith("backbone.")}
    names = sorted(back)
    for folder, parts in (("one", [names]), ("sharded", [names[::2], names[1::2]])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps({"L": 4, "V": 8}))
        files = ["model.safetensors"] if len(parts) == 1 else [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for f, keys in zip(files, parts):
            save_file({k: back[k] for k in keys}, str(tmp_path / folder / f))
        if len(parts) > 1:
            weight_map = {k: f for f, keys in zip(files, parts) for k in keys}
            (tmp_path / folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        authors.main(["sem", "--authors", str(tmp_path / folder), "--out", str(tmp_path / f"{folder}.pt")])
    one, sharded = (utils.load_checkpoint(str(tmp_path / f"{f}.pt"))["ema"] for f in ("one", "sharded"))
    assert sorted(one) == sorted(sharded) and all(torch.equal(one[k], sharded[k]) for k in one)
    os.remove(tmp_path / "sharded" / "model-00002-of-00002.safetensors")
    with pytest.raises(SystemExit, match="a shard named in model.safetensors.index.json is missing"):
        authors.main(["sem", "--authors", str(tmp_path / "sharded"), "--out", str(tmp_path / "x.pt")])


def test_sem_bad_input(tmp_path):
    from safetensors.torch import save_file
    sd = authors_teacher()
    torch.save({"teacher": sd}, tmp_path / "t.pth")
    (tmp_path / "nofile").mkdir()
    (tmp_path / "nofile/config.json").write_text("{}")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"L": 4, "V": 8}))
    renamed = {k.replace("backbone.blocks.", "backbone.encoder.layer."): v for k, v in sd.items() if k.startswith("backbone.")}
    save_file(renamed, str(other / "model.safetensors"))
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, tmp_path / "dit.pt")
    cases = [(["--authors", str(tmp_path / "t.pth")], "pass --L and --V"),                # no config.yaml, no flags
             (["--authors", str(tmp_path / "t.pth"), "--L", "3"], "pass --L and --V"),      # 3 does not divide 32
             (["--authors", str(tmp_path / "nofile")], "model.safetensors"),
             (["--authors", str(other), "--L", "4"], "unexpected keys"),
             (["--authors", str(tmp_path / "dit.pt"), "--L", "4"], "missing keys ['cls_token'"),
             (["--authors", str(tmp_path / "t.pth"), "--L", "4", "--patch", "14"], "--patch 14 does not match")]
    for i, (args, msg) in enumerate(cases):
        out = tmp_path / f"o{i}.pt"
        p = run_script([AUTHORS, "sem", *args, "--out", str(out)], cwd=tmp_path, check=False)
        assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and msg in p.stderr, p.stderr[-400:]
        assert not out.exists()


#################################################################################
#              dlc: their DLC dataset (parquet / Arrow IPC)                      #
#################################################################################

def authors_rows(n, L=8, h=2, seed=0):
    """Rows in the authors' schema: `labels` = the DLC [L], `features` = a [4, h, h] latent."""
    rng = np.random.RandomState(seed)
    codes = rng.randint(0, 16, size=(n, L))
    lat = rng.randn(n, 4, h, h).astype(np.float32)
    syn = [f"n{1000 + (i % 3):08d}_{i}" for i in range(n)]                  # ImageNet-style image ids
    return codes, lat, syn


def write_parquet(path, codes, lat, extra):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    t = pa.table({"labels": codes.tolist(), "features": lat.tolist(), **extra})   # nested lists, as datasets writes
    pq.write_table(t, path, row_group_size=3)


def write_save_to_disk(folder, codes, lat, syn, parts=2):
    """datasets.save_to_disk's layout: data-0000k-of-n.arrow (IPC stream) + state.json + dataset_info.json."""
    pa = pytest.importorskip("pyarrow")
    os.makedirs(folder)
    names = [f"data-{k:05d}-of-{parts:05d}.arrow" for k in range(parts)]
    lat_type = pa.list_(pa.list_(pa.list_(pa.float32(), lat.shape[-1]), lat.shape[-1]), 4)  # fixed-size lists
    for k, rows in enumerate(np.array_split(np.arange(len(codes)), parts)):
        t = pa.table({"features": pa.array(lat[rows].tolist(), type=lat_type),
                      "labels": pa.array(codes[rows].tolist(), type=pa.list_(pa.int64())),
                      "path": syn[rows[0]:rows[-1] + 1]})
        with pa.ipc.new_stream(os.path.join(folder, names[k]), t.schema) as w:
            for b in t.to_batches(max_chunksize=2):
                w.write_batch(b)
    json.dump({"_data_files": [{"filename": n} for n in names]}, open(os.path.join(folder, "state.json"), "w"))
    json.dump({"dataset_name": "dlc_8x16"}, open(os.path.join(folder, "dataset_info.json"), "w"))


def test_dlc_parquet_and_arrow(tmp_path):
    n = 11
    codes, lat, syn = authors_rows(n)
    hub = tmp_path / "DLC_8x16" / "data"
    hub.mkdir(parents=True)
    k = np.array_split(np.arange(n), 2)
    for j, rows in enumerate(k):      # two train shards, plus a test shard that must not be read
        write_parquet(hub / f"train-{j:05d}-of-00002.parquet", codes[rows], lat[rows], {"label": (rows % 5).tolist()})
    write_parquet(hub / "test-00000-of-00001.parquet", codes[:2] + 1, lat[:2], {"label": [0, 0]})
    out = tmp_path / "dlc"
    authors.main(["dlc", "--authors", str(tmp_path / "DLC_8x16"), "--out", str(out), "--chunk", "4"])
    s = utils.load_dlc_set(str(out), L=8, V=16)             # V read from the folder name "8x16"
    assert s["codes"].dtype == np.uint16 and isinstance(s["codes"], np.memmap)
    assert (np.asarray(s["codes"]) == codes).all() and (s["labels"] == np.arange(n) % 5).all()
    x = np.load(out / "latents.npy", mmap_mode="r")
    assert x.shape == (n, 1, 4, 2, 2) and x.dtype == np.float16
    assert np.allclose(x[:, 0], lat, atol=2e-3)
    # save_to_disk folder: Arrow IPC streams, fixed-size list latents, classes from ImageNet synsets
    arrow = tmp_path / "saved"
    write_save_to_disk(arrow, codes, lat, syn)
    out2 = tmp_path / "dlc2"
    authors.main(["dlc", "--authors", str(arrow), "--out", str(out2)])
    s2 = utils.load_dlc_set(str(out2), L=8, V=16)
    assert (np.asarray(s2["codes"]) == codes).all() and (s2["labels"] == np.arange(n) % 3).all()
    assert open(out2 / "index.txt").read().split() == syn
    assert np.allclose(np.load(out2 / "latents.npy")[:, 0], lat, atol=2e-3)
    # the imported set trains dit.py directly (latents + codes in one folder, no flipped copy)
    import dit
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        dit.main(["train", "--latents", str(out2), "--dlc", str(out2), "--model", "DiT-toy/2", "--image_size", "16",
                  "--steps", "1", "--batch_size", "4", "--ckpt_every", "1", "--device", "cpu"])
    finally:
        os.chdir(cwd)
    assert os.path.isfile(tmp_path / "runs/dit-toy/checkpoints/ckpt_0000001.pt")


def test_dlc_bad_input(tmp_path):
    codes, lat, syn = authors_rows(5)
    (tmp_path / "plain").mkdir()
    write_parquet(tmp_path / "plain" / "x.parquet", codes, lat, {})
    (tmp_path / "notours").mkdir()
    (tmp_path / "notours" / "keep.txt").write_text("mine")
    cases = [(["--authors", str(tmp_path / "plain")], "pass --V"),                       # no "LxV" anywhere
             (["--authors", str(tmp_path / "plain"), "--V", "8"], "outside [0, V=8)"),
             (["--authors", str(tmp_path / "nope"), "--V", "16"], "does not exist"),
             (["--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "notours")], "not a DLC set")]
    for args, msg in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            authors.main(["dlc", "--out", str(out), *args])
        assert str(e.value).startswith("error:") and msg in str(e.value) and "\n" not in str(e.value), e.value
        assert not out.exists()
    assert os.listdir(tmp_path / "notours") == ["keep.txt"]
    # a folder holding a meta.json among a user's files is not ours: refused, nothing deleted
    (tmp_path / "mixed").mkdir()
    for name in ("meta.json", "notes.txt"):
        (tmp_path / "mixed" / name).write_text("{}")
    with pytest.raises(SystemExit, match="not a DLC set"):
        authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "mixed")])
    assert sorted(os.listdir(tmp_path / "mixed")) == ["meta.json", "notes.txt"]
    # an empty folder: a failed import leaves it as it was, a good one fills it
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="pass --V"):
        authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--out", str(tmp_path / "empty")])
    assert os.path.isdir(tmp_path / "empty") and os.listdir(tmp_path / "empty") == []
    authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "empty")])
    assert (np.asarray(utils.load_dlc_set(str(tmp_path / "empty"), L=8, V=16)["codes"]) == codes).all()
    # an existing DLC set is replaced only with --overwrite
    authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "set")])
    before = open(tmp_path / "set" / "meta.json").read()
    with pytest.raises(SystemExit, match="--overwrite"):
        authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "set")])
    assert open(tmp_path / "set" / "meta.json").read() == before
    authors.main(["dlc", "--authors", str(tmp_path / "plain"), "--V", "16", "--out", str(tmp_path / "set"), "--overwrite"])
    assert (np.asarray(utils.load_dlc_set(str(tmp_path / "set"), L=8, V=16)["codes"]) == codes).all()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"features": lat.tolist()}), tmp_path / "nolabels.parquet")
    with pytest.raises(SystemExit, match="no 'labels' column"):
        authors.main(["dlc", "--authors", str(tmp_path / "nolabels.parquet"), "--out", str(tmp_path / "o"), "--V", "16"])


#################################################################################
#      dit: their accelerate folder / HF folder against their forward and CFG    #
#################################################################################


def reference_cfg(sd, x, t, y, scale, heads):
    """Their DiTSEM.forward_with_cfg / pipeline cfg_wrapper: conditional and null (index V) halves,
    guidance on all in_channels epsilon channels, variances of the conditional half."""
    C, B = x.shape[1], len(x)
    null = torch.ones(B, dtype=torch.bool)
    out = torch.cat([reference_ditsem(sd, x, t, y, heads), reference_ditsem(sd, x, t, y, heads, null)])
    eps, rest = out[:, :C], out[:, C:]
    cond, uncond = eps.split(B)
    return torch.cat([uncond + scale * (cond - uncond), rest[:B]], 1)


def test_dit_accelerate_folder_matches_their_forward_and_cfg(tmp_path):
    ema, raw = authors_ditsem(seed=0), authors_ditsem(seed=1)
    ck = write_accelerate_run(tmp_path / "run", ema, raw, {"model": "DiTSEM-toy/2", "L": 6, "V": 10, "image_size": 64})
    out = str(tmp_path / "ours.pt")
    authors.main(["dit", "--authors", str(ck), "--out", out])
    model, state = dit.load_for_sampling(out, torch.device("cpu"))        # what sample / compose load: the EMA
    assert state["model_args"] == dict(model="DiT-toy/2", input_size=8, in_channels=4, cond="dlc", num_classes=0,
                                       L=6, V=10, emb_dim=0)
    assert all(torch.equal(state["model"][k], raw[k]) for k in raw)       # the raw weights kept for reference
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 3])
    codes = torch.randint(0, 10, (3, 6), generator=g)
    soft = torch.softmax(3 * torch.randn(3, 6, 10, generator=g), -1)
    with torch.no_grad():
        for y in (codes, soft):
            torch.testing.assert_close(model(x, t, y), reference_ditsem(ema, x, t, y, 4), atol=1e-5, rtol=1e-5)
            drop = torch.tensor([True, False, True])
            torch.testing.assert_close(model(x, t, y, drop), reference_ditsem(ema, x, t, y, 4, drop), atol=1e-5, rtol=1e-5)
        ref = reference_cfg(ema, x, t, codes, 1.7, 4)
        torch.testing.assert_close(model.forward_with_cfg(x, t, codes, 1.7, channels=4), ref, atol=1e-5, rtol=1e-5)
        three = model.forward_with_cfg(x, t, codes, 1.7, channels=3)     # the paper's wording differs on channel 3
        assert (three[:, 3] - ref[:, 3]).abs().max() > 1e-2
    # their model trained on DiT's linear schedule: sample / compose must use it, not the toy's cosine
    assert state["config"]["schedule"] == "linear"
    np.testing.assert_array_equal(dit.trained_diffusion(state).abar, dit.GaussianDiffusion.linear(1000).abar)
    # the Table 1 presets guide as the authors' pipeline does
    for name, scale in (("imagenet-cfg1.7", 1.7), ("imagenet-remask", 1.0)):
        c = utils.parse_config(dit.Config, ["--preset", name], dit.PRESETS)
        assert (c.sample_steps, c.cfg_scale, c.cfg_channels, c.cfg_interval, c.bf16) == (256, scale, 4, [], False)
    assert utils.parse_config(dit.Config, ["--preset", "imagenet-cfg1.7", "--cfg_channels", "3"], dit.PRESETS).cfg_channels == 3


def test_dit_hf_folder(tmp_path):
    from safetensors.torch import save_file
    sd = authors_ditsem(L=5, V=7, seed=2)
    (tmp_path / "hf/transformer").mkdir(parents=True)
    (tmp_path / "hf/model_index.json").write_text("{}")
    (tmp_path / "hf/transformer/config.json").write_text(json.dumps({"L": 5, "V": 7, "input_size": 8, "in_channels": 4}))
    save_file(sd, str(tmp_path / "hf/transformer/diffusion_pytorch_model.safetensors"))
    out = str(tmp_path / "hf.pt")
    authors.main(["dit", "--authors", str(tmp_path / "hf"), "--out", out])
    model, _ = dit.load_for_sampling(out, torch.device("cpu"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_ditsem(sd, x, t, y, 4), atol=1e-5, rtol=1e-5)


def test_dit_bad_input(tmp_path):
    from safetensors.torch import save_file
    sd = authors_ditsem()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")                         # no EMA file, no config.json
    label = write_accelerate_run(tmp_path / "label", {**{k: v for k, v in sd.items() if not k.startswith("sem_")},
                                 "y_embedder.embedding_table.weight": torch.zeros(1001, 128)}, sd, {})
    wrongL = write_accelerate_run(tmp_path / "wrongL", sd, sd, {"model": "DiTSEM-toy/2", "L": 512, "V": 10})
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"L": 6, "V": 10}))
    save_file({k.replace("blocks.", "transformer_blocks."): v.contiguous() for k, v in sd.items()}, str(other / "model.safetensors"))
    cases = [(empty, "no custom_checkpoint_0.pkl"), (label, "missing keys ['sem_embedder.embedding_table']"),
             (wrongL, "config says L=512"), (other, "unexpected keys"), (tmp_path / "nothing", "is not a folder")]
    for i, (path, msg) in enumerate(cases):
        out = tmp_path / f"o{i}.pt"
        p = run_script([AUTHORS, "dit", "--authors", str(path), "--out", str(out)],
                       cwd=tmp_path, check=False)
        assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and msg in p.stderr, p.stderr[-400:]
        assert not out.exists()
