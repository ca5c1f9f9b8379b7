"""The README's main job, `bash pipeline.sh`, at SCALE=tiny: every script's real command line
chained through its files (about 3 minutes on 2 cores, mostly interpreter start-ups)."""
import json, os, subprocess

import numpy as np

from conftest import ROOT
import utils


def test_pipeline_tiny_end_to_end(tmp_path):
    env = {**os.environ, "SCALE": "tiny", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("RANK", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "runs/pipeline"
    table = open(out / "results.md").read()
    for title in ("## 1. Section 3", "## 2. DiT samples", "## 3. Composition", "## 4. Text", "## 5. Linear probe",
                  "## 6. SEDD", "## Claims"):
        assert title in table
    for row in ("| dlc-sedd (CFG 4) |", "| label (CFG 6) |", "| embedding-generated (CFG 4) |", "| unconditional |",
                "| DLC token mixing |", "| heldout |", "no remasking"):
        assert row in table
    # what each code position carries (table 5): the evidence for the composition and held-out-text claims
    assert "| positions it dominates |" in table and "Mean purity of a position:" in table
    # every claim the pipeline checks has its row with a number, a bar and a verdict
    claims = {}
    for line in table[table.index("## Claims"):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("paper", "---"):
            float(cells[3]); float(cells[4].removeprefix(">= "))          # our number and the bar are numbers
            assert cells[5] in ("yes", "NO")
            claims[cells[1]] = float(cells[3])
    for want in ("off-mode fraction, unconditional / oracle index, N = 64", "off-mode fraction, unconditional / oracle index, N = 256",
                 "unconditional off-mode fraction grows with N", "probe of the one-hot DLC: shape",
                 "probe of the one-hot DLC: colour", "probe of the one-hot DLC: background",
                 "probe: DLC minus continuous embedding, worst attribute", "judge-FID: unconditional / DLC (encoded)",
                 "judge-FID: DLC (SEDD) < unconditional", "judge-FID: DLC (encoded) < DLC (SEDD)",
                 "DLC (encoded) samples keep all 3 attributes of their source", "label-conditioned samples show the requested shape",
                 "DLC (SEDD) samples are valid images", "DLC token mixing: recombination rate",
                 "recombination rate: DLC mixing / embedding averaging", "Vendi: DLC mixing minus embedding averaging",
                 "text -> DLC -> image, held-out prompts, all 3 attributes", "text -> image, held-out minus seen prompts"):
        assert any(k.startswith(want) for k in claims), want
    assert len(claims) == 18
    # remasking on and off: same checkpoint, both sets written with their distance to the encoded codes
    for name, eta in (("dlc-sedd", 0.01), ("dlc-sedd-eta0", 0.0)):
        meta = json.load(open(out / name / "meta.json"))
        assert meta["sampler"]["eta"] == eta
    for fig in ("samples", "compose", "text"):                # the README's figures
        assert (out / f"pipeline_{fig}.png").stat().st_size > 1000
    # the files each step hands to the next
    s = utils.load_dlc_set(str(out / "t2d-heldout"))
    attrs = np.load(out / "t2d-heldout/attrs.npy")
    assert len(attrs) == len(s["codes"]) == 6 * 4
    names = list(utils.COLOURS)
    assert {tuple(a) for a in attrs.tolist()} == {(utils.SHAPES.index(sh), names.index(c), names.index(b))
                                                 for sh, c, b in utils.HELD_OUT}
    emb = np.load(out / "emb-gen.npy")
    assert emb.dtype == np.float16 and emb.shape == (40, np.load(out / "dlc/embeddings.npy").shape[1])
    comp, avg = np.load(out / "s/compose.npz"), np.load(out / "s/compose_embavg.npz")
    assert comp["arr_0"].shape == avg["arr_0"].shape == (6 * 4, 16, 16, 3)
    src = comp["sources"].reshape(6, 2, -1)                 # composed tokens come from the two sources
    for j, codes in enumerate(comp["codes"].reshape(6, 4, -1)):
        assert ((codes == src[j, 0]) | (codes == src[j, 1])).all()
    sa = comp["source_attrs"]                               # (24, 2, 3): sources differ in every attribute
    assert sa.shape == (24, 2, 3) and (sa[:, 0] != sa[:, 1]).all()
    held = np.load(out / "s/compose-heldout.npz")["target_attrs"]
    assert {tuple(a) for a in held.tolist()} == {(utils.SHAPES.index(sh), names.index(c), names.index(b))
                                                for sh, c, b in utils.HELD_OUT}
    # the probe reads its own, larger DLC set (the probe is sample-limited on the training set's 200)
    probe, dlc = json.load(open(out / "eval/probe/metrics.json")), utils.load_dlc_set(str(out / "dlc"))
    assert probe["n"] == len(utils.load_dlc_set(str(out / "dlc-probe"))["codes"]) == 300 != len(dlc["codes"])
    m = json.load(open(out / "eval/text-heldout/metrics.json"))
    assert m["resolution"] == 16 and 0 <= m["acc_all"] <= 1


def run_with_fake_python(tmp_path, body, **env):
    """bash pipeline.sh (SCALE=tiny) with python replaced by a bash stand-in whose body records each
    call in $FAKE_LOG (no work done; exit 0 unless the body exits); returns (the process, the log's path)."""
    log, fake = tmp_path / "calls.txt", tmp_path / "fakepy"
    fake.write_text("#!/usr/bin/env bash\n" + body + "exit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "SCALE": "tiny", "PYTHON": str(fake), "FAKE_LOG": str(log), **env}
    p = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    return p, log


def test_pipeline_passes_an_out_folder_with_a_space_intact(tmp_path):
    """Every command line of pipeline.sh, recorded by a stand-in for python (no work done):
    an OUT holding a space reaches every script as one argument."""
    out = str(tmp_path / "my runs" / "p")
    # one write per call: the pipeline's two lanes call python at the same time
    p, log = run_with_fake_python(tmp_path, 'line=; for a in "$@"; do line+="$a"$\'\\037\'; done\n'
                                            'printf \'%s\\n\' "$line" >> "$FAKE_LOG"\n', OUT=out)
    assert p.returncode == 0, p.stderr[-2000:]
    calls = [l.split("\x1f")[:-1] for l in open(log).read().splitlines()]
    judges = [c for c in calls if "judge" in c]
    assert len(calls) > 20 and len(judges) >= 5
    for c in judges:
        assert c[c.index("--judge") + 1] == out + "/judge.pt" and c[-2:] == ["--data", "shapes"], c
    for c in calls:                                          # no argument split at the space
        assert not any(a.endswith(str(tmp_path / "my")) for a in c), c


def test_pipeline_stops_when_a_step_in_a_lane_fails(tmp_path):
    """A step that fails inside one of the two side-by-side lanes stops the pipeline with one error line
    and a non-zero exit; no later stage (the report) runs."""
    p, log = run_with_fake_python(tmp_path, 'printf \'%s\\n\' "$*" >> "$FAKE_LOG"\n'
                                  'case "$1" in *sedd.py) [ "${2:-}" = sample ] && { echo "boom" >&2; exit 3; } ;; esac\n')
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "error: a step failed" in p.stderr and "boom" in p.stderr
    calls = open(log).read()
    assert "sedd.py sample" in calls and "text2dlc.py" in calls      # both lanes ran up to the failure
    assert "dit.py train --cond label" not in calls                  # lane a stopped at its failed step
    assert " report " not in calls


def test_pipeline_stops_when_the_encoder_fails_beside_section_3(tmp_path):
    """Section 3 runs beside the encoder stage; when the encoder stage fails, the pipeline lets Section 3
    finish (no orphaned job), starts nothing that reads the encoder's files, and stops with one error line."""
    p, log = run_with_fake_python(tmp_path, 'printf \'%s\\n\' "$*" >> "$FAKE_LOG"\n'
                                  'case "$1" in *toy_gmm.py) sleep 2; echo gmm-finished >> "$FAKE_LOG" ;; esac\n'
                                  'case "$1" in *dit.py) [ "${2:-}" = real ] && { echo "no data" >&2; exit 4; } ;; esac\n')
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "error: a step failed" in p.stderr and "no data" in p.stderr
    calls = open(log).read()
    assert "gmm-finished" in calls                                   # Section 3 was waited for, not orphaned
    for later in ("sedd.py", "text2dlc.py", "dit.py train", " report "):
        assert later not in calls, later
