"""Tests for utils.py: config parsing, atomic checkpoints, torchrun, DLC sets, embedded data."""
import json, math, os, textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import utils
from conftest import torchrun


@dataclass
class Cfg:
    steps: int = 10                 # an int
    lr: float = 1e-3                # a float
    name: str = "toy"               # a string
    resume: bool = False            # a bare flag
    modes: list[int] = field(default_factory=lambda: [4, 16])  # a comma list


PRESETS = {"big": {"steps": 1000, "lr": 1e-4}}


# ----------------------------------------------------------------------------- config
def test_config_types_and_forms():
    cfg = utils.parse_config(Cfg, ["--steps=5", "--lr", "0.5", "--resume", "--modes=1,4,9", "--name=x"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.modes, cfg.name) == (5, 0.5, True, [1, 4, 9], "x")
    assert isinstance(cfg.steps, int) and isinstance(cfg.lr, float)
    assert utils.parse_config(Cfg, ["--resume=false"]).resume is False
    assert utils.parse_config(Cfg, []) == Cfg()


def test_config_aliases_for_torchrun():
    @dataclass
    class C:
        run: str = "toy"   # run folder
        n: int = 1         # samples
    assert utils.parse_config(C, ["--run_name=x", "--num", "5"]) == C("x", 5)
    with pytest.raises(SystemExit, match="unknown config key 'num'"):
        utils.parse_config(Cfg, ["--num=5"])                  # no alias without its field


def test_config_presets_then_overrides():
    cfg = utils.parse_config(Cfg, ["--preset", "big", "--steps=7"], PRESETS)
    assert (cfg.steps, cfg.lr) == (7, 1e-4)          # flag wins over preset, preset over default
    cfg = utils.parse_config(Cfg, ["--steps=7", "--preset=big"], PRESETS)
    assert cfg.steps == 7                            # order on the line does not matter


@pytest.mark.parametrize("argv, match", [
    (["--stepz=3"], "unknown config key 'stepz'; valid keys: steps, lr, name, resume, modes"),
    (["--steps=three"], "--steps expects int, got 'three'"),
    (["--resume=maybe"], "--resume expects bool"),
    (["--preset=huge"], "unknown preset 'huge'; valid presets: big"),
    (["steps=3"], "unexpected argument"),
    (["--lr"], "--lr needs a value"),
])
def test_config_errors_are_one_line(argv, match):
    with pytest.raises(SystemExit) as e:
        utils.parse_config(Cfg, argv, PRESETS)
    msg = str(e.value)
    assert msg.startswith("error: ") and match in msg and "\n" not in msg


def test_config_list_values_separated_by_spaces_and_given_keys():
    """`--modes 1 4 9` is `--modes=1,4,9` (a list takes every word up to the next option), and
    given(cfg) names exactly the options written on the line, not the preset's."""
    cfg = utils.parse_config(Cfg, ["--modes", "1", "4", "9", "--preset", "big", "--steps", "3"], PRESETS)
    assert (cfg.modes, cfg.steps, cfg.lr) == ([1, 4, 9], 3, 1e-4)
    assert utils.given(cfg) == {"modes", "steps"} and utils.given(Cfg()) == set()


def test_shared_main_dispatches_and_helps(capsys):
    @dataclass
    class Other:
        out: str = "x"      # where
    calls = []
    commands = {"train": (lambda c: calls.append(("train", c)), Cfg, PRESETS),
                "sample": (lambda c: calls.append(("sample", c)), Other, None)}
    utils.main(commands, "the doc", ["--steps", "3"])                      # no command: the default
    utils.main(commands, "the doc", ["sample", "--out", "y"])
    assert calls == [("train", Cfg(steps=3)), ("sample", Other("y"))]
    assert utils.main(commands, "the doc", ["sample", "--help"]) is None and len(calls) == 2
    help_text = capsys.readouterr().out
    assert help_text.startswith("the doc") and "sample options: --out=x" in help_text and "--steps" not in help_text
    with pytest.raises(SystemExit, match="unknown sub-command 'plot'; use train | sample"):
        utils.main(commands, "", ["plot"])
    with pytest.raises(SystemExit, match="give a sub-command: train | sample"):
        utils.main(commands, "", ["--steps", "3"], default=None)   # evaluate.py: no default command


def test_config_preset_with_unknown_key_is_caught():
    with pytest.raises(SystemExit, match="unknown config key 'width'"):
        utils.parse_config(Cfg, ["--preset=bad"], {"bad": {"width": 3}})


def test_config_json_saved(tmp_path):
    from dataclasses import asdict
    utils.save_json(asdict(Cfg()), str(tmp_path / "run" / "config.json"))
    assert json.load(open(tmp_path / "run" / "config.json"))["modes"] == [4, 16]


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_weights_only_round_trip(tmp_path):
    ckpt = {"model": {"w": torch.randn(3, 4), "b": torch.arange(3)}, "step": 7,
            "config": {"lr": 0.1, "name": "x", "modes": [1, 2]}, "versions": {"torch": torch.__version__},
            "np": np.float32(0.5), "tup": (1, "a")}
    path = str(tmp_path / "ckpt_0000007.pt")
    utils.save_checkpoint(ckpt, path)
    back = utils.load_checkpoint(path)
    assert torch.equal(back["model"]["w"], ckpt["model"]["w"]) and back["step"] == 7
    assert back["config"] == ckpt["config"] and back["model"]["w"].device.type == "cpu"
    assert back["versions"]["torch"] == str(torch.__version__) and back["np"] == 0.5 and back["tup"] == (1, "a")


def test_atomic_save_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    utils.save_checkpoint({"v": torch.tensor(1)}, path)

    def crash(*a, **k):
        raise OSError("simulated crash between write and rename")
    monkeypatch.setattr(utils.os, "replace", crash)
    with pytest.raises(OSError):
        utils.save_checkpoint({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path)["v"].item() == 1          # the old file is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]                   # and no temporary is left


def test_atomic_save_crash_during_write_keeps_old_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    utils.save_checkpoint({"v": torch.tensor(1)}, path)
    with pytest.raises(Exception):
        utils.save_checkpoint({"v": lambda: 0}, path)            # cannot be pickled half way
    assert utils.load_checkpoint(path)["v"].item() == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        utils.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        utils.load_checkpoint(str(tmp_path / "bad.pt"))


def test_latest_checkpoint_and_resolve(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    assert utils.latest_checkpoint(str(ck)) is None
    for s in (5, 100, 20):
        utils.save_checkpoint({"step": s}, str(ck / f"ckpt_{s:07d}.pt"))
    assert utils.latest_checkpoint(str(ck)).endswith("ckpt_0000100.pt")
    assert utils.resolve_ckpt(str(tmp_path / "run")).endswith("ckpt_0000100.pt")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no checkpoints"):
        utils.resolve_ckpt(str(tmp_path / "empty"))


def test_ema_update_formula():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    utils.ema_update(ema, model, 0.9)
    for b, pe, pm in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(pe, 0.9 * b + 0.1 * pm.detach())


# ----------------------------------------------------------------------------- distributed
def test_single_process_setup_and_rank_aware_seed():
    d = utils.setup_dist("cpu")
    assert (d.rank, d.world, d.main, d.device.type) == (0, 1, True, "cpu")
    assert utils.seed_all(3, utils.Dist(rank=1, world=4)) == 13


def test_torchrun_two_process_allreduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist, utils
        d = utils.setup_dist("cpu")
        x = torch.tensor([float(d.rank + 1)])
        dist.all_reduce(x)
        utils.print0(f"world={d.world} sum={x.item()}")
        utils.cleanup_dist()
    """))
    p = torchrun([str(script)], nproc=2, timeout=240)
    assert "world=2 sum=3.0" in p.stdout


def test_main_frees_ddp_and_the_group_before_exit(tmp_path):
    """A sub-command leaves a DDP model in a reference cycle (as a trainer's closures do). When
    utils.main returns, the wrapper must be collected and the process group destroyed, so that
    neither is left to the interpreter's shutdown (where gloo's threads can abort a good run)."""
    script = tmp_path / "ddp_cycle.py"
    script.write_text(textwrap.dedent("""
        import dataclasses, gc, torch, torch.distributed as dist, utils
        from torch.nn.parallel import DistributedDataParallel as DDP
        gc.disable()                                      # only utils.main may collect the cycle

        @dataclasses.dataclass
        class Cfg:
            steps: int = 2                                # training steps of the tiny model

        def train(cfg):
            d = utils.setup_dist("cpu")
            model = DDP(torch.nn.Linear(3, 1))
            model.self_ref = [model]                      # a cycle: refcounting alone never frees it
            for _ in range(cfg.steps):
                model(torch.randn(4, 3)).sum().backward()

        utils.main({"train": (train, Cfg, None)}, "doc", [])
        alive = sum(isinstance(o, DDP) for o in gc.get_objects())
        utils.print0(f"group={dist.is_initialized()} ddp_alive={alive}")
    """))
    p = torchrun([str(script)], nproc=2, timeout=240)
    assert "group=False ddp_alive=0" in p.stdout


def test_logger_writes_log_txt(tmp_path, capsys):
    log = utils.Logger(str(tmp_path / "run"), utils.Dist())
    log("step 1 loss 0.5")
    assert "step 1 loss 0.5" in open(tmp_path / "run" / "log.txt").read()
    assert "step 1 loss 0.5" in capsys.readouterr().out
    quiet = utils.Logger(str(tmp_path / "run2"), utils.Dist(rank=1, world=2))
    quiet("hidden")
    assert not os.path.exists(tmp_path / "run2" / "log.txt")


# ----------------------------------------------------------------------------- DLC sets
def test_dlc_set_round_trip_and_checks(tmp_path):
    codes = np.random.RandomState(0).randint(0, 8, size=(5, 4))
    out = str(tmp_path / "set")
    utils.save_dlc_set(out, codes, {"L": 4, "V": 8}, labels=[0, 1, 2, 3, 4],
                       captions=["a"] * 5, index=range(5), extra={"embeddings.npy": np.ones((5, 3), np.float16)})
    s = utils.load_dlc_set(out, L=4, V=8)
    assert s["codes"].dtype == np.uint16 and isinstance(s["codes"], np.memmap)
    assert np.array_equal(s["codes"], codes) and s["meta"]["N"] == 5 and s["captions"] == ["a"] * 5
    assert s["labels"].dtype == np.int64 and os.path.isfile(os.path.join(out, "embeddings.npy"))
    with pytest.raises(SystemExit, match="has L=4 but the model expects L=5"):
        utils.load_dlc_set(out, L=5)
    with pytest.raises(SystemExit, match="has V=8 but the model expects V=9"):
        utils.load_dlc_set(out, V=9)


def test_dlc_set_bad_input_writes_nothing(tmp_path):
    out = str(tmp_path / "bad")
    with pytest.raises(SystemExit, match="outside"):
        utils.save_dlc_set(out, np.array([[0, 8]]), {"L": 2, "V": 8})      # a token >= V
    with pytest.raises(SystemExit, match="expected"):
        utils.save_dlc_set(out, np.zeros((3, 3)), {"L": 2, "V": 8})        # wrong L
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit, match="not a DLC set"):
        utils.load_dlc_set(str(tmp_path))
    utils.save_dlc_set(out, np.zeros((0, 2)), {"L": 2, "V": 8})
    with pytest.raises(SystemExit, match="empty"):
        utils.load_dlc_set(out)


# ----------------------------------------------------------------------------- embedded data
def test_shapes_deterministic_and_well_formed():
    a, b = utils.make_shapes(64, size=16, seed=3), utils.make_shapes(64, size=16, seed=3)
    assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert not torch.equal(a["images"], utils.make_shapes(64, size=16, seed=4)["images"])
    x = a["images"]
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    names = list(utils.COLOURS)
    for (s, c, bg), cap in zip(a["attrs"].tolist(), a["captions"]):
        assert cap == f"a {names[c]} {utils.SHAPES[s]} on a {names[bg]} background" and c != bg
    # the background colour fills the corners; the shape colour is present
    palette = torch.tensor(list(utils.COLOURS.values())) / 127.5 - 1
    for i in range(8):
        s, c, bg = a["attrs"][i].tolist()
        torch.testing.assert_close(x[i, :, 0, 0], palette[bg])
        assert ((x[i] - palette[c][:, None, None]).abs().sum(0) < 1e-5).sum() > 4


def test_shapes_areas_match_their_closed_forms():
    """At 256 px each shape covers k r^2 pixels, r in [0.30, 0.34] of the side: circle pi, square 4
    (half-side r), triangle 1.62 (height 1.8 r, base 1.8 r), cross 2.31 (two 0.7 r x 2 r bars)."""
    d = utils.make_shapes(200, size=256, seed=0, split="all")
    palette = torch.tensor(list(utils.COLOURS.values())) / 127.5 - 1
    k = {"circle": math.pi, "square": 4.0, "triangle": 1.62, "cross": 2.31}
    for x, (s, c, _) in zip(d["images"], d["attrs"].tolist()):
        frac = float(((x - palette[c][:, None, None]).abs().sum(0) < 1e-5).float().mean())
        lo, hi = k[utils.SHAPES[s]] * 0.30 ** 2, k[utils.SHAPES[s]] * 0.34 ** 2
        assert lo * 0.99 <= frac <= hi * 1.01, (utils.SHAPES[s], frac, lo, hi)


def test_shapes_held_out_exclusion():
    names = list(utils.COLOURS)
    held = {(utils.SHAPES.index(s), names.index(c), names.index(b)) for s, c, b in utils.HELD_OUT}
    train = {tuple(t) for t in utils.make_shapes(3000, size=8, split="train")["attrs"].tolist()}
    only = {tuple(t) for t in utils.make_shapes(300, size=8, split="heldout")["attrs"].tolist()}
    every = {tuple(t) for t in utils.make_shapes(3000, size=8, split="all")["attrs"].tolist()}
    assert not (train & held) and only == held and held <= every
    for k, n in enumerate((len(utils.SHAPES), len(names), len(names))):   # every value still seen
        assert {t[k] for t in train} == set(range(n))
    with pytest.raises(SystemExit, match="unknown shapes split"):
        utils.make_shapes(4, split="test")
    assert set(utils.shape_combinations("train")) == every - held and len(every) == 4 * 5 * 4   # 80 combinations


def test_digits_and_unknown_dataset():
    d = utils.load_embedded("digits")
    assert d["images"].shape == (1797, 1, 8, 8) and d["images"].min() == -1 and d["images"].max() == 1
    assert d["labels"].tolist()[:3] == [0, 1, 2]
    with pytest.raises(SystemExit, match="unknown embedded dataset"):
        utils.load_embedded("cifar")


# ----------------------------------------------------------------------------- mixed precision
def explicit_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V in float64: the reference of utils.attention."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def test_attention_matches_explicit_and_stays_fp32_under_cpu_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    ref = explicit_attention(q, k, v)
    assert torch.allclose(utils.attention(q, k, v).double(), ref, atol=1e-5)
    # under CPU autocast plain SDPA runs in bf16 (about 1e-2 off); utils.attention keeps fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = utils.attention(q, k, v)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert plain.dtype == torch.bfloat16 and (plain.double() - ref).abs().max() > 1e-3
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    out.sum().backward()                                                   # the gradient is fp32 as well
    (gq,) = torch.autograd.grad(ref.sum(), q)
    assert torch.allclose(q.grad, gq, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):                      # bf16 in, bf16 out
        assert utils.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


def test_autocast_only_where_bf16_is_fast(monkeypatch):
    for amx, avx512_bf16 in ((True, False), (False, True), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        fast = amx or avx512_bf16                                          # either instruction set multiplies bf16
        assert utils.fast_bf16("cpu") is fast
        with utils.autocast("cpu"):
            assert torch.is_autocast_enabled("cpu") is fast
            y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == (torch.bfloat16 if fast else torch.float32)
        with utils.autocast("cpu", enabled=False):                         # a config's --bf16=false
            assert not torch.is_autocast_enabled("cpu")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")              # an older torch: fp32
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert utils.fast_bf16("cpu") is False and utils.fast_bf16("meta") is False
