"""The one shared import: config, distributed setup, logging, checkpoints, EMA, DLC-set I/O
and the embedded datasets. Everything a model is made of lives in the script of its paper
section; this file only holds infrastructure that every script needs in the same form.
"""
import dataclasses, gc, glob, json, os, re, shutil, sys, time, typing
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def fail(msg):
    """Stop with one clear line on stderr (exit code 1). Used for every kind of bad input.
    Under torchrun every rank sees the same bad input: rank 0 alone prints the line, the
    others exit 1 silently (torchrun then stops the job)."""
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    raise SystemExit(f"error: {msg}")


#################################################################################
#                  Config: dataclass defaults + presets + --key=value           #
#################################################################################

def _convert(name, typ, text):
    """Parse the command-line string `text` into the type annotated on the dataclass field."""
    if typ is None:  # not a field: parse_config reports the unknown key
        return text
    origin = typing.get_origin(typ)  # list[int] -> list, tuple[int, ...] -> tuple, a plain type -> None
    try:
        if typ is bool:  # bool("false") is True: the accepted words are spelled out instead
            if text.lower() in ("1", "true", "yes", "on"): return True
            if text.lower() in ("0", "false", "no", "off"): return False
            raise ValueError  # any other word: reported below like a bad number
        if origin in (list, tuple):  # comma separated: --modes=4,16,64
            inner = typing.get_args(typ)[0]  # the element type: list[int] -> int
            return origin(inner(v) for v in text.split(",") if v != "")  # empty items skipped: "4,16," -> [4, 16]
        return typ(text)  # int, float, str: the type's own constructor parses the text
    except ValueError:
        fail(f"--{name} expects {getattr(typ, '__name__', typ)}, got {text!r}")


# torchrun's own parser takes `--run=...` and `--n ...` for abbreviations of its options
# (--run-path, --nnodes), even after the script name; these spellings get through it.
ALIASES = {"run_name": "run", "num": "n"}


def parse_config(cls, argv, presets=None):
    """Build a `cls` dataclass from `--preset NAME` then `--key=value` / `--key value` / `--flag`.

    Presets are named dicts of overrides applied first; later flags win. Unknown keys and
    values of the wrong type stop with one line listing what is valid, and so does a value
    <= 0 of a field named in the class attribute `POSITIVE` (e.g. steps, batch_size)."""
    presets = presets or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # field name -> dataclasses.Field
    hints = typing.get_type_hints(cls)  # field name -> its type, string annotations resolved
    pairs, i = [], 0  # pairs: (key, raw text) in command-line order; i walks argv
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # a bare separator (torchrun strips it only right after the script)
            i += 1
            continue
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}; options look like --key=value")
        key, eq, val = arg[2:].partition("=")  # "lr=1e-3" -> ("lr", "=", "1e-3"); "lr" -> ("lr", "", "")
        key = key.replace("-", "_")  # --batch-size and --batch_size name the same field
        key = ALIASES[key] if key in ALIASES and ALIASES[key] in fields else key
        if not eq:  # --flag (bool), --key value, or --key v1 v2 ... for a list field
            if key in fields and hints[key] is bool:  # a bare boolean flag means true
                val = "true"
            elif key in fields and typing.get_origin(hints[key]) in (list, tuple):  # list: the words before the next --
                j = next((j for j in range(i + 1, len(argv)) if argv[j].startswith("--")), len(argv))
                i, val = j - 1, ",".join(argv[i + 1:j])          # --images a.jpg b.jpg -> "a.jpg,b.jpg"
            elif i + 1 < len(argv):  # --key value: the next word is the value
                i, val = i + 1, argv[i + 1]
            else:
                fail(f"--{key} needs a value")
        pairs.append((key, val))  # still text: converted below
        i += 1
    values = {}  # field name -> typed value
    for key, val in pairs:  # the preset first, wherever it stands on the line
        if key == "preset":
            if val not in presets:
                fail(f"unknown preset {val!r}; valid presets: {', '.join(presets) or 'none'}")
            values.update(presets[val])  # preset values are Python values already: no conversion
    values.update((k, _convert(k, hints.get(k), v)) for k, v in pairs if k != "preset")  # command line over the preset
    for key in values:  # also catches a preset key that is not a field
        if key not in fields:
            fail(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
    cfg = cls(**values)  # fields not given keep their dataclass defaults
    # the keys written on the command line (not the preset's): a checkpoint's own values win over
    # the defaults but not over these (see given()); not a field, so config.json does not hold it
    # (object.__setattr__ works even on a frozen dataclass)
    object.__setattr__(cfg, "_given", frozenset(k for k, _ in pairs if k != "preset"))
    for key in getattr(cls, "POSITIVE", ()):  # counts and sizes: 0 or negative makes no sense
        if getattr(cfg, key) <= 0:
            fail(f"--{key} must be a positive number, got {getattr(cfg, key)}")
    return cfg


def fields_of(cls, values):
    """The entries of the dict `values` that are fields of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}  # other sub-commands' keys dropped


def presets_for(presets, cls, own=None):
    """A script's presets cut to the fields of one sub-command's config `cls`, plus that
    sub-command's own values (`own`, by preset name): every sub-command takes every preset."""
    return {name: fields_of(cls, {**p, **(own or {}).get(name, {})}) for name, p in presets.items()}


def main(commands, doc, argv=None, default="train"):
    """Every script's command line: `python X.py [CMD] [--preset NAME] [--key=value ...]`.

    commands maps each sub-command to (function, config dataclass, presets or None); the
    function is called with the parsed config. `default` is the sub-command run when the line
    starts with an option (None: a sub-command is required). `--help` prints the script's
    docstring and the sub-command's options with their defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)  # a list of our own: pop() must not shorten the caller's
    cmd = argv.pop(0) if argv and not argv[0].startswith("-") else default  # no sub-command word first: the default one
    if cmd is None and not {"--help", "-h"} & set(argv):  # --help alone lists every sub-command
        fail(f"give a sub-command: {' | '.join(commands)}")
    if cmd is not None and cmd not in commands:
        fail(f"unknown sub-command {cmd!r}; use {' | '.join(commands)}")
    if "--help" in argv or "-h" in argv:
        print(doc)
        for name in [cmd] if cmd else commands:  # one sub-command's options, or all of them
            fields = dataclasses.fields(commands[name][1])
            print(f"{name} options: " + " ".join(f"--{f.name}={_default(f)}" for f in fields))
        return None  # help printed: nothing runs
    fn, cls, presets = commands[cmd]
    result = fn(parse_config(cls, argv, presets))  # a failure leaves here with its one-line error
    if dist.is_initialized():  # torchrun: every rank has ended its last collective before any tears down
        dist.barrier()
    # DDP / FSDP wrappers sit in reference cycles that hold the process group. Collected during
    # the interpreter's shutdown, gloo's threads can abort the process (SIGABRT after a good
    # run), so the cycles go now, and then the group, in this order.
    gc.collect()
    cleanup_dist()
    return result


def given(cfg):
    """The option names written on the command line that built cfg (empty for a cfg made in code)."""
    return getattr(cfg, "_given", frozenset())  # a cfg made by cls(...) in code has no _given


def _default(f):
    """A field's default as it would be written on the command line."""
    v = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # list defaults: default_factory
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v  # [4, 16] -> "4,16", the form --key accepts


def save_json(obj, path):
    with atomic_path(path) as tmp:  # never left half-written (atomic rename)
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
    device: torch.device = torch.device("cpu")  # cuda:LOCAL_RANK under torchrun, else pick_device's choice

    @property
    def main(self):
        return self.rank == 0  # rank 0 alone logs and writes shared files


def pick_device(name="auto"):
    if name != "auto":  # an explicit --device: checked, never silently replaced
        try:
            dev = torch.device(name)  # parses "cuda:1" etc.; checks the spelling only
        except RuntimeError:
            fail(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
        if dev.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name}: no CUDA GPU is visible to torch on this machine; use --device cpu or auto")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():  # "cuda" alone means index 0
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            fail(f"--device {name}: MPS is not available here; use --device cpu or auto")
        return dev
    if torch.cuda.is_available():  # auto: CUDA, then Apple MPS, then the CPU
        return torch.device("cuda")  # no index: the current CUDA device
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_dist(device="auto"):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: then NCCL on cuda:LOCAL_RANK, gloo on CPU.
    Without them: one process on the best available device."""
    if "RANK" not in os.environ:  # plain `python X.py`: one process, rank 0 of 1
        d = Dist(device=pick_device(device))
    else:
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        dev = pick_device(device)  # the kind of device; the GPU index comes next
        if dev.type == "cuda":
            dev = torch.device("cuda", local)  # one GPU per process on this machine
            torch.cuda.set_device(dev)  # NCCL and index-less "cuda" tensors then use it
        if not dist.is_initialized():  # init once per process
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # address / port from torchrun's env
        d = Dist(rank, local, world, dev)
    if d.device.type == "cuda":  # TF32 matmuls: free speed on Ampere+ (DiT trains in TF32)
        torch.backends.cuda.matmul.allow_tf32 = True  # matmuls on fp32 inputs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True  # the same for cuDNN convolutions
    return d


def cleanup_dist():
    """End torchrun's process group (utils.main calls it after every sub-command)."""
    if dist.is_initialized():  # nothing to do for a single process
        dist.destroy_process_group()  # recent torch warns about a group left alive


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:  # reads the env: works before setup_dist too
        print(*args, **kwargs, flush=True)  # flush: torchrun pipes stdout, which buffers


def seed_all(seed, d):
    """Rank-aware seed (seed * world + rank): every process draws different noise."""
    s = seed * d.world + d.rank  # no two (seed, rank) pairs share a seed at a fixed world size
    torch.manual_seed(s)  # also seeds every CUDA device
    np.random.seed(s % 2**32)  # numpy takes seeds in [0, 2**32)
    return s


class Logger:
    """Rank 0 prints and appends to run_dir/log.txt; other ranks stay silent."""
    def __init__(self, run_dir, d):
        self.path = os.path.join(run_dir, "log.txt") if (run_dir and d.main) else None  # None: rank > 0, or no folder
        self.main = d.main
        if self.path:
            os.makedirs(run_dir, exist_ok=True)  # log.txt may be the run folder's first file

    def __call__(self, msg):
        if not self.main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"  # time of day, e.g. [14:03:27]
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:  # append, reopened per line: --resume extends the same log
                f.write(line + "\n")


#################################################################################
#                Atomic files, checkpoints, EMA (plain dicts of tensors)        #
#################################################################################

TMP = re.compile(r"(.+)\.(tmp|old)-(\d+)")   # our temporaries: NAME.tmp-PID, NAME.old-PID (a swap)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False  # no such process: its temporaries are stale
    except (PermissionError, OSError):  # another user's process (or no os.kill): assume alive
        return True
    return True


def clean_stale(folder):
    """Remove the temporaries that a killed process (kill -9, power cut) left in `folder`:
    only names of our own pattern whose PID is no longer running on this machine (writers on
    other machines of a shared disk are not seen: there only rank 0 writes). An interrupted folder swap
    (NAME.old-PID left while NAME is missing) is undone: the old NAME comes back."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = TMP.fullmatch(name)  # groups: 1 final name, 2 "tmp" / "old", 3 the writer's PID
        if not m or int(m[3]) == os.getpid() or _alive(int(m[3])):  # ours, or a writer still at work
            continue
        path, target = os.path.join(folder, name), os.path.join(folder, m[1])  # target: the final name
        try:
            if m[2] == "old" and not os.path.exists(target):
                os.replace(path, target)                  # crashed between the two renames
            elif os.path.isdir(path):
                shutil.rmtree(path)  # a half-written folder, or the old side of a finished swap
            else:
                os.remove(path)  # a half-written file
        except OSError:  # a read-only folder (a shared data set): leave it to its owner
            pass


def _fsync(path):
    """Flush a file, or a folder's entries, to disk. Without it a power cut after the rename
    can leave an empty file under the final name (the rename reached the disk, the data not)."""
    try:
        fd = os.open(path, os.O_RDONLY)  # read-only suffices for fsync, and opens folders on POSIX
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to flush there
        return
    try:
        os.fsync(fd)  # waits until the data has reached the disk
    except OSError:  # a file system that refuses fsync: best effort
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds,
    so a crash never leaves a half-written file (the old one, if any, stays intact). The data
    is flushed before the rename and the folder after it; the temporaries of killed processes
    in the same folder are removed first. A folder written at `tmp` replaces a folder at
    `path` by two renames (old aside, new in), undone by clean_stale if a crash falls between."""
    folder = os.path.dirname(os.path.abspath(path))  # same folder, same file system: the rename is atomic
    os.makedirs(folder, exist_ok=True)  # e.g. checkpoints/ on a run's first save
    clean_stale(folder)  # leftovers of crashed writers go first
    # the PID in both names tells clean_stale whether their writer still runs
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    try:
        yield tmp  # the caller writes one file or a whole folder at tmp
        for f in (glob.glob(os.path.join(glob.escape(tmp), "*")) if os.path.isdir(tmp) else []) + [tmp]:
            _fsync(f)  # the folder's files first, then tmp itself
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder cannot be renamed over a folder
            os.replace(path, old)  # 1: the old folder aside
            os.replace(tmp, path)  # 2: the new one in (a crash between: clean_stale undoes 1)
            shutil.rmtree(old)  # only once the new one is in place
        else:
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        _fsync(folder)  # makes the rename itself durable
    finally:  # an error before the rename: tmp removed, `path` untouched
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
        return type(obj)(_plain(v) for v in obj)  # keeps list vs tuple
    if isinstance(obj, str):
        return str(obj)  # a str subclass -> a plain str
    if isinstance(obj, np.generic):
        return obj.item()  # np.float32 -> float, np.int64 -> int
    return obj  # tensors, numbers, None: accepted as they are


def save_checkpoint(obj, path):
    with atomic_path(path) as tmp:
        torch.save(_plain(obj), tmp)  # a killed save leaves the previous file intact


def _read_checkpoint(path):
    """(object, None) or (None, the reason it does not load)."""
    try:
        # cpu: loads without the GPU it was saved from; weights_only: the unpickler runs no code
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:  # a file cut short, not a torch file, a refused type
        return None, f"{type(e).__name__}: {str(e)[:80]}"  # [:80]: the reason stays on one line


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; pass the path of a .pt file written by train")
    ck, err = _read_checkpoint(path)
    if err:
        fail(f"could not read checkpoint {path} ({err}); is it corrupt?")
    return ck


def checkpoint_of(path, script, keys=()):
    """Read `path` (a .pt or a run folder) and check that `script`.py wrote it: a dict whose
    "script" entry names it (checkpoints written before that entry existed pass on their keys)
    and which holds `keys` ("config.L" looks inside "config"). Anything else is one line."""
    path = resolve_ckpt(path)
    return check_checkpoint(load_checkpoint(path), path, script, keys)


def check_checkpoint(ck, path, script, keys=()):
    """checkpoint_of for a checkpoint already read from `path`."""
    if not isinstance(ck, dict):
        fail(f"{path} holds a {type(ck).__name__}, not a {script}.py checkpoint; pass a file written by {script}.py train")
    # no "script" entry (an older checkpoint) passes here: the key check below decides
    if ck.get("script", script) != script:
        fail(f"{path} is a {ck['script']}.py checkpoint, not a {script}.py one; pass a file written by {script}.py train")
    for key in keys:  # "config.L" -> ck["config"]["L"]
        obj = ck
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                fail(f"{path} is not a {script}.py checkpoint (it has no {key!r}); pass a file written by {script}.py train")
            obj = obj[part]
    return ck


def load_weights(module, state, path, strict=True):
    """module.load_state_dict(state) (a model or an optimizer); a checkpoint of another
    architecture (missing keys, other shapes) is one line naming the first difference."""
    try:
        return module.load_state_dict(state, strict=strict) if isinstance(module, torch.nn.Module) \
            else module.load_state_dict(state)  # an optimizer's load_state_dict has no strict
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]  # torch's message: a header, then details
        first = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)  # the first detail
        fail(f"{path} does not fit this {type(module).__name__} ({first[:160]}); "
             "use the settings it was trained with, or a new --run")


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
        found = latest_checkpoint(os.path.join(path, "checkpoints"))  # its highest ckpt_<step>.pt
        if found is None:
            fail(f"run folder {path} has no checkpoints/ckpt_<step>.pt; train first or pass a .pt file")
        return found
    return path


CKPT = re.compile(r"ckpt_(\d+)\.pt")   # what every trainer writes: checkpoints/ckpt_<step>.pt


def checkpoints(ckpt_dir):
    """The `ckpt_<step>.pt` files of ckpt_dir, newest first (other names, e.g. ckpt_best.pt, ignored)."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = [(int(m[1]), n) for n in os.listdir(ckpt_dir) if (m := CKPT.fullmatch(n))]
    return [os.path.join(ckpt_dir, n) for _, n in sorted(steps, reverse=True)]  # by step as a number: 1000 after 900


def latest_checkpoint(ckpt_dir):
    """Newest `ckpt_<step>.pt` in ckpt_dir, or None."""
    found = checkpoints(ckpt_dir)
    return found[0] if found else None


def resume_checkpoint(ckpt_dir):
    """For --resume: (path, checkpoint) of the newest checkpoint that loads, or (None, None).
    A newer one that does not load (a disk filled up, a copy cut short) is skipped with one line."""
    skipped = []
    for path in checkpoints(ckpt_dir):
        ck, err = _read_checkpoint(path)
        if err is None and isinstance(ck, dict) and "step" in ck:  # a trainer's checkpoint records its step
            if skipped:
                print0(f"warning: --resume skipped {', '.join(skipped)} (unreadable); resuming from {path}")
            return path, ck
        skipped.append(f"{os.path.basename(path)} ({err or 'not a training checkpoint'})")
    if skipped:  # checkpoints exist but none loads: never start over silently
        fail(f"no checkpoint in {ckpt_dir} loads ({'; '.join(skipped)}); start again without --resume")
    return None, None  # nothing to resume: the run starts fresh


def check_run_dir(run_dir, resume, overwrite, results=()):
    """Before any work: a fresh run refuses a run folder that holds an earlier run's checkpoints
    (or other `results` files): two runs mixed in one folder would leave old checkpoints beside
    new ones, and --ckpt RUN would pick the old. Also removes what killed processes left there."""
    if resume and overwrite:
        fail("--resume continues a run and --overwrite replaces it; pass one of them")
    ck_dir = os.path.join(run_dir, "checkpoints")
    for folder in (run_dir, ck_dir):  # the two folders trainers write in
        clean_stale(folder)
    found = checkpoints(ck_dir) + [p for r in results for p in glob.glob(os.path.join(glob.escape(run_dir), r))]
    if found and not (resume or overwrite):  # a new or empty folder needs no flag
        fail(f"{run_dir} holds an earlier run ({os.path.relpath(found[0], run_dir)}); pass --resume to "
             f"continue it, --overwrite to replace it, or another --run name")


def clear_run_dir(run_dir, written=()):
    """--overwrite: delete only the files this project writes in a run folder (config.json,
    log.txt, checkpoints/ckpt_<step>.pt and the script's `written` patterns); others stay."""
    ck_dir = os.path.join(run_dir, "checkpoints")
    for p in checkpoints(ck_dir) + [p for pat in ("config.json", "log.txt", *written)
                                    for p in glob.glob(os.path.join(glob.escape(run_dir), pat))]:
        os.remove(p)
    if os.path.isdir(ck_dir) and not os.listdir(ck_dir):  # kept if a user put other files there
        os.rmdir(ck_dir)


def start_run(run_dir, cfg, d, written=()):
    """Rank 0: with --overwrite first remove the earlier run's files (clear_run_dir), then write
    the run's config.json (the command's full configuration)."""
    if d.main:  # rank 0 only: one writer per file
        if cfg.overwrite:
            clear_run_dir(run_dir, written)
        save_json(dataclasses.asdict(cfg), os.path.join(run_dir, "config.json"))  # asdict: fields only, not _given


class FiniteCheck:
    """Stops training with one line when the loss turns NaN / inf, before the weights that came
    out of it are saved. `step(loss, i)` at step i records the first bad step on the device
    (no host sync, so a GPU keeps running ahead); `check(params)` at log and checkpoint steps
    syncs once and also checks the weights (the last update can overflow on a finite loss)."""
    def __init__(self, device, hint="lower --lr"):
        self.hint = hint
        self.first = torch.full((), -1, dtype=torch.long, device=device)   # first bad step, -1: none
        self.value = torch.zeros((), device=device)                        # the loss at that step

    def step(self, loss, i):
        loss = torch.as_tensor(loss, device=self.first.device).detach().float().sum()  # a tensor or a float
        new = ~torch.isfinite(loss) & (self.first < 0)  # non-finite now and nothing recorded yet: keep the first
        self.first = torch.where(new, i, self.first)  # stays on the device: no .item(), no sync
        self.value = torch.where(new, loss, self.value)  # the offending loss value

    def check(self, params=()):
        if self.first.item() >= 0:  # .item(): the one host sync
            fail(f"the loss became {self.value.item()} at step {self.first.item()}; "
                 f"nothing was saved from there on; {self.hint}")
        check_finite_weights(params, hint=self.hint)  # params: empty checks the loss only


def check_finite_weights(tensors, where="the weights", hint="lower --lr"):
    """One line if any floating tensor of `tensors` (parameters or a state dict's values) holds NaN / inf."""
    bad = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        fail(f"{where} hold NaN or inf ({len(bad)} tensors); {hint}")


def check_sampling_weights(state_dict, path):
    """Samplers refuse a checkpoint of a run that diverged (its samples would be all one token)."""
    check_finite_weights(state_dict.values(), f"the weights of {path}",
                         "it comes from a diverged run: retrain with a lower --lr")


def distribute(model, d, compile=False):
    """The network the training step calls: DDP around the model when there are several ranks,
    then torch.compile if asked. Checkpoints keep saving `model` itself (no wrapper prefixes)."""
    net = model
    if d.world > 1:  # DDP averages the gradients across ranks in backward
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return torch.compile(net) if compile else net  # DDP first, then compile: the order torch documents


def unwrap(model):
    """The bare module under DDP / FSDP-free wrappers and torch.compile (for state dicts)."""
    model = getattr(model, "module", model)  # DDP keeps the model in .module
    return getattr(model, "_orig_mod", model)  # torch.compile keeps it in ._orig_mod


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters only; buffers are copied."""
    for pe, pm in zip(ema.parameters(), unwrap(model).parameters()):  # the same module, the same parameter order
        pe.lerp_(pm.detach().to(pe.dtype), 1 - decay)  # pe += (1 - decay) * (pm - pe)
    for be, bm in zip(ema.buffers(), unwrap(model).buffers()):
        be.copy_(bm)  # e.g. running statistics: copied, not averaged


#################################################################################
#           Speed: mixed precision, measured matmul peak and memory             #
#################################################################################

def fast_bf16(device):
    """Whether bf16 matmuls beat fp32 on `device`: on CUDA, and on a CPU with bf16 dot-product
    instructions: AMX tiles (Intel Xeon 4th generation on; one core: 1.1 TFLOP/s in bf16 against
    0.17 in fp32) or AVX512-BF16 (AMD Zen 4 on, Intel Cooper Lake; one Zen 4 core: 0.20-0.21
    TFLOP/s against 0.06-0.09, BENCHMARKS.md). Other CPUs emulate bf16 and are slower: fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":  # assumes a GPU with bf16 tensor cores (Ampere or later)
        return True
    # private torch.cpu probes (absent in an older torch: no); both multiply bf16, add in fp32
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return device.type == "cpu" and any(p is not None and p() for p in probes)  # MPS and other CPUs: fp32


def autocast(device, enabled=True):
    """bf16 autocast where fast_bf16(device), a no-op elsewhere. Weights, optimizer states,
    losses and everything the scripts save stay fp32."""
    device = torch.device(device)
    # enabled=False gives a context that changes nothing: callers write one `with` either way
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and fast_bf16(device))


def gelu_form(name):
    """torch's `approximate` argument for a --gelu value: "exact" (the erf form) -> "none", "tanh"
    (the approximation DiT and SEDD use) -> "tanh"; any other value stops with one line."""
    forms = {"exact": "none", "tanh": "tanh"}
    if name not in forms:
        fail(f"unknown --gelu {name!r}; use exact or tanh")
    return forms[name]


def attention(q, k, v):
    """F.scaled_dot_product_attention (B, H, T, d) x 3 -> (B, H, T, d), non-causal. On the CPU it
    runs in fp32 even under autocast: CPU autocast casts its inputs to bf16, and the bf16 CPU
    kernel's backward is about 20x slower than the fp32 one (half of a toy DiT step)."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):  # GPU, or CPU without autocast: as is
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):  # else autocast would cast the fp32 inputs back to bf16
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(q.dtype)  # back to the caller's dtype (bf16 under autocast)


def matmul_peak_flops(device, dtype=torch.float32, n=None, iters=10):
    """FLOP/s of a large square matmul on `device` (best of 3 timings): the denominator of
    every MFU we report. GPUs need n = 8192 to reach their peak (1024 gives a tenth of it)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)  # CPU: 1024 keeps the timing short
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel choice, clocks, caches
        a @ b
    best = float("inf")
    for _ in range(3):  # best of 3: the least disturbed timing
        sync(device)  # GPU work is asynchronous: start on an idle device
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)  # wait for the last matmul before stopping the clock
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * iters / best  # an n x n by n x n matmul: n^3 multiply-adds = 2 n^3 FLOPs


def measure(fn, device, iters, warmup=1, count=None):
    """(seconds per call of fn(), FLOPs of one call): the FLOPs are counted by torch's
    FlopCounterMode on one call of `count` (default fn; pass the uncompiled function when fn
    is torch.compile'd, whose kernels the counter cannot see), then fn is timed over `iters`
    calls after `warmup` more. MFU = flops / seconds / matmul_peak_flops(device)."""
    from torch.utils.flop_counter import FlopCounterMode  # imported here: only benchmarks need it
    with FlopCounterMode(display=False) as fc:  # counts matmul / conv / attention FLOPs; other ops count 0
        (count or fn)()  # this counted call stays out of the timing
    for _ in range(warmup):  # compilation and caches warm up outside the timing
        fn()
    sync(device)  # queued work finishes before the clock starts
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters, fc.get_total_flops()  # forward + backward when fn runs both


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: timings need this


def peak_memory_mb(device):
    """Peak allocated memory on CUDA, else the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20  # bytes -> MiB, since the start or the last reset
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (macOS reports bytes)


#################################################################################
#          DLC sets: codes.npy uint16 [N, L] + meta.json (+ labels / captions)  #
#################################################################################

DLC_FILES = ("codes.npy", "meta.json", "labels.npy", "captions.jsonl", "index.txt")   # + extra *.npy


def check_dlc_out(out, overwrite):
    """Before any work: `out` must be new, an empty folder, or (with --overwrite) a DLC set.
    Anything else is refused, so that a typo in --out never costs a user's files."""
    if not out:
        fail("no output folder given; pass --out DIR")
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):  # new or empty: nothing to lose
        return
    names = os.listdir(out) if os.path.isdir(out) else []  # a file: no names, refused below
    foreign = [n for n in names if n not in DLC_FILES and not n.endswith(".npy")]
    if not {"codes.npy", "meta.json"} <= set(names) or foreign:  # both core files, nothing foreign
        fail(f"--out {out} exists and is not a DLC set (it holds {(foreign or names or [out])[0]!r}); "
             f"refusing to touch it: pick a new folder")
    if not overwrite:
        fail(f"--out {out} already holds a DLC set; pass --overwrite to replace it, or pick a new folder")


def save_dlc_set(out, codes, meta, labels=None, captions=None, index=None, extra=None, overwrite=False):
    """Write a DLC set folder atomically: a temporary folder beside `out`, swapped in at the end,
    so a crash leaves the old set or the new one. An existing `out` must be a DLC set, and is
    replaced only with overwrite=True (check_dlc_out: commands call it before any work too).
    `extra` maps file names to numpy arrays (e.g. {"embeddings.npy": float16 [N, D]})."""
    check_dlc_out(out, overwrite)  # again here: also guards callers that skipped it
    codes = np.asarray(codes)  # a list or CPU tensor -> ndarray
    V = int(meta["V"])  # vocabulary size: tokens are 0..V-1
    if codes.ndim != 2 or codes.shape[1] != int(meta["L"]):
        fail(f"codes have shape {codes.shape}, expected [N, L={meta['L']}]")
    if codes.size and (codes.min() < 0 or codes.max() >= V):  # uint16 storage would wrap bad values silently
        fail(f"codes hold values outside [0, V={V}); refusing to write {out}")
    with atomic_path(out) as tmp:  # swapped in for an older set or an empty folder, which a failure leaves as it was
        os.makedirs(tmp)  # the set is built in the temporary folder
        np.save(os.path.join(tmp, "codes.npy"), codes.astype(np.uint16))  # [N, L], 2 bytes a token
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "N": len(codes)}, f, indent=2)  # N counted from the codes themselves
        if labels is not None:
            np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))  # [N] class ids
        if captions is not None:
            with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
                f.writelines(json.dumps(c) + "\n" for c in captions)  # one JSON value per line, line i for codes[i]
        if index is not None:
            with open(os.path.join(tmp, "index.txt"), "w") as f:
                f.writelines(f"{i}\n" for i in index)  # line i: the source of row i (e.g. an image path)
        for name, arr in (extra or {}).items():
            np.save(os.path.join(tmp, name), arr)


def check_tokens(codes, V, path, chunk=1 << 22):
    """Every token in [0, V), read `chunk` tokens at a time (a 1.3 GB memmap is never loaded
    whole). One line names the first bad row and position."""
    if not np.issubdtype(codes.dtype, np.integer):  # float codes would compare but could not index
        fail(f"DLC set {path}: codes.npy holds {codes.dtype}, not integer tokens; re-run the command that wrote it")
    rows = max(1, chunk // max(1, codes.shape[1]))  # rows per block: about `chunk` tokens
    for i in range(0, len(codes), rows):
        block = np.asarray(codes[i:i + rows])                               # (rows, L)
        if block.min() < 0 or block.max() >= V:  # the cheap test first; locate only on failure
            r, c = np.argwhere((block < 0) | (block >= V))[0]  # the first bad (row, position), row-major
            t = block[r, c]
            fail(f"DLC set {path}: row {i + r} position {c} holds token {t} {'< 0' if t < 0 else f'>= V={V}'}; "
                 f"every token must lie in [0, V): re-encode it or fix meta.json")


def tv_marginals(a, b, V):
    """Mean over positions of the total-variation distance between per-position token histograms."""
    ha = np.stack([np.bincount(a[:, i], minlength=V) / len(a) for i in range(a.shape[1])])   # (L, V)
    hb = np.stack([np.bincount(b[:, i], minlength=V) / len(b) for i in range(b.shape[1])])  # (L, V)
    return float(0.5 * np.abs(ha - hb).sum(-1).mean())  # TV = half the L1 distance, in [0, 1]


def tv_pairs(a, b, V, max_pairs=200, seed=0):
    """Mean TV between the joint histograms (V*V cells) of position pairs (all, or a random subset)."""
    L = a.shape[1]
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]  # all L (L - 1) / 2 pairs i < j
    if len(pairs) > max_pairs:  # a fixed-seed subset: the same pairs for a and b
        pairs = [pairs[k] for k in np.random.RandomState(seed).choice(len(pairs), max_pairs, replace=False)]
    a, b = a.astype(np.int64), b.astype(np.int64)  # c[:, i] * V + c[:, j] can exceed uint16
    hist = lambda c, i, j: np.bincount(c[:, i] * V + c[:, j], minlength=V * V) / len(c)  # (V * V,)
    return float(np.mean([0.5 * np.abs(hist(a, i, j) - hist(b, i, j)).sum() for i, j in pairs]))


def load_dlc_set(path, L=None, V=None):
    """Read a DLC set; check meta.json, every token in [0, V), and L and V against the caller's
    model. Returns a dict with codes (memory-mapped uint16 [N, L]), meta, and labels /
    captions when present."""
    clean_stale(os.path.dirname(os.path.abspath(path)))   # an interrupted replacement comes back
    mpath, cpath = os.path.join(path, "meta.json"), os.path.join(path, "codes.npy")
    if not (os.path.isfile(mpath) and os.path.isfile(cpath)):
        fail(f"{path} is not a DLC set (needs codes.npy and meta.json); make one with sem.py encode")
    try:
        meta = json.load(open(mpath))  # any JSON value: checked below
        codes = np.load(cpath, mmap_mode="r")  # memory-mapped: rows are read from disk on access
    except Exception as e:
        fail(f"DLC set {path} is corrupt ({type(e).__name__}); re-run the command that wrote it")
    # type(...) is int: rejects true (bool is an int subclass) and 16.0
    if not isinstance(meta, dict) or not all(type(meta.get(k)) is int and meta[k] > 0 for k in ("L", "V")):
        got = {k: meta.get(k) for k in ("L", "V")} if isinstance(meta, dict) else type(meta).__name__
        fail(f"DLC set {path}: meta.json must be a JSON object with positive integers L and V (got {got}); "
             f"re-run the command that wrote it")
    if codes.ndim != 2 or len(codes) == 0:
        fail(f"DLC set {path} is empty or not [N, L] (shape {codes.shape})")
    if codes.shape[1] != meta["L"]:
        fail(f"DLC set {path}: codes.npy has L={codes.shape[1]} but meta.json says L={meta['L']}")
    if L is not None and meta["L"] != L:
        fail(f"DLC set {path} has L={meta['L']} but the model expects L={L}; use a matching set or model")
    if V is not None and meta["V"] != V:
        fail(f"DLC set {path} has V={meta['V']} but the model expects V={V}; use a matching set or model")
    check_tokens(codes, meta["V"], path)  # reads every token once, a block at a time
    out = {"codes": codes, "meta": meta}
    if os.path.isfile(os.path.join(path, "labels.npy")):
        out["labels"] = np.load(os.path.join(path, "labels.npy"))  # loaded whole: [N] int64
    if os.path.isfile(os.path.join(path, "captions.jsonl")):
        out["captions"] = [json.loads(l) for l in open(os.path.join(path, "captions.jsonl"))]
    return out


#################################################################################
#               Embedded data: scikit-learn digits and procedural shapes        #
#################################################################################

SHAPES = ("circle", "square", "triangle", "cross")  # a shape's label is its index here (attrs[:, 0])
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),  # RGB 0..255
           "yellow": (230, 210, 40), "purple": (150, 60, 190)}  # order = colour index
# (shape, colour, background) combinations never shown to the image / text models in the
# default "shapes" split; every single attribute value still appears in training.
HELD_OUT = (("triangle", "red", "blue"), ("circle", "green", "purple"), ("square", "yellow", "red"),
            ("cross", "blue", "yellow"), ("circle", "purple", "green"), ("triangle", "yellow", "green"))


def caption(shape, colour, background):
    return f"a {colour} {shape} on a {background} background"  # e.g. "a red circle on a blue background"


def shape_combinations(split="train"):
    """The (shape, colour, background) index triples of a split: "train" (HELD_OUT excluded),
    "heldout" (only those) or "all" (every shape x colour x a different background colour)."""
    names = list(COLOURS)  # colour names in COLOURS order
    held = {(SHAPES.index(s), names.index(c), names.index(b)) for s, c, b in HELD_OUT}  # as index triples
    combos = [(s, c, b) for s in range(len(SHAPES)) for c in range(len(names))
              for b in range(len(names)) if c != b]  # never a shape on its own colour
    if split not in ("train", "heldout", "all"):
        fail(f"unknown shapes split {split!r}; use train, heldout or all")
    return [k for k in combos if split == "all" or (k in held) == (split == "heldout")]


def to_uint8(images):
    """float [-1, 1] (N, C, H, W) -> uint8 numpy (N, H, W, C): the quantisation of every saved sample."""
    # [-1, 1] -> [0, 255] by (x + 1) * 127.5, rounded; then channels last for image files
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_shapes(n, size=32, seed=0, split="train"):
    """Procedural, seeded shapes: `split` is "train" (held-out combinations excluded),
    "heldout" (only those) or "all". Returns images float [N, 3, S, S] in [-1, 1] and
    attrs int64 [N, 3] = (shape, colour, background) indices, labels = shape, captions."""
    rng = np.random.RandomState(seed)  # its own generator: the same seed gives the same set, whatever ran before
    names = list(COLOURS)
    combos = shape_combinations(split)
    attrs = np.array(combos, dtype=np.int64)[rng.randint(len(combos), size=n)]  # (N, 3)
    # position and size jitter: centres within the middle 10% of the image, radius 30-34% of its
    # side. Kept small on purpose: a wide jitter asks the toy models for translation- and
    # scale-invariant shape features that they do not learn in a CPU budget (docs/LOG.md)
    cx, cy = rng.uniform(0.45, 0.55, (2, n, 1, 1)) * size       # centre jitter
    r = rng.uniform(0.30, 0.34, (n, 1, 1)) * size                # size jitter
    yy, xx = np.mgrid[0:size, 0:size][:, None] + 0.5            # (2, 1, S, S) pixel centres
    dx, dy = xx - cx, yy - cy                                   # (N, S, S)
    # the square's half-side is the full radius: its corners (at 1.41 r) are what sets it apart from
    # the circle in 8 px patches; an area-matched square (half-side 0.85 r) left the SEM encoder
    # mistaking circles for squares (docs/LOG.md)
    # the last mask is the cross: two bars 0.7 r wide, 2 r long, area 2.31 r^2
    masks = [dx ** 2 + dy ** 2 <= r ** 2,                                     # circle, area pi r^2
             (np.abs(dx) <= r) & (np.abs(dy) <= r),                           # square, area 4 r^2
             (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r)) & (dy >= -r),     # triangle, 1.62 r^2
             ((np.abs(dx) <= 0.35 * r) | (np.abs(dy) <= 0.35 * r)) & (np.maximum(np.abs(dx), np.abs(dy)) <= r)]
    mask = np.choose(attrs[:, 0, None, None], masks)                          # (N, S, S)
    palette = np.array(list(COLOURS.values()), dtype=np.float32) / 127.5 - 1  # (5, 3) in [-1, 1]
    img = np.where(mask[:, None], palette[attrs[:, 1]][:, :, None, None],  # shape colour in the mask, else background
                   palette[attrs[:, 2]][:, :, None, None])                    # (N, 3, S, S)
    captions = [caption(SHAPES[s], names[c], names[b]) for s, c, b in attrs]  # one per image, from its attrs
    return {"images": torch.from_numpy(img.astype(np.float32)), "attrs": torch.from_numpy(attrs),
            "labels": torch.from_numpy(attrs[:, 0].copy()), "captions": captions}  # copy: not a view into attrs


def load_digits():
    """scikit-learn's 1797 8 x 8 digits as float [N, 1, 8, 8] in [-1, 1] with labels."""
    from sklearn.datasets import load_digits as sk_digits  # imported here: only the digits need scikit-learn
    d = sk_digits()  # shipped inside scikit-learn: no download
    # d.images: float64 (N, 8, 8); [:, None] adds the channel axis -> (N, 1, 8, 8)
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1  # pixel values are 0..16
    return {"images": x, "labels": torch.tensor(d.target, dtype=torch.int64),  # d.target: the digit 0-9
            "captions": [f"the digit {t}" for t in d.target]}


def load_embedded(name, n=4000, size=32, seed=0):
    """`digits`, `shapes` (train split), `shapes-heldout` or `shapes-all` by name."""
    if name == "digits":
        return load_digits()  # always all of them: n, size and seed are unused
    if name in ("shapes", "shapes-heldout", "shapes-all"):
        split = {"shapes": "train", "shapes-heldout": "heldout", "shapes-all": "all"}[name]
        return make_shapes(n, size, seed, split)
    fail(f"unknown embedded dataset {name!r}; use digits, shapes, shapes-heldout or shapes-all")
