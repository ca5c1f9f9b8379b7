"""Bad input, script by script, as a user types it: every case is a real command line in a
fresh process whose cwd is an empty folder. Each must exit non-zero with exactly one line on
stderr, starting with "error:", no traceback, and create or change no file anywhere (the
case folder, the shared fixtures, the repository). Add a case by adding a row to CASES."""
import os, shutil, subprocess, sys

import numpy as np
import pytest
import torch

from conftest import ROOT, captioned_dlc_set, structured_dlc_set
import dit, evaluate, sedd, sem, text2dlc
import utils
from test_dit import TINY as DIT_TINY, make_set
from test_sem import TINY as SEM_TINY

T2D_TINY = ["--batch_size", "4", "--d_model", "16", "--n_layers", "1"]
FID = "fid --samples {f}/imgs.npz --ref {f}/imgs.npz --allow_low_rank --out o --inception {f}/"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Shared read-only inputs: one tiny trained checkpoint per script, DLC sets, and .pt files
    that load fine but are not a checkpoint of ours."""
    f = tmp_path_factory.mktemp("fixtures")
    cwd, n = os.getcwd(), torch.get_num_threads()
    os.chdir(f)
    torch.set_num_threads(1)
    try:
        structured_dlc_set("sedd_dlc", n=100, L=8, V=16)
        sedd.main(["--dlc", "sedd_dlc", "--run", "t", "--steps", "1", "--batch_size", "8", "--eval_every", "1"])
        make_set(f / "dit_dlc")
        dit.main(["train", "--cond", "dlc", "--dlc", "dit_dlc", *DIT_TINY, "--steps", "1", "--run", "t"])
        dit.main(["train", "--cond", "label", "--data", "shapes", "--data_n", "64", *DIT_TINY, "--steps", "1",
                  "--run", "lab"])
        captioned_dlc_set(f / "t2d_dlc")
        s8 = utils.load_dlc_set(captioned_dlc_set(f / "t2d_dlc_copy"))
        utils.save_dlc_set(str(f / "t2d_l4"), np.asarray(s8["codes"])[:, :4], {"L": 4, "V": 32}, captions=s8["captions"])
        text2dlc.main(["--dlc", "t2d_dlc", "--run", "t", "--steps", "1", *T2D_TINY])
        sem.main([*SEM_TINY, "--steps", "1", "--n", "64", "--run", "t"])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(n)
    torch.save(torch.zeros(3), f / "tensor.pt")
    torch.save({"foo": 1}, f / "foo.pt")
    raw = open(f / "runs/dit-t/checkpoints/ckpt_0000001.pt", "rb").read()
    open(f / "truncated.pt", "wb").write(raw[:len(raw) // 2])
    open(f / "notes.txt", "w").write("not a checkpoint\n")
    lab = utils.load_checkpoint(str(f / "runs/dit-lab/checkpoints/ckpt_0000001.pt"))
    torch.save({k: v for k, v in lab["model"].items() if k != "pos_embed"}, f / "official_missing.pt")
    torch.manual_seed(0)
    torch.save(dit.DiT(**{**lab["model_args"], "model": "DiT-toy/2"}).state_dict(), f / "official_other_size.pt")
    np.savez(f / "empty.npz", arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    np.savez(f / "imgs.npz", arr_0=np.random.RandomState(0).randint(0, 256, (8, 16, 16, 3)).astype(np.uint8))
    os.makedirs(f / "mine")
    open(f / "mine/keep.txt", "w").write("the user's file\n")
    import diffusers                                        # a tiny random VAE of the SD-VAE's layout
    diffusers.AutoencoderKL(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=32).save_pretrained(f / "vae")
    os.makedirs(f / "images/cls")
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(f / "images/cls/0.png")
    return f


def sedd_ck(f): return f"{f}/runs/sedd-t"
def dit_ck(f): return f"{f}/runs/dit-t"
def t2d_ck(f): return f"{f}/runs/text2dlc-t"
def sem_ck(f): return f"{f}/runs/sem-t"


def copy_run(script, run):
    """Setup: copy a fixture run folder into the case folder (resume cases work on runs/ in cwd)."""
    def setup(f, case):
        shutil.copytree(f"{f}/runs/{script}-{run}", case / "runs" / f"{script}-{run}")
    return setup


# (id, script, arguments with {f} = the fixtures folder, words the error line must hold, setup)
CASES = [
    # a valid .pt that is not this script's checkpoint
    ("sedd-sample-tensor", "sedd.py", "sample --ckpt {f}/tensor.pt --n 2 --out o", "Tensor", None),
    ("sedd-sample-foo", "sedd.py", "sample --ckpt {f}/foo.pt --n 2 --out o", "not a sedd.py checkpoint", None),
    ("sedd-sample-dit", "sedd.py", "sample --ckpt {f}/runs/dit-t --n 2 --out o", "dit.py checkpoint", None),
    ("dit-sample-tensor", "dit.py", "sample --ckpt {f}/tensor.pt --n 2 --out o.npz", "Tensor", None),
    ("dit-sample-sedd", "dit.py", "sample --ckpt {f}/runs/sedd-t --n 2 --out o.npz", "sedd.py checkpoint", None),
    ("dit-compose-foo", "dit.py", "compose --ckpt {f}/foo.pt --dlc {f}/dit_dlc --out o.npz", "not a dit.py", None),
    ("t2d-sample-foo", "text2dlc.py", "sample --ckpt {f}/foo.pt --prompt a --out o", "not a text2dlc.py", None),
    ("t2d-sample-sem", "text2dlc.py", "sample --ckpt {f}/runs/sem-t --prompt a --out o", "sem.py checkpoint", None),
    ("sem-encode-tensor", "sem.py", "encode --ckpt {f}/tensor.pt --n 8 --out o", "Tensor", None),
    ("sem-encode-t2d", "sem.py", "encode --ckpt {f}/runs/text2dlc-t --n 8 --out o", "text2dlc.py checkpoint", None),
    ("sem-encode-dit", "sem.py", "encode --ckpt {f}/runs/dit-t --n 8 --out o", "dit.py checkpoint", None),
    ("sem-encode-truncated", "sem.py", "encode --ckpt {f}/truncated.pt --n 8 --out o", "corrupt", None),
    # resuming with another architecture
    ("dit-resume-other-size", "dit.py", "train --cond dlc --dlc {f}/dit_dlc " + " ".join(DIT_TINY)
     + " --model DiT-toy/2 --steps 2 --run t --resume", "does not fit", copy_run("dit", "t")),
    ("sem-resume-other-width", "sem.py", " ".join(SEM_TINY) + " --head_hidden 64 --steps 2 --run t --resume",
     "does not fit", copy_run("sem", "t")),
    ("t2d-resume-other-width", "text2dlc.py", "--dlc {f}/t2d_dlc " + " ".join(T2D_TINY)
     + " --d_model 32 --steps 2 --run t --resume", "does not fit", copy_run("text2dlc", "t")),
    # official DiT files into a strict label model
    ("dit-official-missing-key", "dit.py", "train --cond label --data shapes --data_n 64 " + " ".join(DIT_TINY)
     + " --steps 1 --init_from {f}/official_missing.pt", "pos_embed", None),
    ("dit-official-other-size", "dit.py", "train --cond label --data shapes --data_n 64 " + " ".join(DIT_TINY)
     + " --steps 1 --init_from {f}/official_other_size.pt", "does not fit", None),
    # FID Inception weights that are not the weights
    ("fid-inception-truncated", "evaluate.py", FID + "truncated.pt", "corrupt", None),
    ("fid-inception-text", "evaluate.py", FID + "notes.txt", "could not read", None),
    ("fid-inception-foo", "evaluate.py", FID + "foo.pt", "not a state dict", None),
    # judge inputs
    ("judge-empty-npz", "evaluate.py", "judge --samples {f}/empty.npz --out o", "no images", None),
    ("judge-no-target-attrs", "evaluate.py", "judge --samples {f}/imgs.npz --target_attrs {f}/nope.npy --out o",
     "--target_attrs", None),
    ("judge-no-ref-attrs", "evaluate.py", "judge --samples {f}/imgs.npz --ref_attrs {f}/nope.npy --out o",
     "--ref_attrs", None),
    # nonsensical numbers and shapes
    ("t2d-sample-n0", "text2dlc.py", "sample --ckpt {f}/runs/text2dlc-t --prompt a --n 0 --out o", "--n", None),
    ("t2d-sample-unknown-words", "text2dlc.py", "sample --ckpt {f}/runs/text2dlc-t --prompt zebra --out o",
     "none of its words", None),
    ("t2d-probe-other-L", "text2dlc.py", "probe --dlc {f}/t2d_dlc --ref {f}/t2d_l4", "L=", None),
    ("dit-compose-triple", "dit.py", "compose --ckpt {f}/runs/dit-t --dlc {f}/dit_dlc --pairs 0:1:2 --out o.npz",
     "--pairs", None),
    ("dit-extract-used-folder", "dit.py", "extract --data_path {f}/images --vae {f}/vae --latents {f}/mine",
     "--latents", None),
    ("toy-gmm-bad-modes", "toy_gmm.py", "--modes=4,10", "perfect square", None),
    ("sem-bad-data", "sem.py", "--data no/such/folder --steps 1", "--data", None),
]
if not torch.cuda.is_available():
    CASES.append(("sedd-device-cuda", "sedd.py", "--dlc {f}/sedd_dlc --device cuda --steps 1", "CUDA", None))


def listing(*roots):
    """{path: (size, mtime)} of every file and folder under roots (bytecode caches aside)."""
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", ".git", ".pytest_cache")]
            for name in dirs + files:
                p = os.path.join(d, name)
                st = os.lstat(p)
                out[p] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return out


def assert_one_error_line(p, words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stdout[-1000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and words in lines[0], lines[0]


def run(args, cwd, prefix=()):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *prefix, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name,script,args,words,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(fx, tmp_path, name, script, args, words, setup):
    if setup:
        setup(fx, tmp_path)
    before = listing(tmp_path, fx, ROOT)
    p = run([os.path.join(ROOT, script), *args.format(f=fx).split()], cwd=tmp_path)
    assert_one_error_line(p, words)
    after = listing(tmp_path, fx, ROOT)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:6]


def test_torchrun_bad_input_is_one_line_from_rank_0(fx, tmp_path):
    """Two gloo ranks see the same bad input: one error line (rank 0), no traceback of ours
    (torchrun's launcher still reports the failed job with its own summary)."""
    before = listing(tmp_path, fx, ROOT)
    p = run([os.path.join(ROOT, "sedd.py"), "--dlc", str(fx / "nope"), "--steps", "1"], cwd=tmp_path,
            prefix=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not a DLC set" in errors[0], p.stderr[-3000:]
    assert "sedd.py\", line" not in p.stderr and "SystemExit" not in p.stderr, p.stderr[-3000:]
    assert listing(tmp_path, fx, ROOT) == before


def test_fid_inception_load_refuses_incomplete_or_misshapen_weights(tmp_path):
    """A state dict with the right layout but a missing `fc.bias` or one tensor of the wrong shape:
    one line naming it, no partial load."""
    model = evaluate.FIDInception()
    sd = model.net.state_dict()
    path = str(tmp_path / "inc.pth")
    for change, words in ((lambda d: d.pop("fc.bias"), "fc.bias"),
                          (lambda d: d.__setitem__("fc.weight", torch.zeros(3, 2048)), "fc.weight")):
        bad = dict(sd)
        change(bad)
        torch.save(bad, path)
        with pytest.raises(SystemExit) as e:
            evaluate.FIDInception().load(path)
        msg = str(e.value)
        assert msg.startswith("error: ") and "\n" not in msg and words in msg, msg
