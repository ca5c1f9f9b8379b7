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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (run through the device tool)")
