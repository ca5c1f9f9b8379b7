"""paper.sh at SCALE=tiny: each paper result's chain of real command lines (tiny models trained
here for 2 steps, untrained Inception, a reference batch sampled from the tiny DiT), checking
that every result file exists and holds numbers. Numbers are meaningless at this size."""
import json, math, os, subprocess

import numpy as np
import pytest

from conftest import ROOT
import utils


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """Run `SCALE=tiny bash paper.sh ARGS` in one folder (the tiny models are trained once)."""
    cwd = tmp_path_factory.mktemp("paper")
    env = {**os.environ, "SCALE": "tiny", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("RANK", None)

    def run(*args, check=True):
        p = subprocess.run(["bash", os.path.join(ROOT, "paper.sh"), *args], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=900)
        if check:
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p
    run.out = cwd / "runs/paper"
    run.cwd = cwd
    return run


def number(path, key):
    v = json.load(open(path))[key]
    assert isinstance(v, (int, float)) and math.isfinite(v), (path, key, v)
    return v


def test_table1(paper):
    paper("table1")
    o = paper.out / "table1"
    for row, eta in (("no-guidance", 0.01), ("cfg-1.7", 0.0)):
        number(o / row / "metrics.json", "fid")
        assert json.load(open(o / row / "dlc/meta.json"))["sampler"]["eta"] == eta
    table = open(o / "table1.md").read()
    assert "| no-guidance |" in table and "| cfg-1.7 |" in table


def test_fig8(paper):
    paper("fig8")
    o = paper.out / "fig8"
    assert (o / "fig8.png").stat().st_size > 1000
    rows = open(o / "fig8.md").read().strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "0.01"]
    for r, eta in zip(rows, ("0", "0.01")):
        assert float(r.split("|")[2]) == pytest.approx(number(o / f"eta-{eta}/metrics.json", "fid"), rel=1e-3)
        assert json.load(open(o / f"eta-{eta}/dlc/meta.json"))["sampler"]["eta"] == float(eta)


def test_fig5(paper):
    paper("fig5")
    o = paper.out / "fig5"
    s = utils.load_dlc_set(str(o / "dlc-4x8"), L=4, V=8)      # trained at L x V = 4 x 8 end to end
    assert len(s["codes"]) == 48
    number(o / "4x8/metrics.json", "fid")
    assert "| 4x8 |" in open(o / "fig5.md").read()


def test_table3(paper):
    paper("table3")
    m = paper.out / "table3/metrics.json"
    for key in ("probe_dlc_shape", "probe_embedding_shape"):
        assert 0 <= number(m, key) <= 1


def test_compose_two_image_files(paper):
    from PIL import Image
    d = utils.make_shapes(2, 32, seed=3)
    files = []
    for i, img in enumerate(d["images"]):
        f = paper.cwd / f"img{i}.jpg"
        Image.fromarray(((img.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(f)
        files.append(str(f))
    paper("compose", *files)
    c = np.load(paper.out / "compose/compose.npz")
    assert c["arr_0"].shape == (2, 16, 16, 3) and c["arr_0"].dtype == np.uint8
    a, b = utils.load_dlc_set(str(paper.out / "compose/dlc"))["codes"]
    assert ((c["codes"] == a) | (c["codes"] == b)).all()            # every token from one of the two images
    p = paper("compose", files[0], check=False)
    assert p.returncode == 2 and "two image files" in p.stderr


def test_text_to_image(paper):
    paper("text", "a red square on a green background")
    s = utils.load_dlc_set(str(paper.out / "text/dlc"))
    assert s["meta"]["prompt"] == "a red square on a green background" and len(s["codes"]) == 2
    x = np.load(paper.out / "text/samples.npz")["arr_0"]
    assert x.shape == (2, 16, 16, 3)
    p = paper("nonsense", check=False)
    assert p.returncode == 2 and "unknown result" in p.stderr
