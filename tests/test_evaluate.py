"""evaluate.py: metric mathematics against closed forms, the FID-Inception key layout, the toy
judges' accuracy, the judge / probe / table commands, and bad input."""
import json, os

import numpy as np
import pytest
import torch

import utils
import evaluate as ev

torch.set_num_threads(1)  # why: the tiny judge is slower with threads fighting on a shared CPU


def _main_error(argv):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    return str(e.value)


#################################################################################
#                                   Metrics                                    #
#################################################################################

def test_fid_self_is_zero_and_matches_gaussian_closed_form():
    rng = np.random.RandomState(0)
    x = rng.randn(500, 8) @ rng.randn(8, 8)
    mu, s = ev.gaussian_stats(x)
    assert abs(ev.frechet_distance(mu, s, mu, s)) < 1e-8
    # two Gaussians with diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu1, mu2 = rng.randn(8), rng.randn(8)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # and from samples (ddof-1 covariances), within sampling error
    xa = mu1 + rng.randn(40000, 8) * np.sqrt(a)
    xb = mu2 + rng.randn(40000, 8) * np.sqrt(b)
    assert ev.frechet_distance(*ev.gaussian_stats(xa), *ev.gaussian_stats(xb)) == pytest.approx(closed, rel=0.02)


def test_eigenvalue_and_sqrtm_forms_agree():
    rng = np.random.RandomState(1)
    f1, f2 = rng.randn(300, 64), rng.randn(300, 64) @ rng.randn(64, 64) * 0.3 + 1
    s = (*ev.gaussian_stats(f1), *ev.gaussian_stats(f2))
    assert ev.frechet_distance(*s) == pytest.approx(ev.frechet_distance_sqrtm(*s), rel=1e-6)


def test_too_few_samples_for_full_rank_covariance():
    x = np.random.RandomState(0).randn(10, 32)
    with pytest.raises(SystemExit, match="rank-deficient"):
        ev.gaussian_stats(x)
    mu, s = ev.gaussian_stats(x, allow_low_rank=True)  # the stated fallback: computed, flagged
    assert s.shape == (32, 32) and np.linalg.matrix_rank(s) < 32


def test_vendi_orthogonal_and_identical():
    assert ev.vendi_score(np.eye(7)) == pytest.approx(7, rel=1e-9)
    assert ev.vendi_score(np.eye(5, 20) * 3) == pytest.approx(5, rel=1e-9)   # scale-free: cosine kernel
    assert ev.vendi_score(np.tile([[1.0, 2.0, 3.0]], (9, 1))) == pytest.approx(1, rel=1e-9)
    two = np.concatenate([np.tile([[1.0, 0]], (4, 1)), np.tile([[0, 1.0]], (4, 1))])
    assert ev.vendi_score(two) == pytest.approx(2, rel=1e-9)


def test_precision_recall_known_answers():
    ref = np.arange(10, dtype=float)[:, None] * np.ones((1, 4))          # points on a line
    far = 1000 + np.arange(10, dtype=float)[:, None] * np.ones((1, 4))
    assert ev.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert ev.precision_recall(ref, far) == (0.0, 0.0)
    both = np.concatenate([ref, far])
    assert ev.precision_recall(ref, both) == (0.5, 1.0)   # half the samples are off the data manifold
    assert ev.precision_recall(both, ref) == (1.0, 0.5)   # the samples cover half the data
    # radii are the k-th neighbour (self excluded): end point 0 has neighbours at 1, 2, 3
    assert ev.manifold_radii(ref[:, :1], k=3)[0] == 9.0


def test_inception_score_bounds():
    K = 6
    same = np.tile(np.random.RandomState(0).dirichlet(np.ones(K)), (60, 1))
    assert ev.inception_score(same) == pytest.approx(1.0, abs=1e-6)
    uniform_onehot = np.tile(np.eye(K), (10, 1))                          # every split holds each class once
    assert ev.inception_score(uniform_onehot, splits=10) == pytest.approx(K, rel=1e-6)


#################################################################################
#                 FID-Inception: official key names and shapes                  #
#################################################################################

def official_inception_shapes():
    """Key -> shape of pt_inception-2015-12-05-6726825d.pth, written out from the Inception-v3
    naming (BasicConv2d = conv.weight + bn.{weight,bias,running_mean,running_var}), not from
    the module under test."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for name, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{name}.branch1x1", c, 64, 1, 1), (f"{name}.branch5x5_1", c, 48, 1, 1),
                  (f"{name}.branch5x5_2", 48, 64, 5, 5), (f"{name}.branch3x3dbl_1", c, 64, 1, 1),
                  (f"{name}.branch3x3dbl_2", 64, 96, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{name}.branch_pool", c, pool, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c7, 1, 1),
                  (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", c7, 192, 7, 1),
                  (f"{name}.branch7x7dbl_1", 768, c7, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{name}.branch7x7dbl_5", c7, 192, 1, 7), (f"{name}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for name, c in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{name}.branch1x1", c, 320, 1, 1), (f"{name}.branch3x3_1", c, 384, 1, 1),
                  (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{name}.branch3x3dbl_1", c, 448, 1, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{name}.branch_pool", c, 192, 1, 1)]
    shapes = {}
    for name, cin, cout, kh, kw in convs:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def random_official_state_dict(seed=0):
    """Random tensors under the official names: He-scaled convs and unit batch-norm statistics,
    so activations neither vanish nor explode through 90 layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in official_inception_shapes().items():
        if k.endswith("conv.weight") or k == "fc.weight":
            fan_in = int(np.prod(s[1:]))
            sd[k] = torch.randn(s, generator=g) * (2 / fan_in) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = 1 + 0.1 * torch.rand(s, generator=g)
        else:
            sd[k] = 0.01 * torch.randn(s, generator=g)
    return sd


def test_inception_loads_official_layout_strictly(tmp_path):
    shapes = official_inception_shapes()
    model = ev.FIDInception()
    mine = {k: tuple(v.shape) for k, v in model.net.state_dict().items() if "num_batches_tracked" not in k}
    assert mine == shapes
    sd = random_official_state_dict()
    path = str(tmp_path / ev.INCEPTION_FILE)
    torch.save(sd, path)
    model.load(path)
    assert torch.equal(model.net.fc.weight, sd["fc.weight"])
    imgs = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        pool, spatial, logits = model(imgs)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # pool_3 averages ReLU outputs
    assert (pool[0] - pool[1]).abs().max() > 0 and (spatial[0] - spatial[1]).abs().max() > 0
    bad = dict(sd); bad.pop("Mixed_6d.branch1x1.conv.weight")     # strict: a missing key is an error
    torch.save(bad, path)
    with pytest.raises(SystemExit, match="Missing key"):              # one line, no traceback
        model.load(path)


def test_tf1_bilinear_resize():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    # TF1 (align_corners=False): source = dst * in / out, no half-pixel shift, edge clamped
    y = ev.resize_bilinear_tf1(x, size=4)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    z = torch.rand(1, 3, 299, 299)
    assert torch.allclose(ev.resize_bilinear_tf1(z), z)


#################################################################################
#                        Toy judges and the commands using them                 #
#################################################################################

@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    d = tmp_path_factory.mktemp("judges")
    out = {}
    for data in ("digits", "shapes"):
        path = str(d / f"judge-{data}.pt")
        cfg = ev.JudgeModelConfig(data=data, judge=path)
        model, acc = ev.load_or_train_judge(cfg, log=lambda s: None)
        out[data] = (path, acc)
    return out


def test_digits_judge_accuracy(judges):
    assert judges["digits"][1][0] >= 0.95


def test_shapes_judge_accuracy_per_attribute(judges):
    assert min(judges["shapes"][1]) >= 0.98, judges["shapes"][1]


def test_judge_command_on_real_images(judges, tmp_path):
    """Real held-out-combination images: the judge reads their attributes and calls them novel;
    real training-split images are never novel."""
    path = judges["shapes"][0]
    for name, novel in (("shapes-heldout", 1.0), ("shapes", 0.0)):
        d = utils.load_embedded(name, n=300, seed=3)
        npz = str(tmp_path / f"{name}.npz")
        np.savez(npz, arr_0=utils.to_uint8(d["images"]), attrs=d["attrs"].numpy())
        out = str(tmp_path / name)
        ev.main(["judge", "--samples", npz, "--data", "shapes", "--judge", path, "--out", out])
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert m["acc_shape"] >= 0.97 and m["acc_colour"] >= 0.97 and m["acc_background"] >= 0.97
        assert m["novel_combination_rate"] == pytest.approx(novel, abs=0.03)
        assert m["judge_fid"] >= 0 and 1 <= m["vendi_judge"] <= 300
    held, train = (json.load(open(tmp_path / n / "metrics.json")) for n in ("shapes-heldout", "shapes"))
    assert train["judge_fid"] < held["judge_fid"]    # the reference is the training split
    ev.main(["table", "--inputs", f"{tmp_path}/shapes/metrics.json,{tmp_path}/shapes-heldout/metrics.json",
             "--out", str(tmp_path / "results.md")])
    table = open(tmp_path / "results.md").read()
    assert "judge_fid" in table and "| shapes-heldout |" in table


def test_recombination_by_hand():
    a, b = np.array([0, 1, 2]), np.array([3, 4, 0])                 # differ in all three attributes
    src = np.tile(np.stack([a, b])[None], (6, 1, 1))                # (6, 2, 3)
    pred = np.array([[0, 4, 0],    # shape a, colour b, background b: a recombination
                     [3, 1, 2],    # shape b, colour a, background a: a recombination
                     [0, 1, 2],    # source a itself
                     [3, 4, 0],    # source b itself
                     [1, 4, 0],    # shape from neither source
                     [0, 0, 0]])   # from the sources, but colour == background: no image
    m = ev.recombination(pred, src)
    assert m["recombination_rate"] == pytest.approx(2 / 6) and m["source_copy_rate"] == pytest.approx(2 / 6)


def test_judge_scores_real_recombinations(judges, tmp_path):
    """Real images drawn with attributes recombined from two sources score 1; copies of a source
    score 0 (and count as copies); the valid rate of real images is about 1."""
    path = judges["shapes"][0]
    d = utils.load_embedded("shapes-all", n=300, seed=5)
    at = d["attrs"].numpy()
    other = (at + np.array([1, 1, 1])) % np.array([4, 5, 5])       # differs from `at` in every attribute
    for name, src, rate in (("recomb", np.stack([np.c_[at[:, 0], other[:, 1:]], np.c_[other[:, 0], at[:, 1:]]], 1), 1.0),
                            ("copies", np.stack([at, other], 1), 0.0)):
        npz = str(tmp_path / f"{name}.npz")
        np.savez(npz, arr_0=utils.to_uint8(d["images"]), source_attrs=src)
        ev.main(["judge", "--samples", npz, "--data", "shapes", "--judge", path, "--out", str(tmp_path / name)])
        m = json.load(open(tmp_path / name / "metrics.json"))
        assert m["recombination_rate"] == pytest.approx(rate, abs=0.03), (name, m)
        assert m["source_copy_rate"] == pytest.approx(1 - rate, abs=0.03) and m["valid_rate"] >= 0.97


def test_probe_command(tmp_path):
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 4, 400)
    codes = rng.randint(0, 8, (400, 6))
    codes[:, 2] = labels * 2                                   # position 2 encodes the label
    utils.save_dlc_set(str(tmp_path / "dlc"), codes, {"L": 6, "V": 8}, labels=labels,
                       extra={"embeddings.npy": rng.randn(400, 5).astype(np.float16)})
    ev.main(["probe", "--dlc", str(tmp_path / "dlc"), "--out", str(tmp_path / "probe")])
    m = json.load(open(tmp_path / "probe" / "metrics.json"))
    assert m["probe_dlc_label"] == 1.0 and m["probe_embedding_label"] < 0.5   # noise embeddings: chance


#################################################################################
#                                   Bad input                                  #
#################################################################################

def test_bad_inputs(tmp_path, judges):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    np.savez(a, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(b, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    assert "rank-deficient" in _main_error(["fid", "--samples", a, "--ref", a])   # 4 < 2048, before Inception
    msg = _main_error(["fid", "--samples", a, "--ref", a, "--allow_low_rank", "--inception", str(tmp_path / "none.pth")])
    assert ev.INCEPTION_FILE in msg and "none.pth" in msg and msg.count("\n") == 0
    assert "are (32, 32, 3)" in _main_error(["fid", "--samples", a, "--ref", b])
    from PIL import Image
    os.makedirs(tmp_path / "folder")
    for i, size in enumerate((16, 16, 20)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "folder" / f"{i}.png")
    assert "different sizes" in _main_error(["fid", "--samples", str(tmp_path / "folder"), "--ref", a])
    np.savez(b, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    assert "expected uint8" in _main_error(["fid", "--samples", b, "--ref", b])
    few = str(tmp_path / "few.npz")
    np.savez(few, arr_0=np.zeros((10, 8, 8, 1), np.uint8))
    msg = _main_error(["judge", "--samples", few, "--data", "digits", "--judge", judges["digits"][0], "--out", str(tmp_path / "o")])
    assert "rank-deficient" in msg and not os.path.exists(tmp_path / "o" / "metrics.json")
    assert "trained on 'digits'" in _main_error(["judge", "--samples", few, "--data", "shapes", "--judge", judges["digits"][0]])
    assert "does not exist" in _main_error(["judge", "--samples", str(tmp_path / "missing.npz")])


def test_novelty_command_flags_copies(judges, tmp_path):
    """Samples that are training images sit at distance 0 from the training set: all copies."""
    npz = str(tmp_path / "copies.npz")
    np.savez(npz, arr_0=utils.to_uint8(utils.load_embedded("digits")["images"][:40]))
    out = str(tmp_path / "nov")
    ev.main(["novelty", "--samples", npz, "--data", "digits", "--judge", judges["digits"][0], "--out", out])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["nn_dist_mean"] < 1e-3 * m["nn_dist_train_to_train_mean"] and m["copy_rate"] == 1.0  # float round-off only
    assert os.path.getsize(os.path.join(out, "retrieval.png")) > 1000


def test_position_information_closed_forms():
    """I(c_l; a) from counts: a copy of a uniform attribute carries its entropy log K, a coarsened copy
    log 2, an independent position ~0 (the plug-in bias is (V-1)(K-1) / 2N nats), and a token that
    is a function of two attributes splits between them."""
    rng = np.random.RandomState(0)
    N = 20000
    attrs = np.stack([rng.randint(0, 4, N), rng.randint(0, 5, N)], 1)        # independent, uniform
    codes = np.stack([attrs[:, 0], attrs[:, 1] // 3, rng.randint(0, 16, N),   # copy, coarsened, noise
                      attrs[:, 0] * 5 + attrs[:, 1], np.full(N, 7)], 1)          # the pair: both in full; constant
    info = ev.position_information(codes, attrs)
    p = np.bincount(attrs[:, 1] // 3) / N                                      # H of the coarsened colour
    assert info[0, 0] == pytest.approx(np.log(4), abs=2e-3) and info[0, 1] < 1e-3
    assert info[1, 1] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-9) and info[1, 0] < 1e-3
    assert info[2].max() < 3 * 15 * 4 / (2 * N)
    assert info[3] == pytest.approx([np.log(4), np.log(5)], abs=3e-3)
    assert info[4].max() < 1e-12                                               # a constant token says nothing
    m = ev.position_metrics(codes, attrs, ["shape", "colour"])
    assert m["positions_empty"] == 1                                           # ... dominates nothing, has no purity
    # positions 0 -> shape, 1 and 3 -> colour (log 5 > log 4); the noise position goes either way
    assert m["positions_shape"] + m["positions_colour"] == 4 and m["positions_colour"] in (2, 3)
    assert m["info_shape_max"] == pytest.approx(np.log(4), abs=3e-3)
    # purity: 1 for the two single-attribute copies, log 5 / (log 4 + log 5) for the pair
    assert m["purity"] == pytest.approx((2 + info[2].max() / info[2].sum() + np.log(5) / np.log(20)) / 4, abs=1e-3)


def test_probe_reports_position_information(tmp_path):
    """probe on a shapes DLC set: a code whose positions are the three attributes is pure."""
    d = utils.load_embedded("shapes", n=600)
    attrs = d["attrs"].numpy()
    utils.save_dlc_set(str(tmp_path / "dlc"), attrs, {"L": 3, "V": 5, "data": {"name": "shapes", "n": 600,
                       "size": 32, "seed": 0}})
    ev.main(["probe", "--dlc", str(tmp_path / "dlc"), "--out", str(tmp_path / "probe")])
    m = json.load(open(tmp_path / "probe" / "metrics.json"))
    # not 1: a shape never takes its background's colour, so the colour says a little about the background
    assert m["purity"] > 0.85 and m["info_shape_max"] == pytest.approx(m["info_shape_sum"], rel=0.05)
    assert (m["positions_shape"], m["positions_colour"], m["positions_background"]) == (1, 1, 1)
    assert m["probe_dlc_shape"] == 1.0


def test_sparse_one_hot_probe_equals_dense():
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 3, 300)
    codes = rng.randint(0, 6, (300, 5))
    codes[:, 1] = np.where(rng.rand(300) < 0.8, labels, rng.randint(0, 6, 300))   # a noisy label token
    codes[:, 4] = 2                                                                 # a constant position
    dense, csr = ev.one_hot(codes, 6), ev.one_hot(codes, 6, sparse=True)
    assert np.array_equal(dense, csr.toarray()) and (csr.sum(1) == 5).all() and csr.nnz == 300 * 5
    # the same minimiser (centring only moves the intercept): solved tightly, the same C and accuracies
    a, b = ev.linear_probe(dense, labels, tol=1e-10), ev.linear_probe(csr, labels, tol=1e-10)
    assert a == b and 0.6 < a["acc"] < 1


def test_probe_at_paper_code_size_is_sparse(tmp_path):
    """L = 512, V = 256 (L*V = 131072): a dense float64 one-hot of 400 rows would be 420 MB."""
    import resource
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 4, 400)
    codes = rng.randint(0, 256, (400, 512))
    # positions 0-63 encode the label (one position alone is lost among 131072 standardised
    # columns of which 400 rows see each noise token about twice)
    codes[:, :64] = labels[:, None] * 3
    utils.save_dlc_set(str(tmp_path / "dlc"), codes, {"L": 512, "V": 256}, labels=labels)
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])          # user + system seconds
    rss0, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu()
    ev.main(["probe", "--dlc", str(tmp_path / "dlc"), "--out", str(tmp_path / "probe")])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    m = json.load(open(tmp_path / "probe" / "metrics.json"))
    assert m["probe_dlc_label"] == 1.0 and m["L"] == 512 and m["V"] == 256
    assert grew_mb < 400 and cpu() - t < 60, (grew_mb, cpu() - t)       # the dense one-hot alone: 420 MB


def test_torch_probe_matches_sklearn_probe():
    """The EmbeddingBag probe (no one-hot at all) solves linear_probe's problem: same split and C grid."""
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 3, 300)
    codes = rng.randint(0, 6, (300, 5))
    codes[:, 1] = np.where(rng.rand(300) < 0.8, labels, rng.randint(0, 6, 300))
    ref = ev.linear_probe(ev.one_hot(codes, 6), labels, tol=1e-10)
    got = ev.onehot_probe_torch(codes, 6, labels, epochs=60, batch_size=64)
    assert abs(got["acc"] - ref["acc"]) <= 0.05 and abs(got["val_acc"] - ref["val_acc"]) <= 0.05, (got, ref)
    codes[:, 1] = labels                                            # separable: both perfect
    assert ev.onehot_probe_torch(codes, 6, labels, epochs=20, batch_size=64)["acc"] == 1.0
