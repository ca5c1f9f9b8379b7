"""Shared test plumbing: the repo root on sys.path, and helpers that run our scripts as a
user would (subprocesses, torchrun) so the tests exercise the real command lines."""
import json, math, os, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

# under pytest-xdist (pytest.ini: two workers) each worker and the scripts it starts use one
# thread, so that the two workers do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(args, cwd=None, timeout=600, check=True):
    """`python <args...>` from the repo root (or cwd); returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def torchrun(args, nproc=2, cwd=None, timeout=600, check=True):
    """A `torchrun --standalone --nproc_per_node=N` run on CPU (gloo)."""
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
                      cwd=cwd, timeout=timeout, check=check)


def assert_same_optimizer_state(a, b):
    """Two optimizer state dicts bit-equal: every moment tensor, step count and hyper-parameter."""
    import torch
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if torch.is_tensor(v) else v == b["state"][i][k], (i, k)


def structured_dlc_set(out, n=4000, L=16, V=32, noise=0.1, seed=0):
    """A SYNTHETIC DLC set with known structure (not from sem.py), for the SEDD tests: token i is
    a random table of the one or two shapes attributes (shape, colour, background) position i
    looks at, then uniform noise with probability `noise`. Marginals and pairs are far from uniform."""
    import numpy as np
    import utils
    rng = np.random.RandomState(seed)
    attrs = utils.make_shapes(n, 8, seed)["attrs"].numpy()                 # (N, 3)
    sizes = (len(utils.SHAPES), len(utils.COLOURS), len(utils.COLOURS))
    codes = np.empty((n, L), dtype=np.int64)
    for i in range(L):
        look = rng.choice(3, size=1 + i % 2, replace=False)                # attributes seen by position i
        # (N,) flat index of those attributes, then a random token for each of their combinations
        key = np.ravel_multi_index(tuple(attrs[:, j] for j in look), tuple(sizes[j] for j in look))
        codes[:, i] = rng.randint(V, size=int(np.prod([sizes[j] for j in look])))[key]
    noisy = rng.rand(n, L) < noise                                        # (N, L) tokens replaced by noise
    codes[noisy] = rng.randint(V, size=noisy.sum())
    utils.save_dlc_set(str(out), codes, {"L": L, "V": V, "synthetic": True,
                                         "data": {"name": "shapes", "n": n, "size": 8, "seed": seed}},
                       labels=attrs[:, 0])
    return str(out)


def captioned_dlc_set(out, n=200, L=8, V=32, seed=0, captions=True, data=None):
    """A SYNTHETIC captioned DLC set (not from sem.py), for the text2dlc tests: tokens 0-1 name the
    shape, 2-3 the colour, 4-5 the background (two synonyms each), 6-7 are noise. With `data`
    (an embedded dataset's name) its rows are that dataset's images at 8 px, recorded in meta."""
    import numpy as np
    import utils
    d = utils.load_embedded(data, n=n, size=8, seed=seed) if data else utils.make_shapes(n, 8, seed)
    rng = np.random.RandomState(seed)
    a = d["attrs"].numpy()                                                # (N, 3) shape, colour, background
    codes = np.concatenate([2 * a[:, :1] + rng.randint(2, size=(n, 2)), 8 + 2 * a[:, 1:2] + rng.randint(2, size=(n, 2)),
                            18 + 2 * a[:, 2:3] + rng.randint(2, size=(n, 2)), rng.randint(V, size=(n, 2))], 1)
    meta = {"L": L, "V": V, "synthetic": True}
    if data:
        meta["data"] = {"name": data, "n": n, "size": 8, "seed": seed}
    utils.save_dlc_set(str(out), codes, meta, labels=a[:, 0] if data else None,
                       captions=d["captions"] if captions else None)
    return str(out)


#################################################################################
#    The authors' layouts, built with their key names and shapes (test_authors, #
#    test_sem, test_dit)                                                        #
#################################################################################

def official_shapes(depth, D, patch, C=4, classes=1000, size=32):
    """Keys and shapes of an official DiT checkpoint, from the naming of facebookresearch/DiT."""
    T = (size // patch) ** 2
    s = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, patch, patch), "x_embedder.proj.bias": (D,),
         "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
         "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
         "y_embedder.embedding_table.weight": (classes + 1, D),
         "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
         "final_layer.linear.weight": (patch * patch * 2 * C, D), "final_layer.linear.bias": (patch * patch * 2 * C,)}
    for i in range(depth):
        for name, out, inp in [("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("mlp.fc1", 4 * D, D),
                               ("mlp.fc2", D, 4 * D), ("adaLN_modulation.1", 6 * D, D)]:
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = (out, inp), (out,)
    return s


def authors_teacher(D=64, depth=4, patch=8, R=4, grid=5, L=4, V=8, hidden=32, bottleneck=16, K=24, g=None):
    """A random state dict with the keys and shapes of the authors' teacher checkpoint:
    ModuleDict(backbone=DinoVisionTransformerWithSEM, dino_head=DINOHead), block_chunks 0."""
    torch.manual_seed(0)
    s = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + grid * grid, D), "register_tokens": (1, R, D),
         "mask_token": (1, D), "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
         "norm.weight": (D,), "norm.bias": (D,), "sem_embed.weight": (L * V, D * (1 + R)),
         "sem_norm.weight": (L * V,), "sem_norm.bias": (L * V,), "sem_out.weight": (D, L * V),
         "sem_cls_norm.weight": (D,), "sem_cls_norm.bias": (D,)}
    for i in range(depth):
        for n, shp in [("norm1.weight", (D,)), ("norm1.bias", (D,)), ("attn.qkv.weight", (3 * D, D)),
                       ("attn.qkv.bias", (3 * D,)), ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
                       ("ls1.gamma", (D,)), ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                       ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)),
                       ("mlp.fc2.weight", (D, 4 * D)), ("mlp.fc2.bias", (D,)), ("ls2.gamma", (D,))]:
            s[f"blocks.{i}.{n}"] = shp
    std = lambda k, v: 0.1 if len(v) == 1 else 1.0 if len(v) == 3 else math.prod(v[1:]) ** -0.5   # biases, tokens, fan-in
    sd = {f"backbone.{k}": torch.randn(v) * std(k, v) for k, v in s.items()}
    for k in sd:
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ls1.gamma", "ls2.gamma")):
            sd[k] = 1 + 0.2 * torch.randn_like(sd[k])
    head = {"mlp.0.weight": (hidden, D), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
            "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
            "last_layer.weight_v": (K, bottleneck)}
    sd.update({f"dino_head.{k}": torch.randn(v) * std(k, v) for k, v in head.items()})
    sd["dino_head.last_layer.weight_g"] = torch.ones(K, 1) if g is None else g
    return sd


def authors_ditsem(depth=4, D=128, patch=2, C=4, grid=4, L=6, V=10, seed=0):
    """Random weights with the keys and shapes of the authors' DiTSEM (dit/models.py):
    official DiT names, no y_embedder, sem_embedder.embedding_table (L, V+1, D)."""
    g = torch.Generator().manual_seed(seed)
    s = {k: v for k, v in official_shapes(depth, D, patch, C, size=grid * patch).items() if not k.startswith("y_")}
    s["sem_embedder.embedding_table"] = (L, V + 1, D)
    std = lambda k, v: 0.5 if k == "pos_embed" else 1.0 if k.startswith("sem_") else 0.1 if len(v) == 1 else math.prod(v[1:]) ** -0.5
    return {k: torch.randn(v, generator=g) * std(k, v) for k, v in s.items()}


def reference_ditsem(sd, x, t, y, heads, drop=None, approximate="tanh"):
    """Their DiTSEM.forward in eval mode written out: patchify + pos, [cos, sin] timestep MLP,
    SEMEmbedder (one_hot(y, V+1) or y with a zero drop column, @ table, mean over L), adaLN-Zero
    blocks with explicit attention, final layer, unpatchify (einsum nhwpqc->nchpwq)."""
    w = lambda k: sd[k]
    p, D = w("x_embedder.proj.weight").shape[-1], w("x_embedder.proj.weight").shape[0]
    B = len(x)
    h = F.conv2d(x, w("x_embedder.proj.weight"), w("x_embedder.proj.bias"), stride=p).flatten(2).transpose(1, 2)
    h = h + w("pos_embed")
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    a = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(a), torch.sin(a)], -1)
    temb = F.linear(F.silu(F.linear(temb, w("t_embedder.mlp.0.weight"), w("t_embedder.mlp.0.bias"))),
                    w("t_embedder.mlp.2.weight"), w("t_embedder.mlp.2.bias"))
    table = w("sem_embedder.embedding_table")
    L, V1, _ = table.shape
    o = torch.cat([y, torch.zeros(B, L, 1)], -1) if y.is_floating_point() else F.one_hot(y, V1).float()
    if drop is not None:                                   # token_drop / token_drop_vec: one-hot of V everywhere
        o = torch.where(drop[:, None, None], F.one_hot(torch.tensor(V1 - 1), V1).float(), o)
    c = temb + (o.transpose(0, 1) @ table).mean(0)
    mod = lambda z, sh, sc: z * (1 + sc[:, None]) + sh[:, None]
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = F.linear(F.silu(c), w(b + "adaLN_modulation.1.weight"), w(b + "adaLN_modulation.1.bias")).chunk(6, 1)
        q, k, v = F.linear(mod(ln(h), sh1, sc1), w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias")).view(B, -1, 3, heads, D // heads).unbind(2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads), -1)
        h = h + g1[:, None] * F.linear(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, -1, D), w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        m = F.gelu(F.linear(mod(ln(h), sh2, sc2), w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias")), approximate=approximate)
        h = h + g2[:, None] * F.linear(m, w(b + "mlp.fc2.weight"), w(b + "mlp.fc2.bias"))
        i += 1
    sh, sc = F.linear(F.silu(c), w("final_layer.adaLN_modulation.1.weight"), w("final_layer.adaLN_modulation.1.bias")).chunk(2, 1)
    out = F.linear(mod(ln(h), sh, sc), w("final_layer.linear.weight"), w("final_layer.linear.bias"))
    g, cout = math.isqrt(out.shape[1]), out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, cout))
    return out.reshape(B, cout, g * p, g * p)


def write_accelerate_run(root, ema, raw, args):
    """<run>/checkpoints/checkpoints/checkpoint_3/ as accelerate's save_state writes it for their
    train_diffusion.py, and <run>/checkpoints/metadata.json."""
    from safetensors.torch import save_file
    ck = root / "checkpoints/checkpoints/checkpoint_3"
    ck.mkdir(parents=True)
    torch.save({"_orig_mod." + k: v for k, v in ema.items()}, ck / "custom_checkpoint_0.pkl")
    save_file({"module._orig_mod." + k: v.contiguous() for k, v in raw.items()}, str(ck / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.bin")
    (root / "checkpoints/metadata.json").write_text(json.dumps({"current_epoch": 3, "args": args}))
    return ck


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (run through the device tool)")
