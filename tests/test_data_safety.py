"""No command destroys or corrupts data: output folders that are not ours, runs that already
exist, NaN training, tokens outside [0, V), bad meta.json, crash leftovers, fsync, and a
--resume that skips a corrupt newest checkpoint. Tiny in-process runs (torch is imported
once), plus a few subprocesses where the command line itself is what is tested."""
import json, os, subprocess, sys

import numpy as np
import pytest
import torch

import utils
from conftest import ROOT, captioned_dlc_set, run_script
import dit, sedd, sem, text2dlc, toy_gmm

SEDD_TINY = ["--batch_size", "16", "--eval_every", "2", "--warmup", "1", "--ckpt_every", "2"]
DIT_TINY = ["--cond", "dlc", "--model", "DiT-toy/4", "--image_size", "8", "--batch_size", "8", "--sample_steps", "2",
            "--diffusion_steps", "100", "--ckpt_every", "2", "--sample_every", "1000", "--data_n", "64"]
SEM_TINY = ["--batch_size", "8", "--local_crops", "1", "--prototypes", "32", "--head_hidden", "32",
            "--head_bottleneck", "16", "--L", "4", "--V", "8", "--warmup", "1", "--freeze_last", "1",
            "--teacher_temp_steps", "2", "--n", "64", "--ckpt_every", "2"]
T2D_TINY = ["--batch_size", "4", "--d_model", "16", "--n_layers", "1", "--ckpt_every", "2", "--log_every", "1"]
# the test machine is shared: one torch thread per process is far faster there than two
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def fails(fn, args, *words):
    """fn(args) stops with one line "error: ..." holding every word."""
    with pytest.raises(SystemExit) as e:
        fn([str(a) for a in args])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and all(w in msg for w in words), msg
    return msg


def one_line_error(p, *words):
    """A subprocess that failed with exactly one stderr line "error: ...", no traceback."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]


def dead_pid():
    """The PID of a process that has exited (for crash leftovers)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def listing(root):
    """Every file under root with its size and mtime: what a refused command must not change."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def write_raw_set(path, codes, meta):
    """A DLC set written by hand, as a user (or a foreign tool) might: no checks."""
    os.makedirs(path)
    np.save(os.path.join(path, "codes.npy"), np.asarray(codes, dtype=np.uint16))
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write(meta if isinstance(meta, str) else json.dumps(meta))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a captioned DLC set (row-aligned with shapes n=64) and one trained
    checkpoint per sampler: sedd (2 steps), dit (2), sem (2), text2dlc (2)."""
    d = tmp_path_factory.mktemp("safety")
    cwd = os.getcwd(); os.chdir(d)
    try:
        captioned_dlc_set("dlc", n=64, data="shapes-all")
        sedd.main(["--dlc", "dlc", "--run", "a", "--steps", "2", *SEDD_TINY])
        dit.main(["train", "--dlc", "dlc", "--run", "a", "--steps", "2", *DIT_TINY])
        sem.main(["--run", "a", "--steps", "2", *SEM_TINY])
        text2dlc.main(["--dlc", "dlc", "--run", "a", "--steps", "2", *T2D_TINY])
    finally:
        os.chdir(cwd)
    return d


#################################################################################
#       1. --out: never delete what is not ours; --overwrite swaps atomically   #
#################################################################################

def test_out_that_is_not_a_dlc_set_is_refused_and_untouched(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    (tmp_path / "important").mkdir()
    (tmp_path / "important/thesis.tex").write_text("years of work")
    before = listing(work), listing(tmp_path)
    # the reported cases: sample into runs/ (every checkpoint) and into a user's folder
    sample = ["sample", "--ckpt", "runs/sedd-a", "--n", "4", "--steps", "2", "--out"]
    fails(sedd.main, [*sample, "runs"], "not a DLC set")
    fails(sedd.main, [*sample, tmp_path / "important"], "not a DLC set", "thesis.tex")
    fails(text2dlc.main, ["sample", "--ckpt", "runs/text2dlc-a", "--prompt", "a red square on a blue background",
                          "--out", tmp_path / "important"], "not a DLC set")
    fails(sem.main, ["encode", "--ckpt", "runs/sem-a", "--n", "8", "--out", tmp_path / "important/thesis.tex"],
          "not a DLC set")
    # a DLC set with a file of the user's inside is not ours to replace either
    (work / "dlc/notes.txt").write_text("mine")
    try:
        fails(sedd.main, [*sample, "dlc", "--overwrite"], "notes.txt")
    finally:
        os.remove(work / "dlc/notes.txt")
    assert (listing(work), listing(tmp_path)) == before


def test_replacing_a_dlc_set_needs_overwrite_and_is_atomic(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    encode = ["encode", "--ckpt", str(work / "runs/sem-a"), "--out"]   # writes codes, labels, attrs
    sem.main([*encode, "set", "--n", "20"])
    old = np.load("set/codes.npy")
    p = run_script([os.path.join(ROOT, "sem.py"), *encode, "set", "--n", "30"], cwd=tmp_path, check=False)
    one_line_error(p, "--overwrite")                                     # refused before any work
    assert np.array_equal(np.load("set/codes.npy"), old)
    # a crash while the new set is written (here: the third file) leaves the old set whole
    real_save = np.save
    calls = []
    def crashing_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*a, **k)
    monkeypatch.setattr(np, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        sem.main([*encode, "set", "--n", "30", "--overwrite"])
    monkeypatch.setattr(np, "save", real_save)
    assert np.array_equal(utils.load_dlc_set("set")["codes"], old) and sorted(os.listdir()) == ["set"]
    sem.main([*encode, "set", "--n", "30", "--overwrite"])
    new = utils.load_dlc_set("set")
    L = new["meta"]["L"]
    assert new["codes"].shape == (30, L) and sorted(os.listdir()) == ["set"]
    # a crash between the two renames of the swap (old set aside, new not yet in place):
    # the next start puts the old set back and drops the half-swapped new one
    pid = dead_pid()
    os.rename("set", f"set.old-{pid}")
    sem.main([*encode, f"set.tmp-{pid}", "--n", "5"])
    assert utils.load_dlc_set("set")["codes"].shape == (30, L) and sorted(os.listdir()) == ["set"]


#################################################################################
#    2. NaN / inf: training stops before a NaN checkpoint; samplers refuse one  #
#################################################################################

@pytest.mark.parametrize("script", ["sedd", "dit", "sem", "text2dlc"])
def test_nan_loss_stops_training_before_a_checkpoint(work, tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    dlc = str(work / "dlc")
    fn, args = {"sedd": (sedd.main, ["--dlc", dlc, *SEDD_TINY, "--ckpt_every", "1"]),
                "dit": (dit.main, ["train", "--dlc", dlc, *DIT_TINY, "--ckpt_every", "1", "--log_every", "100"]),
                "sem": (sem.main, [*SEM_TINY, "--ckpt_every", "1", "--log_every", "100"]),
                "text2dlc": (text2dlc.main, ["--dlc", dlc, *T2D_TINY, "--ckpt_every", "1", "--warmup", "1"])}[script]
    msg = fails(fn, [*args, "--run", "nan", "--steps", "4", "--lr", "1e30"], "lower --lr")
    assert "step" in msg and ("nan" in msg or "inf" in msg or "NaN" in msg)
    for ck in utils.checkpoints(f"runs/{script}-nan/checkpoints"):     # what was saved is finite
        assert all(torch.isfinite(t).all() for t in utils.load_checkpoint(ck)["model"].values())


def nan_copy(path, out, keys=("ema", "model")):
    ck = utils.load_checkpoint(path)
    for key in keys:
        if ck.get(key):
            name = next(k for k, v in ck[key].items() if v.is_floating_point())
            ck[key][name] = torch.full_like(ck[key][name], float("nan"))
    utils.save_checkpoint(ck, str(out))
    return str(out)


def test_samplers_refuse_non_finite_weights(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    ck = {s: nan_copy(utils.resolve_ckpt(f"runs/{s}-a"), tmp_path / f"{s}.pt") for s in ("sedd", "dit", "sem", "text2dlc")}
    fails(sedd.main, ["sample", "--ckpt", ck["sedd"], "--n", "4", "--steps", "2", "--out", tmp_path / "o"], "NaN")
    fails(dit.main, ["sample", "--ckpt", ck["dit"], "--dlc", "dlc", "--n", "2", "--out", tmp_path / "o.npz"], "NaN")
    fails(dit.main, ["compose", "--ckpt", ck["dit"], "--dlc", "dlc", "--out", tmp_path / "o.npz"], "NaN")
    fails(sem.main, ["encode", "--ckpt", ck["sem"], "--n", "8", "--out", tmp_path / "o"], "NaN")
    fails(text2dlc.main, ["sample", "--ckpt", ck["text2dlc"], "--prompt", "a red square on a blue background",
                          "--out", tmp_path / "o"], "NaN")
    assert sorted(os.listdir(tmp_path)) == sorted(f"{s}.pt" for s in ck)


def test_nonsensical_numbers_refused_at_parse_time(tmp_path):
    p = run_script([os.path.join(ROOT, "dit.py"), "--batch_size", "0", "--cond", "label"], cwd=tmp_path, check=False)
    one_line_error(p, "--batch_size", "positive")
    assert os.listdir(tmp_path) == []
    for fn, args in ((sedd.main, ["--steps", "-3"]), (sem.main, ["--steps", "0"]),
                     (text2dlc.main, ["sample", "--n", "0"]), (sedd.main, ["sample", "--n", "0"]),
                     (toy_gmm.main, ["--batch_size", "0"]), (dit.main, ["sample", "--n", "0"])):
        fails(fn, args, "must be a positive number")


#################################################################################
#          3. A fresh run never mixes into an earlier run's folder              #
#################################################################################

@pytest.mark.parametrize("script", ["sedd", "dit", "sem", "text2dlc", "toy_gmm"])
def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    result = "results.json" if script == "toy_gmm" else "checkpoints/ckpt_0000006.pt"
    os.makedirs(os.path.dirname(f"runs/{script}-x/{result}"), exist_ok=True)
    open(f"runs/{script}-x/{result}", "w").write("an earlier run")
    before = listing(tmp_path)
    fn = {"sedd": sedd.main, "dit": dit.main, "sem": sem.main, "text2dlc": text2dlc.main, "toy_gmm": toy_gmm.main}[script]
    fails(fn, ["--run", "x", "--dlc", "nowhere"] if script in ("sedd", "text2dlc") else ["--run", "x"],
          "--resume", "--overwrite")
    assert listing(tmp_path) == before                                   # refused before any work
    if script != "toy_gmm":
        fails(fn, ["--run", "x", "--resume", "--overwrite"], "one of them")


def test_overwrite_replaces_only_what_the_run_wrote(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--dlc", str(work / "dlc"), "--run", "o", *SEDD_TINY, "--ckpt_every", "1"]
    sedd.main([*args, "--steps", "3"])
    run = tmp_path / "runs/sedd-o"
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints/ckpt_best.pt").write_text("mine too")
    p = run_script([os.path.join(ROOT, "sedd.py"), *args, "--steps", "1"], cwd=tmp_path, check=False)
    one_line_error(p, "--resume", "--overwrite")
    sedd.main([*args, "--steps", "1", "--overwrite"])
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt_0000001.pt", "ckpt_best.pt"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints/ckpt_best.pt").read_text() == "mine too"
    log = (run / "log.txt").read_text()
    assert log.count("sedd: L=") == 1 and "step       3" not in log     # the old run's log is gone
    assert utils.resolve_ckpt(str(run)).endswith("ckpt_0000001.pt")     # ckpt_best.pt is not a step


def test_latest_checkpoint_ignores_other_names(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("ckpt_0000002.pt", "ckpt_0000010.pt", "ckpt_best.pt", "ckpt_final.pt", "ckpt_3.pt.bak", "notes.txt"):
        (ck / name).write_text("x")
    assert utils.latest_checkpoint(str(ck)).endswith("ckpt_0000010.pt")


#################################################################################
#          5. Tokens outside [0, V), and meta.json, checked for every reader    #
#################################################################################

def test_token_out_of_range_is_one_line_for_every_reader(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = utils.load_dlc_set(str(work / "dlc"))
    codes = np.array(good["codes"])
    codes[37, 5] = 32                                                    # == V: not the drop / start token
    bad = write_raw_set("bad", codes, good["meta"])
    for name in ("captions.jsonl", "labels.npy"):
        os.link(work / "dlc" / name, os.path.join(bad, name))
    where = ("row 37 position 5", "token 32")
    fails(dit.main, ["train", "--dlc", bad, *DIT_TINY, "--steps", "1", "--run", "t"], *where)
    fails(text2dlc.main, ["--dlc", bad, *T2D_TINY, "--steps", "1", "--run", "t"], *where)
    fails(sedd.main, ["--dlc", bad, *SEDD_TINY, "--steps", "1", "--run", "t"], *where)
    import evaluate
    fails(evaluate.main, ["probe", "--dlc", bad, "--out", "probe"], *where)
    assert sorted(os.listdir()) == ["bad"]
    p = run_script([os.path.join(ROOT, "dit.py"), "train", "--dlc", bad, *DIT_TINY, "--steps", "1"], check=False,
                   cwd=tmp_path)
    one_line_error(p, *where)


def test_token_check_reads_in_chunks():
    class Recorder(np.ndarray):
        """An array that records the size of every slice read from it (a memmap stand-in)."""
        def __getitem__(self, k):
            out = super().__getitem__(k)
            reads.append(out.size)
            return out
    reads = []
    codes = np.zeros((1000, 8), np.uint16).view(Recorder)
    codes[999, 7] = 9
    with pytest.raises(SystemExit, match="row 999 position 7 holds token 9"):
        utils.check_tokens(codes, 8, "set", chunk=800)
    assert max(reads) <= 800 and len(reads) >= 10


@pytest.mark.parametrize("meta,words", [({"V": 32}, "L"), ([16, 32], "JSON object"),
                                         ({"L": "16", "V": 32}, "'16'"), ({"L": 16, "V": 32.0}, "V"),
                                         ({"L": True, "V": 32}, "L")])
def test_meta_json_must_be_an_object_with_integer_L_and_V(tmp_path, meta, words):
    path = write_raw_set(tmp_path / "s", np.zeros((3, 16)), meta)
    with pytest.raises(SystemExit) as e:
        utils.load_dlc_set(path, L=16)
    assert str(e.value).startswith("error: ") and "meta.json" in str(e.value) and words in str(e.value)


#################################################################################
#     8. Crash leftovers, fsync, and --resume past a corrupt newest checkpoint  #
#################################################################################

def test_atomic_path_fsyncs_file_then_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = str(tmp_path / "ck.pt")
    utils.save_checkpoint({"step": 1}, path)
    pid = os.getpid()
    assert events == [("fsync", f"{path}.tmp-{pid}"), ("replace", path), ("fsync", str(tmp_path))], events


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in (f"ckpt_0000004.pt.tmp-{dead}", f"log.json.tmp-{alive}", "notes.tmp-old", "ckpt_0000002.pt"):
        (ck / name).write_text("x")
    (ck / f"set.tmp-{dead}").mkdir()                                     # a half-written DLC set folder
    utils.save_checkpoint({"step": 6}, str(ck / "ckpt_0000006.pt"))
    assert sorted(os.listdir(ck)) == sorted(["ckpt_0000002.pt", "ckpt_0000006.pt", f"log.json.tmp-{alive}",
                                             "notes.tmp-old"])
    # and at the start of a run, before anything is written there
    (ck / f"ckpt_0000008.pt.tmp-{dead}").write_text("x")
    utils.check_run_dir(str(tmp_path), resume=True, overwrite=False)
    assert not os.path.exists(ck / f"ckpt_0000008.pt.tmp-{dead}")


def test_resume_skips_a_corrupt_newest_checkpoint(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--dlc", str(work / "dlc"), "--run", "r", *SEDD_TINY]
    sedd.main([*args, "--steps", "4"])
    ck4 = "runs/sedd-r/checkpoints/ckpt_0000004.pt"
    ref = torch.load(ck4, weights_only=True)
    with open(ck4, "r+b") as f:                                          # a copy cut short
        f.truncate(os.path.getsize(ck4) // 2)
    capsys.readouterr()
    sedd.main([*args, "--steps", "4", "--resume"])
    out = capsys.readouterr().out
    assert "skipped ckpt_0000004.pt" in out and "resuming from runs/sedd-r/checkpoints/ckpt_0000002.pt" in out
    new = torch.load(ck4, weights_only=True)                             # steps 3-4 replayed exactly
    for key in ("model", "ema"):
        for k in ref[key]:
            assert torch.equal(ref[key][k], new[key][k]), (key, k)
    # nothing loads at all: one line, not a silent fresh start
    for ck in utils.checkpoints("runs/sedd-r/checkpoints"):
        open(ck, "wb").write(b"garbage")
    fails(sedd.main, [*args, "--steps", "6", "--resume"], "no checkpoint", "loads")
