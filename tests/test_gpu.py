"""CUDA-only checks, skipped without a GPU (run them with `bash .ci/gpu` on a GPU machine).
They run the real command lines with --device cuda (bf16 autocast, fused SDPA, NCCL under
torchrun with one process) and compare what the GPU path computes with the CPU path."""
import json, os

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, structured_dlc_set, torchrun
import utils

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")]


def script(name):
    return os.path.join(ROOT, name)


def test_sem_train_and_encode_cuda_matches_cpu(tmp_path):
    tiny = ["--steps", "4", "--batch_size", "16", "--local_crops", "2", "--prototypes", "64", "--L", "8", "--V", "16",
            "--warmup", "1", "--freeze_last", "1", "--teacher_temp_steps", "2"]
    p = run_script([script("sem.py"), *tiny, "--device", "cuda", "--run", "g"], cwd=tmp_path)
    assert "step       4 | loss" in p.stdout and "nan" not in p.stdout.lower()
    enc = [script("sem.py"), "encode", "--ckpt", "runs/sem-g", "--n", "256", "--encode_batch", "64", "--continuous"]
    run_script([*enc, "--device", "cuda", "--out", "gpu"], cwd=tmp_path)
    run_script([*enc, "--device", "cpu", "--out", "cpu"], cwd=tmp_path)
    g, c = utils.load_dlc_set(str(tmp_path / "gpu"), L=8, V=16), utils.load_dlc_set(str(tmp_path / "cpu"), L=8, V=16)
    agree = (g["codes"] == c["codes"]).mean()
    assert agree > 0.9, f"bf16 GPU encode agrees with fp32 CPU encode on only {agree:.1%} of tokens"
    eg, ec = (np.load(tmp_path / f"{n}/embeddings.npy").astype(np.float32) for n in ("gpu", "cpu"))
    cos = (eg * ec).sum(1) / np.linalg.norm(eg, axis=1) / np.linalg.norm(ec, axis=1)
    assert cos.min() > 0.99


def test_sedd_sdpa_bf16_close_to_explicit_and_train_sample_cuda(tmp_path):
    import sedd
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 8, 128, 64, device="cuda") for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    structured_dlc_set(tmp_path / "dlc", n=512, L=16, V=32)
    p = run_script([script("sedd.py"), "--dlc", "dlc", "--run", "g", "--steps", "30", "--batch_size", "64",
                    "--eval_every", "30", "--ckpt_every", "30", "--device", "cuda"], cwd=tmp_path)
    assert "held-out loss" in p.stdout and "nan" not in p.stdout.lower()
    run_script([script("sedd.py"), "sample", "--ckpt", "runs/sedd-g", "--n", "100", "--out", "gen",
                "--steps", "64", "--device", "cuda"], cwd=tmp_path)
    s = utils.load_dlc_set(str(tmp_path / "gen"), L=16, V=32)
    assert s["codes"].shape == (100, 16) and s["codes"].max() < 32
    # the model's bf16 forward on CUDA is close to its fp32 forward on the CPU
    ck = utils.load_checkpoint(str(tmp_path / "runs/sedd-g/checkpoints/ckpt_0000030.pt"))
    cfg = ck["config"]
    m = sedd.DDiT(16, 32, cfg["size"], cfg["cond_dim"], 0.0)
    m.load_state_dict(ck["ema"])
    x = torch.randint(33, (8, 16)); sigma = torch.rand(8) + 0.1
    ref = m.eval().raw(x, sigma)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = m.cuda().raw(x.cuda(), sigma.cuda()).float().cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out))
    assert (out[finite] - ref[finite]).abs().max() < 0.1 * (1 + ref[finite].abs().max())


def test_dit_train_sample_compose_cuda(tmp_path):
    from test_dit import make_set
    dlc = make_set(tmp_path / "dlc", n=64, L=8, V=16)
    common = ["--model", "DiT-toy/4", "--image_size", "16", "--batch_size", "32", "--sample_steps", "10",
              "--device", "cuda"]
    p = run_script([script("dit.py"), "train", "--dlc", dlc, "--run", "g", "--steps", "20", "--ckpt_every", "20",
                    "--sample_every", "20", *common], cwd=tmp_path)
    assert "nan" not in p.stdout.lower()
    run_script([script("dit.py"), "train", "--dlc", dlc, "--cond", "embedding", "--run", "e", "--steps", "4",
                "--ckpt_every", "4", "--sample_every", "4", *common], cwd=tmp_path)
    for out in ("a.npz", "b.npz"):   # same seed, same samples
        run_script([script("dit.py"), "sample", "--ckpt", "runs/dit-g", "--dlc", dlc, "--n", "16", "--out", out,
                    "--cfg_scale", "2.0", *common], cwd=tmp_path)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (16, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 2
    run_script([script("dit.py"), "compose", "--ckpt", "runs/dit-g", "--emb_ckpt", "runs/dit-e", "--dlc", dlc,
                "--pairs", "0:1", "--n_per_pair", "4", "--out", "comp.npz", *common], cwd=tmp_path)
    assert os.path.isfile(tmp_path / "comp.npz")


def test_text2dlc_fsdp_nccl_one_rank(tmp_path):
    from conftest import captioned_dlc_set
    from test_text2dlc import tiny_hf_model_dir
    path = tiny_hf_model_dir(tmp_path / "hf")
    dlc = captioned_dlc_set(tmp_path / "dlc", n=64)
    torchrun([script("text2dlc.py"), "--model", "llada", "--model_path", path, "--dlc", dlc, "--steps", "3",
              "--batch_size", "4", "--log_every", "1", "--act_ckpt", "--max_caption", "8", "--ema_decay", "0",
              "--device", "cuda"], nproc=1, cwd=tmp_path)
    log = open(tmp_path / "runs/text2dlc-toy/log.txt").read()
    assert "fsdp=True" in log and "step       3" in log and "nan" not in log.lower()
    run_script([script("text2dlc.py"), "sample", "--ckpt", "runs/text2dlc-toy", "--prompt", "a red square",
                "--num", "4", "--out", "g", "--steps", "2", "--device", "cuda"], cwd=tmp_path)
    assert utils.load_dlc_set(str(tmp_path / "g"), L=8, V=32)["codes"].shape == (4, 8)


def test_toy_gmm_cuda(tmp_path):
    run_script([script("toy_gmm.py"), "--modes=4,16", "--steps=100", "--batch_size=512", "--n_eval=500",
                "--sample_steps=10", "--run=g", "--device=cuda"], cwd=tmp_path)
    res = json.load(open(tmp_path / "runs/toy_gmm-g/results.json"))
    kls = [res[m][v]["kde_kl"] for m in ("4", "16") for v in ("baseline", "uncond", "oracle", "gmm", "disco")]
    assert all(np.isfinite(kls))


def test_inception_features_cuda_match_cpu():
    import evaluate
    torch.manual_seed(0)
    model = evaluate.FIDInception("tf1").eval()
    imgs = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(imgs)
        out = model.cuda()(imgs.cuda())
    for r, o in zip(ref, out):        # pool features, spatial features, logits
        r, o = r.double(), o.double().cpu()
        assert (o - r).norm() / r.norm() < 1e-2
