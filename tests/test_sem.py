"""Tests of sem.py: SEM head, official DINOv2 key layout, losses, EMA, resume, torchrun,
sharded encoding and bad input. Tiny sizes so the file runs in about a minute on 2 cores."""
import dataclasses, json, math, os, shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_same_optimizer_state, authors_teacher, run_script, torchrun
import authors, sem
import utils

SEM = os.path.join(ROOT, "sem.py")
# the test machine is shared: one torch thread per process is far faster there than two
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
TINY = ["--steps", "4", "--batch_size", "8", "--local_crops", "1", "--prototypes", "32",
        "--head_hidden", "32", "--head_bottleneck", "16", "--L", "4", "--V", "8", "--warmup", "1",
        "--freeze_last", "1", "--teacher_temp_steps", "2"]


def tiny_cfg(**kw):
    return dataclasses.replace(sem.Config(), **{"L": 4, "V": 8, **kw})


#################################################################################
#                               SEM head                                        #
#################################################################################

@pytest.mark.parametrize("L,V", [(32, 4096), (128, 1024), (512, 256), (16, 32)])
def test_sem_head_sizes_groups_sum_to_one(L, V):
    m = sem.SEMViT(tiny_cfg(L=L, V=V, registers=4))
    tokens = torch.randn(2, 5, m.embed_dim)
    p, out = m.sem(tokens, 1.0)
    assert p.shape == (2, L, V) and out.shape == (2, m.embed_dim)
    assert m.sem_embed.weight.shape == (L * V, 5 * m.embed_dim) and m.sem_embed.bias is None
    assert m.sem_out.weight.shape == (m.embed_dim, L * V) and m.sem_out.bias is None
    torch.testing.assert_close(p.sum(-1), torch.ones(2, L))


def test_tau_to_zero_is_one_hot_at_argmax():
    torch.manual_seed(0)
    m = sem.SEMViT(tiny_cfg())
    x = torch.randn(3, 3, 32, 32)
    soft = m(x, tau=1.0)["probs"]
    hard = m(x, tau=1e-5)["probs"]
    onehot = torch.nn.functional.one_hot(soft.argmax(-1), 8).float()
    top2 = soft.topk(2, dim=-1).values
    clear = (top2[..., 0] / top2[..., 1]) > 1.01   # skip exact near-ties (none expected)
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(hard[clear], onehot[clear], atol=1e-4, rtol=0)
    assert not torch.allclose(soft, onehot, atol=1e-2)  # tau = 1 is genuinely soft


#################################################################################
#                   Official DINOv2 key names and shapes                        #
#################################################################################

def official_vits14_reg4():
    """Key -> shape of dinov2_vits14_reg4_pretrain.pth, written from DINOv2's naming
    (https://github.com/facebookresearch/dinov2, vision_transformer.py / layers/block.py)."""
    D, H = 384, 1536
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + 37 * 37, D), "register_tokens": (1, 4, D),
            "mask_token": (1, D), "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,),
            "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                     b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                     b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                     b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,), b + "mlp.fc2.weight": (D, H),
                     b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    return keys


def vits_cfg():
    return tiny_cfg(arch="vit_s", patch=14, pos_grid=37, registers=4, size=224)


def test_vits14_reg4_keys_and_shapes_match_official():
    m = sem.SEMViT(vits_cfg())
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items() if not sem.is_sem_key(k)}
    assert ours == official_vits14_reg4()


def test_official_format_state_dict_loads_strictly(tmp_path):
    sd = {k: torch.randn(s) for k, s in official_vits14_reg4().items()}
    path = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(sd, path)
    m = sem.SEMViT(vits_cfg())
    sem.load_official(m, path)
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v), k
    bad = dict(sd); bad.pop("register_tokens"); bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(SystemExit, match="missing.*register_tokens.*unexpected.*extra.weight"):
        sem.load_official(sem.SEMViT(vits_cfg()), path)


def test_vitg_uses_swiglu_keys():
    blk = sem.Block(1536, 24, "swiglu", 0.0)
    shapes = {k: tuple(v.shape) for k, v in blk.state_dict().items() if k.startswith("mlp.")}
    assert shapes == {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,),
                      "mlp.w3.weight": (1536, 4096), "mlp.w3.bias": (1536,)}


def test_pos_embed_interpolation():
    pos = torch.randn(1, 1 + 37 * 37, 16)
    assert sem.interpolate_pos_embed(pos, 37) is pos
    out = sem.interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 16 * 16, 16) and torch.equal(out[:, 0], pos[:, 0])
    const = torch.ones(1, 1 + 37 * 37, 4)  # a constant field stays constant
    torch.testing.assert_close(sem.interpolate_pos_embed(const, 16), torch.ones(1, 257, 4))


#################################################################################
#                  Losses, centering, teacher, EMA                              #
#################################################################################

def test_dino_loss_and_centering_by_hand():
    t = torch.tensor([[1.0, 0.0]])
    center = torch.tensor([[0.5, 0.0]])
    p = sem.teacher_probs(t, center, 0.5)   # softmax([1, 0]) = [e/(e+1), 1/(e+1)]
    e = np.e
    torch.testing.assert_close(p, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    s = [torch.tensor([[0.0, 0.1]]), torch.tensor([[0.1, 0.0]]), torch.tensor([[0.0, 0.0]])]
    q = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    # pairs (t0,s1), (t1,s0), (t0,s2), (t1,s2), student temp 0.1
    ls = lambda a, b: float(torch.log_softmax(torch.tensor([a, b]) / 0.1, 0)[0])
    expect = -(ls(0.1, 0.0) + ls(0.1, 0.0) + ls(0.0, 0.0) + ls(0.0, 0.0)) / 4
    assert abs(float(sem.dino_loss(s, q, 0.1)) - expect) < 1e-5
    c = torch.tensor([[1.0, 2.0]])
    sem.update_center(c, torch.tensor([[3.0, 0.0], [5.0, 2.0]]), 0.9)
    torch.testing.assert_close(c, torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 1]]))


def test_ibot_and_koleo_by_hand():
    masks = torch.tensor([[True, True, False], [False, False, True]])
    s = torch.zeros(3, 2)
    tp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # uniform student: every patch costs log 2; image weights 1/2, 1/2, 1 -> (log2 + log2) / 2 crops
    assert abs(float(sem.ibot_loss(s, tp, masks, 0.1)) - np.log(2)) < 1e-6
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    d = [np.sqrt(2), np.sqrt(2), np.sqrt(2)]
    assert abs(float(sem.koleo_loss(x)) + np.mean(np.log(d))) < 1e-5


def sinkhorn_reference(logits, temp, iters=2000):
    """Converged Sinkhorn-Knopp in the log domain, float64: the unique P = diag(a) exp(t / temp) diag(b)
    (B x K) with every row summing to 1 and every column to B / K."""
    t = logits.double() / temp
    B, K = t.shape
    f, g = torch.zeros(B, 1, dtype=torch.float64), torch.zeros(1, K, dtype=torch.float64)
    for _ in range(iters):
        g = math.log(B / K) - torch.logsumexp(t + f, 0, keepdim=True)
        f = -torch.logsumexp(t + g, 1, keepdim=True)
    return torch.exp(t + f + g)


def test_sinkhorn_teacher_is_an_even_assignment():
    torch.manual_seed(0)
    B, K, temp = 24, 10, 0.07
    # cosine-like logits that pile most samples onto prototype 0 (the collapse Sinkhorn undoes)
    t = torch.randn(B, K) * 0.3
    t[:, 0] += 0.5
    p = sem.sinkhorn_probs(t, temp, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(B, dtype=p.dtype))          # each sample: a distribution
    assert (p >= 0).all()
    # prototype marginals K * mean_b p[b, k] - 1: plain softmax piles > half the mass on prototype 0
    off = lambda q: float((q.mean(0) * K - 1).abs().max())
    assert off(torch.softmax(t / temp, 1)) > 4
    assert off(p) < 0.15 * off(torch.softmax(t / temp, 1))                      # 3 iterations: >= 6x nearer 1/K
    devs = [off(sem.sinkhorn_probs(t, temp, n)) for n in (1, 2, 3, 10, 30)]
    assert devs == sorted(devs, reverse=True) and devs[-1] < 1e-3                 # and on to uniform
    ref = sinkhorn_reference(t, temp)
    torch.testing.assert_close(ref.sum(1), torch.ones(B, dtype=ref.dtype))
    torch.testing.assert_close(ref.mean(0), torch.full((K,), 1 / K, dtype=ref.dtype))
    torch.testing.assert_close(sem.sinkhorn_probs(t, temp, 300).double(), ref, atol=1e-5, rtol=1e-4)
    # closed form: exp(t / temp) of rank one (t_bk = a_b + c_k) is uniform 1/K after one iteration
    a, c = torch.randn(B, 1), torch.randn(1, K)
    torch.testing.assert_close(sem.sinkhorn_probs((a + c) * temp, temp, 1), torch.full((B, K), 1 / K))
    # a global shift of the logits changes nothing (it cancels in the first normalisation)
    torch.testing.assert_close(sem.sinkhorn_probs(t + 0.5, temp, 3), p)
    assert sem.sinkhorn_probs(torch.zeros(0, K), temp, 3).shape == (0, K)        # no masked patch


SINKHORN_DDP = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import sem
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)
t = torch.randn(24, 10) * 0.3
t[:, 0] += 0.5
n = 8 if r == 0 else 16       # unequal shards, as iBOT's masked patches are
torch.save(sem.sinkhorn_probs(t[:8] if r == 0 else t[8:], 0.07, 3), sys.argv[2] + f"/p{r}.pt")
dist.destroy_process_group()
"""


def test_sinkhorn_over_ranks_equals_one_process(tmp_path):
    """All-reduced sums: two ranks with 8 and 16 samples give the rows of the 24-sample batch."""
    (tmp_path / "sk.py").write_text(SINKHORN_DDP)
    torchrun([str(tmp_path / "sk.py"), ROOT, str(tmp_path)], cwd=tmp_path)
    torch.manual_seed(0)
    t = torch.randn(24, 10) * 0.3
    t[:, 0] += 0.5
    both = torch.cat([torch.load(tmp_path / "p0.pt"), torch.load(tmp_path / "p1.pt")])
    torch.testing.assert_close(both, sem.sinkhorn_probs(t, 0.07, 3))


def test_train_step_sinkhorn_replaces_centering(monkeypatch):
    """--centering sinkhorn: the teacher's CLS (both global crops at once) and masked-patch targets
    come from Sinkhorn-Knopp and no centre moves; the default keeps DINO's EMA centre."""
    cfg = tiny_cfg(batch_size=4, local_crops=1, prototypes=16, head_hidden=16, head_bottleneck=8, n=16, mask_prob=1.0)
    torch.manual_seed(0)
    st, te = sem.Student(cfg), sem.Student(cfg)
    te.load_state_dict(st.state_dict()); te.eval().requires_grad_(False)
    batch = sem.MultiCropSteps(sem.Images(cfg), cfg, 0, 1)[0]
    calls, real = [], sem.sinkhorn_probs
    monkeypatch.setattr(sem, "sinkhorn_probs", lambda t, *a: calls.append(len(t)) or real(t, *a))
    for mode in ("centering", "sinkhorn"):
        centers = {k: torch.zeros(1, 16) for k in ("cls", "patch")}
        calls.clear()
        sem.train_step(st, te, centers, batch, dataclasses.replace(cfg, centering=mode), 0, utils.Dist())
        assert all((c.abs().sum() > 0) == (mode == "centering") for c in centers.values())
        assert calls == ([] if mode == "centering" else [2 * cfg.batch_size, int(batch[2].sum())])


def test_teacher_gets_no_gradient_and_ema_formula():
    cfg = tiny_cfg(batch_size=4, local_crops=1, prototypes=16, head_hidden=16, head_bottleneck=8, n=16)
    torch.manual_seed(0)
    st, te = sem.Student(cfg), sem.Student(cfg)
    te.load_state_dict(st.state_dict()); te.eval().requires_grad_(False)
    batch = sem.MultiCropSteps(sem.Images(cfg), cfg, 0, 1)[0]
    centers = {k: torch.zeros(1, 16) for k in ("cls", "patch")}
    loss, _ = sem.train_step(st, te, centers, batch, cfg, 0, utils.Dist())
    loss.backward()
    assert all(p.grad is None for p in te.parameters())
    assert st.backbone.sem_embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in st.parameters():
            p.add_(1.0)
    before = [p.clone() for p in te.parameters()]
    utils.ema_update(te, st, 0.9)
    for b, a, s in zip(before, te.parameters(), st.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * s)


def test_schedules():
    assert sem.cosine(1.0, 0.0, 0, 10, warmup=2) == 0.0
    assert sem.cosine(1.0, 0.0, 2, 10, warmup=2) == 1.0
    assert abs(sem.cosine(1.0, 0.0, 10, 10, warmup=2)) < 1e-12
    assert abs(sem.cosine(0.992, 1.0, 50, 100) - 0.996) < 1e-9


#################################################################################
#             Resume, torchrun, encoding (sharded), bad input                   #
#################################################################################

def test_resume_equals_uninterrupted_and_encode(tmp_path):
    run_script([SEM, *TINY, "--run", "full", "--ckpt_every", "2"], cwd=tmp_path)
    # a fresh process resumes from the step-2 checkpoint alone (same schedule: --steps 4)
    half = tmp_path / "runs/sem-half/checkpoints"
    half.mkdir(parents=True)
    shutil.copy(tmp_path / "runs/sem-full/checkpoints/ckpt_0000002.pt", half)
    p = run_script([SEM, *TINY, "--run", "half", "--resume"], cwd=tmp_path)
    assert "resumed from" in p.stdout and "step       3 | loss" in p.stdout
    a = utils.load_checkpoint(str(tmp_path / "runs/sem-full/checkpoints/ckpt_0000004.pt"))
    b = utils.load_checkpoint(str(tmp_path / "runs/sem-half/checkpoints/ckpt_0000004.pt"))
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], msg=k)
            assert torch.equal(a[key][k], b[key][k]), (key, k)              # bit-exact on CPU
    for k in a["centers"]:
        assert torch.equal(a["centers"][k], b["centers"][k]), k
    assert_same_optimizer_state(a["opt"], b["opt"])
    log = open(tmp_path / "runs/sem-full/log.txt").read()
    assert "step       4 | loss" in log and "ms/step" in log
    # the cosine schedules keep the length stored in the checkpoint: 2 steps of a 4-step schedule,
    # then --resume --steps 4 (no --schedule) == 4 in one go; a later --steps 5 keeps 4 as well
    run_script([SEM, *TINY, "--run", "sch", "--steps", "2", "--schedule", "4"], cwd=tmp_path)
    p = run_script([SEM, *TINY, "--run", "sch", "--resume"], cwd=tmp_path)
    assert "schedules over 4 steps" in p.stdout
    c = utils.load_checkpoint(str(tmp_path / "runs/sem-sch/checkpoints/ckpt_0000004.pt"))
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], c[key][k]), k
    p = run_script([SEM, *TINY, "--run", "sch", "--resume", "--steps", "5"], cwd=tmp_path)
    assert "schedules over 4 steps" in p.stdout
    assert json.load(open(tmp_path / "runs/sem-sch/config.json"))["schedule"] == 4
    # encode: one process vs a 2-process torchrun shard + merge
    out1, out2 = str(tmp_path / "dlc1"), str(tmp_path / "dlc2")
    enc = [SEM, "encode", "--ckpt", "runs/sem-full", "--n", "64", "--encode_batch", "16"]
    run_script([*enc, "--out", out1, "--continuous"], cwd=tmp_path)
    s1 = utils.load_dlc_set(out1, L=4, V=8)
    assert s1["codes"].shape == (64, 4) and s1["codes"].dtype == np.uint16 and s1["codes"].max() < 8
    e1 = np.load(out1 + "/embeddings.npy")
    assert e1.dtype == np.float16 and e1.shape == (64, 64)
    # sharded vs one process, on a small ImageFolder of 40 PNGs (torchrun's own argparse
    # chokes on "--n", an ambiguous prefix of its options, so no embedded subset here)
    from PIL import Image
    x = ((utils.load_embedded("shapes", n=40)["images"] + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(x):
        os.makedirs(tmp_path / f"folder/c{i % 3}", exist_ok=True)
        Image.fromarray(im).save(tmp_path / f"folder/c{i % 3}/{i:03d}.png")
    dig = [SEM, "encode", "--ckpt", "runs/sem-full", "--data", str(tmp_path / "folder"), "--encode_batch", "8"]
    run_script([*dig, "--out", out1 + "d", "--continuous"], cwd=tmp_path)
    torchrun([*dig, "--out", out2, "--continuous"], cwd=tmp_path)
    d1, d2 = utils.load_dlc_set(out1 + "d"), utils.load_dlc_set(out2)
    assert d1["codes"].shape == (40, 4) and sorted(set(d1["labels"])) == [0, 1, 2]
    np.testing.assert_array_equal(d1["codes"], d2["codes"])
    np.testing.assert_array_equal(d1["labels"], d2["labels"])
    assert open(out1 + "d/index.txt").read() == open(out2 + "/index.txt").read()
    np.testing.assert_allclose(np.load(out1 + "d/embeddings.npy").astype(np.float32),
                               np.load(out2 + "/embeddings.npy").astype(np.float32), atol=1e-2)
    meta = s1["meta"]
    assert meta["data"] == {"name": "shapes", "n": 64, "size": 32, "seed": 0}
    ref = utils.load_embedded(**meta["data"])
    np.testing.assert_array_equal(np.load(out1 + "/attrs.npy"), ref["attrs"].numpy())
    np.testing.assert_array_equal(s1["labels"], ref["labels"].numpy())
    # an L*V that does not match the checkpoint: one line, no set written
    p = run_script([*enc, "--out", str(tmp_path / "bad"), "--L", "8"], cwd=tmp_path, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error:") and "L" in p.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_torchrun_two_process_training(tmp_path):
    # no --run here: torchrun's argparse takes "--run" for an ambiguous prefix of --run-path
    torchrun([SEM, *TINY, "--steps", "2"], cwd=tmp_path)
    ck = utils.load_checkpoint(str(tmp_path / "runs/sem-toy/checkpoints/ckpt_0000002.pt"))
    assert ck["step"] == 2 and "backbone.sem_embed.weight" in ck["model"]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "badimg" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    sd = {k: torch.randn(s) for k, s in official_vits14_reg4().items()}
    torch.save(sd, tmp_path / "vits.pth")
    base = [SEM, "encode", "--arch", "vit_s", "--patch", "14", "--pos_grid", "37", "--size", "28"]
    cases = [([*base, "--ckpt", str(tmp_path / "vits.pth"), "--data", str(tmp_path / "empty")], "no images"),
             ([*base, "--ckpt", str(tmp_path / "vits.pth"), "--data", str(tmp_path / "badimg")], "cannot read image"),
             ([SEM, "--init", str(tmp_path / "missing.pth"), "--steps", "1"], "does not exist"),
             ([SEM, "--mask_mode", "blocks", "--steps", "1"], "unknown --mask_mode"),
             ([SEM, "--centering", "sinkhorn_knopp", "--steps", "1"], "unknown --centering")]
    for i, (args, msg) in enumerate(cases):
        out = str(tmp_path / f"out{i}")
        p = run_script([*args, "--out", out], cwd=tmp_path, check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and last.startswith("error:") and msg in last, p.stderr[-500:]
        assert not os.path.exists(out) and not os.path.exists(tmp_path / "runs/sem-toy/checkpoints")


def test_block_masks_are_blocks_with_dinov2_ratios():
    """iBOT masks as DINOv2 draws them: half the global crops masked, target ratios spread over
    [0.1, 0.5], each mask a union of rectangles, never more than the target."""
    torch.manual_seed(0)
    side, N = 16, 256
    neigh_block, neigh_rand = [], []
    for _ in range(50):
        target = int(torch.randint(10, 128, ()))
        m = sem.block_mask(side, side, target, max_patches=N // 2)
        assert 0.7 * target <= m.sum() <= target
        r = torch.zeros(N, dtype=torch.bool)
        r[torch.randperm(N)[:int(m.sum())]] = True
        for mask, out in ((m, neigh_block), (r.view(side, side), neigh_rand)):
            pairs = (mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum()   # masked 4-neighbour pairs
            out.append(float(pairs) / float(mask.sum()))
    # a block of a x b patches has about 2 masked neighbour pairs per patch; scattered patches far fewer
    assert np.mean(neigh_block) > 1.5 and np.mean(neigh_rand) < 0.8
    masks = sem.ibot_masks(64, side, 0.5, "0.1,0.5", "block")
    counts = masks.sum(1).float()
    assert masks.shape == (64, N) and int((counts > 0).sum()) == 32 and counts.max() <= 0.5 * N
    assert abs(counts[counts > 0].mean() / N - 0.3) < 0.05                       # mean of U(0.1, 0.5)
    scattered = sem.ibot_masks(64, side, 0.5, "0.1,0.5", "random")             # the toy's mode
    assert 0 < int((scattered.sum(1) > 0).sum()) < 64 and scattered.sum(1).max() <= 0.5 * N


#################################################################################
#        The authors' teacher (converted by authors.py): training resumes       #
#################################################################################

def test_convert_then_resume_training(tmp_path):
    torch.save({"teacher": authors_teacher()}, tmp_path / "t.pth")
    (tmp_path / "runs/sem-a/checkpoints").mkdir(parents=True)
    out = tmp_path / "runs/sem-a/checkpoints/ckpt_0000000.pt"
    authors.main(["sem", "--authors", str(tmp_path / "t.pth"), "--out", str(out), "--L", "4", "--V", "8"])
    tiny = list(TINY)
    tiny[tiny.index("--prototypes") + 1] = "24"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sem.main([*tiny, "--steps", "1", "--run", "a", "--resume", "--arch", "toy", "--patch", "8",
                  "--pos_grid", "5", "--size", "40", "--local_size", "24", "--threads", "1"])
    finally:
        os.chdir(cwd)
    assert "resumed from" in open(tmp_path / "runs/sem-a/log.txt").read()
    assert os.path.isfile(tmp_path / "runs/sem-a/checkpoints/ckpt_0000001.pt")


def test_released_sem_teacher_parameter_count_on_meta():
    """Their DinoVisionTransformerWithSEM ViT-L/14 reg4 L512 V256: 1,109,943,296 parameters, of
    which sem_cls_norm (2 x 1024, saved, never used) is dropped by authors.py sem."""
    cfg = sem.Config(**sem.PRESETS["imagenet"])
    with torch.device("meta"):
        m = sem.SEMViT(cfg)
    assert m.pos_embed.is_meta and sum(p.numel() for p in m.parameters()) + 2 * 1024 == 1_109_943_296
