"""Shared test plumbing: the repo root on sys.path, and helpers that run our scripts as a
user would (subprocesses, torchrun) so the tests exercise the real command lines."""
import os, subprocess, sys

import pytest

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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (run through the device tool)")
