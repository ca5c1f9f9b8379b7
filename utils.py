"""The one shared import: config, distributed setup, logging, checkpoints, EMA, DLC-set I/O
and the embedded datasets. Everything a model is made of lives in the script of its paper
section; this file only holds infrastructure that every script needs in the same form.
"""
import dataclasses, json, os, shutil, time, typing
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def fail(msg):
    """Stop with one clear line on stderr (exit code 1). Used for every kind of bad input."""
    raise SystemExit(f"error: {msg}")


#################################################################################
#                  Config: dataclass defaults + presets + --key=value           #
#################################################################################

def _convert(name, typ, text):
    """Parse the command-line string `text` into the type annotated on the dataclass field."""
    if typ is None:  # not a field: parse_config reports the unknown key
        return text
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"): return True
            if text.lower() in ("0", "false", "no", "off"): return False
            raise ValueError
        if origin in (list, tuple):  # comma separated: --modes=4,16,64
            inner = typing.get_args(typ)[0]
            return origin(inner(v) for v in text.split(",") if v != "")
        return typ(text)
    except ValueError:
        fail(f"--{name} expects {getattr(typ, '__name__', typ)}, got {text!r}")


# torchrun's own parser takes `--run=...` and `--n ...` for abbreviations of its options
# (--run-path, --nnodes), even after the script name; these spellings get through it.
ALIASES = {"run_name": "run", "num": "n"}


def parse_config(cls, argv, presets=None):
    """Build a `cls` dataclass from `--preset NAME` then `--key=value` / `--key value` / `--flag`.

    Presets are named dicts of overrides applied first; later flags win. Unknown keys and
    values of the wrong type stop with one line listing what is valid."""
    presets = presets or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # a bare separator (torchrun strips it only right after the script)
            i += 1
            continue
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}; options look like --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = ALIASES[key] if key in ALIASES and ALIASES[key] in fields else key
        if not eq:  # --flag (bool) or --key value
            if key in fields and hints[key] is bool:
                val = "true"
            elif i + 1 < len(argv):
                i, val = i + 1, argv[i + 1]
            else:
                fail(f"--{key} needs a value")
        pairs.append((key, val))
        i += 1
    values = {}
    for key, val in pairs:  # the preset first, wherever it stands on the line
        if key == "preset":
            if val not in presets:
                fail(f"unknown preset {val!r}; valid presets: {', '.join(presets) or 'none'}")
            values.update(presets[val])
    values.update((k, _convert(k, hints.get(k), v)) for k, v in pairs if k != "preset")
    for key in values:
        if key not in fields:
            fail(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
    return cls(**values)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)


#################################################################################
#                         Distributed: torchrun or one process                  #
#################################################################################

@dataclass
class Dist:
    rank: int = 0          # global rank of this process
    local_rank: int = 0    # rank on this machine (selects the GPU)
    world: int = 1         # number of processes
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_dist(device="auto"):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: then NCCL on cuda:LOCAL_RANK, gloo on CPU.
    Without them: one process on the best available device."""
    if "RANK" not in os.environ:
        d = Dist(device=pick_device(device))
    else:
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        dev = pick_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        d = Dist(rank, local, world, dev)
    if d.device.type == "cuda":  # TF32 matmuls: free speed on Ampere+ (DiT trains in TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return d


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def seed_all(seed, d):
    """Rank-aware seed (seed * world + rank): every process draws different noise."""
    s = seed * d.world + d.rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    return s


class Logger:
    """Rank 0 prints and appends to run_dir/log.txt; other ranks stay silent."""
    def __init__(self, run_dir, d):
        self.path = os.path.join(run_dir, "log.txt") if (run_dir and d.main) else None
        self.main = d.main
        if self.path:
            os.makedirs(run_dir, exist_ok=True)

    def __call__(self, msg):
        if not self.main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


#################################################################################
#                Atomic files, checkpoints, EMA (plain dicts of tensors)        #
#################################################################################

@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds,
    so a crash never leaves a half-written file (the old one, if any, stays intact)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _plain(obj):
    """Plain Python types only, so `torch.load(weights_only=True)` accepts the file
    (e.g. torch.__version__ is a str subclass that the safe unpickler refuses)."""
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(obj, path):
    with atomic_path(path) as tmp:
        torch.save(_plain(obj), tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; pass the path of a .pt file written by train")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:80]}); is it corrupt?")


def check_layout(want, got, what):
    """Stop with one line unless the state dict `got` has exactly the keys and shapes of `want`
    (a converter's check that every weight is consumed and none of ours is left at its init)."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if tuple(want[k].shape) != tuple(got[k].shape))
    if missing or unexpected or bad:
        fail(f"{what}: unexpected keys {unexpected[:6]}, missing keys {missing[:6]}, wrong shapes {bad[:4]}")


def resolve_ckpt(path):
    """`--ckpt` takes a checkpoint file or a run folder (then its newest checkpoint)."""
    if os.path.isdir(path):
        found = latest_checkpoint(os.path.join(path, "checkpoints"))
        if found is None:
            fail(f"run folder {path} has no checkpoints/ckpt_<step>.pt; train first or pass a .pt file")
        return found
    return path


def latest_checkpoint(ckpt_dir):
    """Newest `ckpt_<step>.pt` in ckpt_dir, or None (for --resume)."""
    if not os.path.isdir(ckpt_dir):
        return None
    names = [n for n in os.listdir(ckpt_dir) if n.startswith("ckpt_") and n.endswith(".pt")]
    return os.path.join(ckpt_dir, max(names, key=lambda n: int(n[5:-3]))) if names else None


def unwrap(model):
    """The bare module under DDP / FSDP-free wrappers and torch.compile (for state dicts)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters only; buffers are copied."""
    for pe, pm in zip(ema.parameters(), unwrap(model).parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1 - decay)
    for be, bm in zip(ema.buffers(), unwrap(model).buffers()):
        be.copy_(bm)


#################################################################################
#                       Speed: measured matmul peak and memory                  #
#################################################################################

def matmul_peak_flops(device, dtype=torch.float32, n=None, iters=10):
    """FLOP/s of a large square matmul on `device` (best of 3 timings): the denominator of
    every MFU we report. GPUs need n = 8192 to reach their peak (1024 gives a tenth of it)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * iters / best


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    """Peak allocated memory on CUDA, else the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#################################################################################
#          DLC sets: codes.npy uint16 [N, L] + meta.json (+ labels / captions)  #
#################################################################################

def save_dlc_set(out, codes, meta, labels=None, captions=None, index=None, extra=None):
    """Write a DLC set folder atomically (a temporary folder renamed at the end).
    `extra` maps file names to numpy arrays (e.g. {"embeddings.npy": float16 [N, D]})."""
    codes = np.asarray(codes)
    V = int(meta["V"])
    if codes.ndim != 2 or codes.shape[1] != int(meta["L"]):
        fail(f"codes have shape {codes.shape}, expected [N, L={meta['L']}]")
    if codes.size and (codes.min() < 0 or codes.max() >= V):
        fail(f"codes hold values outside [0, V={V}); refusing to write {out}")
    with atomic_path(out) as tmp:
        os.makedirs(tmp)
        np.save(os.path.join(tmp, "codes.npy"), codes.astype(np.uint16))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "N": len(codes)}, f, indent=2)
        if labels is not None:
            np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))
        if captions is not None:
            with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
                f.writelines(json.dumps(c) + "\n" for c in captions)
        if index is not None:
            with open(os.path.join(tmp, "index.txt"), "w") as f:
                f.writelines(f"{i}\n" for i in index)
        for name, arr in (extra or {}).items():
            np.save(os.path.join(tmp, name), arr)
        if os.path.isdir(out):  # replace an older set with the same name
            shutil.rmtree(out)


def load_dlc_set(path, L=None, V=None):
    """Read a DLC set; check L and V against the caller's model. Returns a dict with
    codes (memory-mapped uint16 [N, L]), meta, and labels / captions when present."""
    mpath, cpath = os.path.join(path, "meta.json"), os.path.join(path, "codes.npy")
    if not (os.path.isfile(mpath) and os.path.isfile(cpath)):
        fail(f"{path} is not a DLC set (needs codes.npy and meta.json); make one with sem.py encode")
    try:
        meta = json.load(open(mpath))
        codes = np.load(cpath, mmap_mode="r")
    except Exception as e:
        fail(f"DLC set {path} is corrupt ({type(e).__name__}); re-run the command that wrote it")
    if codes.ndim != 2 or len(codes) == 0:
        fail(f"DLC set {path} is empty or not [N, L] (shape {codes.shape})")
    if codes.shape[1] != meta["L"]:
        fail(f"DLC set {path}: codes.npy has L={codes.shape[1]} but meta.json says L={meta['L']}")
    if L is not None and meta["L"] != L:
        fail(f"DLC set {path} has L={meta['L']} but the model expects L={L}; use a matching set or model")
    if V is not None and meta["V"] != V:
        fail(f"DLC set {path} has V={meta['V']} but the model expects V={V}; use a matching set or model")
    out = {"codes": codes, "meta": meta}
    if os.path.isfile(os.path.join(path, "labels.npy")):
        out["labels"] = np.load(os.path.join(path, "labels.npy"))
    if os.path.isfile(os.path.join(path, "captions.jsonl")):
        out["captions"] = [json.loads(l) for l in open(os.path.join(path, "captions.jsonl"))]
    return out


#################################################################################
#               Embedded data: scikit-learn digits and procedural shapes        #
#################################################################################

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190)}
# (shape, colour, background) combinations never shown to the image / text models in the
# default "shapes" split; every single attribute value still appears in training.
HELD_OUT = (("triangle", "red", "blue"), ("circle", "green", "purple"), ("square", "yellow", "red"),
            ("cross", "blue", "yellow"), ("circle", "purple", "green"), ("triangle", "yellow", "green"))


def caption(shape, colour, background):
    return f"a {colour} {shape} on a {background} background"


def make_shapes(n, size=32, seed=0, split="train"):
    """Procedural, seeded shapes: `split` is "train" (held-out combinations excluded),
    "heldout" (only those) or "all". Returns images float [N, 3, S, S] in [-1, 1] and
    attrs int64 [N, 3] = (shape, colour, background) indices, labels = shape, captions."""
    rng = np.random.RandomState(seed)
    names = list(COLOURS)
    held = {(SHAPES.index(s), names.index(c), names.index(b)) for s, c, b in HELD_OUT}
    combos = [(s, c, b) for s in range(len(SHAPES)) for c in range(len(names))
              for b in range(len(names)) if c != b]
    if split == "train":
        combos = [k for k in combos if k not in held]
    elif split == "heldout":
        combos = [k for k in combos if k in held]
    elif split != "all":
        fail(f"unknown shapes split {split!r}; use train, heldout or all")
    attrs = np.array(combos, dtype=np.int64)[rng.randint(len(combos), size=n)]  # (N, 3)
    cx, cy = rng.uniform(0.32, 0.68, (2, n, 1, 1)) * size      # centre jitter
    r = rng.uniform(0.2, 0.3, (n, 1, 1)) * size                 # size jitter
    yy, xx = np.mgrid[0:size, 0:size][:, None] + 0.5            # (2, 1, S, S) pixel centres
    dx, dy = xx - cx, yy - cy                                   # (N, S, S)
    masks = [dx ** 2 + dy ** 2 <= r ** 2,                                     # circle
             (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r),             # square
             (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r)) & (dy >= -r),     # triangle
             ((np.abs(dx) <= 0.35 * r) | (np.abs(dy) <= 0.35 * r)) & (np.maximum(np.abs(dx), np.abs(dy)) <= r)]
    mask = np.choose(attrs[:, 0, None, None], masks)                          # (N, S, S)
    palette = np.array(list(COLOURS.values()), dtype=np.float32) / 127.5 - 1  # (5, 3) in [-1, 1]
    img = np.where(mask[:, None], palette[attrs[:, 1]][:, :, None, None],
                   palette[attrs[:, 2]][:, :, None, None])                    # (N, 3, S, S)
    captions = [caption(SHAPES[s], names[c], names[b]) for s, c, b in attrs]
    return {"images": torch.from_numpy(img.astype(np.float32)), "attrs": torch.from_numpy(attrs),
            "labels": torch.from_numpy(attrs[:, 0].copy()), "captions": captions}


def load_digits():
    """scikit-learn's 1797 8 x 8 digits as float [N, 1, 8, 8] in [-1, 1] with labels."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1  # pixel values are 0..16
    return {"images": x, "labels": torch.tensor(d.target, dtype=torch.int64),
            "captions": [f"the digit {t}" for t in d.target]}


def load_embedded(name, n=4000, size=32, seed=0):
    """`digits`, `shapes` (train split), `shapes-heldout` or `shapes-all` by name."""
    if name == "digits":
        return load_digits()
    if name in ("shapes", "shapes-heldout", "shapes-all"):
        split = {"shapes": "train", "shapes-heldout": "heldout", "shapes-all": "all"}[name]
        return make_shapes(n, size, seed, split)
    fail(f"unknown embedded dataset {name!r}; use digits, shapes, shapes-heldout or shapes-all")
