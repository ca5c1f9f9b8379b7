"""The authors' released files -> ours: their SEM encoder, SEDD and DiT checkpoints become our
checkpoints, their ImageNet DLC dataset one of our DLC sets (DLC paper, Lavoie et al. 2025;
code https://github.com/lavoiems/DiscreteLatentCode, models and data lavoies/* on the Hugging
Face hub). Nothing here downloads: download the files yourself and pass the local path.

  python authors.py sem  --authors SEM_dinov2_L512 --out runs/sem-authors.pt --L 512 --V 256
  python authors.py sedd --authors DLC_SEDD_L512 --out runs/sedd-authors.pt
  python authors.py dit  --authors DLC_DiT_L512 --out runs/dit-authors.pt
  python authors.py dlc  --authors DLC_512x256 --out runs/dlc512

Each also reads the layout the authors' public training code writes (their DINOv2-fork teacher
checkpoint, their SEDD run folder, their accelerate save_state folder). Our scripts then take the
results as usual: `sem.py encode --ckpt`, `sedd.py sample --ckpt`, `dit.py sample --ckpt`,
`dit.py train --latents --dlc`. This is the one file that imports the others: it builds their
models to check the authors' tensors against (key names and shapes, strictly) and to load them.
"""
import dataclasses, json, math, os, re, sys
from dataclasses import dataclass

import numpy as np
import torch

import utils
import sem, sedd, dit


#################################################################################
#        Readers shared by the three checkpoints: wrappers, HF folders          #
#################################################################################

def strip_wrappers(sd, wrappers):
    """Remove each wrapper prefix (DDP's module., torch.compile's _orig_mod., a Hugging Face
    model's attribute name) that every key carries, as often as it appears."""
    sd = dict(sd)
    # a wrapper nests in another (module._orig_mod.): strip until no prefix is common to all
    while sd and (p := next((p for p in wrappers if all(k.startswith(p) for k in sd)), None)):  # p: prefix of all keys
        sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "diffusion_pytorch_model.safetensors",
              "pytorch_model.bin", "diffusion_pytorch_model.bin")  # in order of preference


def read_weights(path):
    """A state dict from a .safetensors file (safetensors, imported only here) or a torch file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # lazy: only Hugging Face folders need the package
        return load_file(path)
    return utils.load_checkpoint(path)  # weights_only: a .bin / .pt never runs code on load


def read_hf_folder(path, what):
    """(config.json as a dict, state dict, the weights file read) of a local Hugging Face model
    folder: one weights file or the shards a model.safetensors.index.json names. `what`: the error
    line's advice."""
    files = set(os.listdir(path))
    # the first weights file present, in HF_WEIGHTS' order: an index (shards) before a single file
    name = next((n for n in HF_WEIGHTS if n in files), None)
    if "config.json" not in files or name is None:
        utils.fail(f"{path} is not a Hugging Face folder: it needs config.json and one of {', '.join(HF_WEIGHTS)}; "
                   f"{what}")
    if name.endswith(".index.json"):  # sharded: the index maps each tensor to its file
        shards = sorted(set(json.load(open(os.path.join(path, name)))["weight_map"].values()))
        if any(s not in files for s in shards):
            utils.fail(f"{path}: a shard named in {name} is missing; download the whole folder")
    else:
        shards = [name]
    sd = {}
    for s in shards:  # each shard holds some of the tensors; together, the whole state dict
        sd.update(read_weights(os.path.join(path, s)))
    # (config, weights): the config gives the sizes the shapes cannot (L and V apart, the heads)
    return json.load(open(os.path.join(path, "config.json"))), sd, name


def find_key(tree, names):
    """First value under any of `names` in a nested dict (their YAML / config.json), or None."""
    if not isinstance(tree, dict):  # a leaf (number, string, list): nothing to search below it
        return None
    for k in names:  # this level first: a top-level key beats a nested one of the same name
        if k in tree:
            return tree[k]
    for sub in tree.values():  # depth first, in the file's order
        found = find_key(sub, names)
        if found is not None:
            return found
    return None


def check_new_out(out, suffix=""):
    """A conversion writes a new file only: an existing --out is never overwritten."""
    if not out or not out.endswith(suffix):
        utils.fail(f"give --out CKPT{suffix or '.pt'}: the checkpoint file to write")
    if os.path.exists(out):
        utils.fail(f"--out {out} already exists; remove it or pick another path")


#################################################################################
#       sem: their SEM encoder -> one of our sem.py checkpoints (encode, resume)#
#################################################################################
# Their teacher checkpoint (dinov2/dinov2/train/train.py, do_test) is {"teacher": state dict of
# ModuleDict(backbone=DinoVisionTransformerWithSEM, dino_head=DINOHead)}. The backbone keys are
# DINOv2's, which ours copy, plus sem_embed / sem_norm / sem_out and sem_cls_norm, a LayerNorm that
# their forward never calls (it re-uses the backbone's `norm`), so it is dropped here.

@dataclass
class SemConfig(sem.ViTConfig):
    """sem: the ViT fields come from the file's shapes, L and V from its config or --L / --V;
    a given --arch, --patch, --pos_grid or --registers must match the shapes, a given --size wins."""
    authors: str = ""             # the authors' teacher .pth or a local Hugging Face folder
    out: str = ""                 # our checkpoint .pt to write (refused if it exists)


SEM_WRAPPERS = ("module.", "_orig_mod.", "model.", "teacher.", "sem.", "encoder.")  # DDP, compile, HF


def find_authors_yaml(path):
    """student: {arch, L, V, ...} of the DINOv2 config.yaml in the run folder of a teacher .pth
    (<run>/eval/training_N/teacher_checkpoint.pth), or {} when there is none."""
    folder = os.path.dirname(os.path.abspath(path))
    for up in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):  # training_N, eval, <run>
        f = os.path.join(up, "config.yaml")
        if os.path.isfile(f):
            import yaml
            return (yaml.safe_load(open(f)) or {}).get("student", {})
    return {}


def read_authors_sem(path):
    """(backbone state dict, DINO head state dict or None, hints {L, V, ...}) of the authors' SEM."""
    if os.path.isdir(path):  # a Hugging Face folder: config.json is the hints
        hints, sd, _ = read_hf_folder(path, "pass the downloaded Hugging Face folder or a teacher .pth")
    elif os.path.isfile(path):
        # their training layout: the teacher .pth, its run's config.yaml as the hints
        sd, hints = utils.load_checkpoint(path), find_authors_yaml(path)
        sd = sd.get("teacher", sd) if isinstance(sd, dict) else sd
    else:
        utils.fail(f"--authors {path} does not exist (a teacher_checkpoint.pth or a Hugging Face folder)")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        utils.fail(f"{path} is not a state dict of tensors (expected {{'teacher': {{backbone.*, dino_head.*}}}})")
    sd = strip_wrappers(sd, SEM_WRAPPERS)
    # split the two modules of their ModuleDict: the head (ours too, when it converts) and the backbone
    head = {k[len("dino_head."):]: v for k, v in sd.items() if k.startswith("dino_head.")} or None
    sd = {k.removeprefix("backbone."): v for k, v in sd.items() if not k.startswith(("dino_head.", "ibot_head."))}
    # block_chunks > 0 saves blocks.<chunk>.<i>.*; i is already the global block index
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k) if re.match(r"^blocks\.\d+\.\d+\.", k) else k: v
          for k, v in sd.items() if not k.startswith("sem_cls_norm.")}
    return sd, head, hints


def authors_arch(sd, hints, cfg, given, path):
    """Our architecture fields from the shapes (width, depth, FFN, patch, registers, pos grid,
    L*V), L and V separately from the authors' config or --L / --V; a conflict is one line."""
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "sem_embed.weight", "blocks.0.norm1.weight"]
    if any(k not in sd for k in need):  # not a DINOv2 SEM at all: name what is there instead
        known = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.", "blocks.", "norm.", "sem_")
        unexpected, missing = [k for k in sorted(sd) if not k.startswith(known)][:6], [k for k in need if k not in sd]
        utils.fail(f"{path} is not in the layout of the authors' DINOv2 SEM encoder: unexpected keys "
                   f"{unexpected}, missing keys {missing}")
    # cls_token (1, 1, D); blocks.<i>.*: depth = the largest i + 1
    D, depth = sd["cls_token"].shape[-1], 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    ffn = "swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp"  # ViT-g has SwiGLU
    archs = [a for a, (w, n, _, f) in sem.ARCHS.items() if (w, n, f) == (D, depth, ffn)]  # (width, depth, FFN)
    if not archs:
        utils.fail(f"{path}: width {D}, depth {depth}, {ffn} FFN is none of our --arch sizes ({', '.join(sem.ARCHS)})")
    LV = sd["sem_embed.weight"].shape[0]  # sem_embed.weight: (L*V, (1+R)*D)
    L, V = (int(given.get(k) or hints.get(k) or 0) for k in ("L", "V"))  # --L / --V, else config, else 0
    L, V = (L or (LV // V if V else 0)), (V or (LV // L if L else 0))  # one known: the other from L*V
    if not L or L * V != LV:
        utils.fail(f"{path}: the SEM head has L*V = {LV} but L and V separately are not in the files "
                   f"(or L={L} x V={V} disagrees); pass --L and --V (the paper: --L 512 --V 256)")
    # patch_embed.proj.weight (D, 3, p, p); register_tokens (1, R, D); pos_embed (1, 1 + G*G, D)
    found = dict(arch=archs[0], patch=sd["patch_embed.proj.weight"].shape[-1], L=L, V=V,
                 registers=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
                 pos_grid=math.isqrt(sd["pos_embed"].shape[1] - 1))
    for k, v in found.items():  # a flag the user wrote must agree with the file, never override it
        if k in given and k not in ("L", "V") and getattr(cfg, k) != v:
            utils.fail(f"--{k} {getattr(cfg, k)} does not match {path} ({k} = {v} from its shapes); drop the flag")
    # their encoding resolution: 224 for DINOv2's 518 px pos-embed grid (37), else the stored grid
    size = cfg.size if "size" in given else 224 if found["pos_grid"] == 37 else found["pos_grid"] * found["patch"]
    return dataclasses.replace(cfg, **found, size=size)


def authors_head(head, path):
    """Their DINO head -> ours, exactly, or None. Their last layer is weight_norm(Linear):
    W_k = g_k v_k / ||v_k||; ours fixes g = 1, so it holds their head only when every g_k = 1."""
    if head is None:
        return None, "no dino_head in the file"
    # torch's two weight-norm layouts: the old weight_g / weight_v, the parametrization's original0 / 1
    g = head.pop("last_layer.weight_g", head.pop("last_layer.parametrizations.weight.original0", None))
    v = head.pop("last_layer.weight_v", head.pop("last_layer.parametrizations.weight.original1", None))
    if g is None or v is None or sorted(head) != [f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]:
        return None, f"dino_head has keys {sorted(head)[:6]}, not a 3-layer DINO head with a weight-normed last layer"
    if not torch.allclose(g.float(), torch.ones_like(g.float()), rtol=0, atol=1e-6):
        return None, f"its last-layer weight_g is not 1 (range {g.min():.4g}..{g.max():.4g}), which our head fixes"
    # g = 1: their v as our weight gives the same W = v / ||v|| (our forward normalises)
    return {**{f"head.{k}": t for k, t in head.items()}, "head.last_layer.weight": v}, ""


def convert_sem(cfg):
    """Their SEM teacher as our checkpoint (model = ema = their teacher), which sem.py encode
    reads as usual and sem.py train --resume continues when the DINO head converted too."""
    if not cfg.authors:
        utils.fail("give --authors PATH: their teacher .pth or a local Hugging Face folder")
    check_new_out(cfg.out)  # before any work
    sd, head, hints = read_authors_sem(cfg.authors)
    found = authors_arch(sd, hints, cfg, {k: getattr(cfg, k) for k in utils.given(cfg)}, cfg.authors)
    head_sd, why = authors_head(head, cfg.authors)
    heads = {}
    if head_sd:  # head sizes from its shapes
        heads = dict(head_hidden=head_sd["head.mlp.0.weight"].shape[0],
                     head_bottleneck=head_sd["head.mlp.4.weight"].shape[0],
                     prototypes=head_sd["head.last_layer.weight"].shape[0])
    # the checkpoint holds a train config, as ours do: encode reads its ViT fields, --resume its schedule
    model = sem.Config(**utils.fields_of(sem.ViTConfig, dataclasses.asdict(found)), **heads)
    with torch.device("meta"):  # shapes only: every tensor comes from their file
        ours = sem.Student(model) if head_sd else sem.SEMViT(model)
    want = ours.state_dict()  # our keys and shapes (meta)
    # ours has the backbone under backbone.* beside the head (a Student), or alone (a SEMViT)
    got = {**({f"backbone.{k}": v for k, v in sd.items()} if head_sd else sd), **(head_sd or {})}
    utils.check_layout(want, got, f"{cfg.authors} is not in the layout of the authors' training code")
    weights = {k: got[k].float().contiguous() for k in want}  # fp32, in our key order
    if not head_sd:  # encode reads backbone.* of the EMA
        weights = {f"backbone.{k}": v for k, v in weights.items()}
    # model = ema = their teacher: DINOv2 starts the student as the teacher; encode reads the ema
    utils.save_checkpoint({"model": weights, "ema": weights, "step": 0, "config": dataclasses.asdict(model),
                           "converted_from": os.path.abspath(cfg.authors), "dino_head": not why,
                           "versions": {"torch": torch.__version__}}, cfg.out)
    print(f"wrote {cfg.out}: {model.arch}/{model.patch} reg{model.registers} SEM L={model.L} V={model.V}, "
          f"{sum(v.numel() for v in weights.values()):,} weights"
          + ("" if head_sd else f"; DINO head not converted ({why}): encode only"), flush=True)
    return cfg.out


#################################################################################
#       sedd: their SEDD run or HF folder -> one of our sedd.py checkpoints     #
#################################################################################

@dataclass
class SeddConfig:
    """sedd: their weights (the EMA of a run) in a DDiT of the same shape; sizes from the weights."""
    authors: str = ""            # their SEDD run folder (.hydra/config.yaml + checkpoints-meta/) or a local HF folder
    out: str = ""                # our checkpoint .pt to write (refused if it exists)
    checkpoint: str = "checkpoints-meta/checkpoint.pth"  # inside a run folder (their --checkpoint_name)
    heads: int = 0               # attention heads, when neither the files nor the config say (medium: 16)
    L: int = 0                   # expected code length (checked against the files); 0 = any
    V: int = 0                   # expected vocabulary (checked against the files); 0 = any


# Their module names (https://github.com/lavoiems/DiscreteLatentCode sedd/model/transformer.py)
# -> ours. `rotary_emb.inv_freq` is a buffer of theirs (its length is head_dim / 2); we recompute it.
_TOP = {"vocab_embed.embedding": "embed.weight", "pos_embed": "pos", "sigma_map.mlp.": "sigma_mlp.",
        "output_layer.norm_final.": "norm.", "output_layer.linear.": "out.", "output_layer.adaLN_modulation.": "ada."}
_BLOCK = {"norm1.": "norm1.", "attn_qkv.": "qkv.", "attn_out.": "proj.", "norm2.": "norm2.", "mlp.": "mlp.",
          "adaLN_modulation.": "ada."}
_INV_FREQ = "rotary_emb.inv_freq"
SEDD_WRAPPERS = ("module.", "_orig_mod.", "model.", "score_model.", "sedd.")   # DDP, compile, HF wrappers


def authors_names(depth):
    """Their parameter names in their parameters() order (the order of the EMA's shadow_params):
    the root's own pos_embed first, then the sub-modules in the order SEDD.__init__ builds them."""
    block = ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
             "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]
    return (["pos_embed", "vocab_embed.embedding"]
            + [f"sigma_map.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
            + [f"blocks.{b}.{n}" for b in range(depth) for n in block]
            + [f"output_layer.{n}" for n in ("norm_final.weight", "linear.weight", "linear.bias",
                                             "adaLN_modulation.weight", "adaLN_modulation.bias")])


def our_name(name):
    """blocks.3.attn_qkv.weight -> blocks.3.qkv.weight, output_layer.linear.bias -> out.bias, ..."""
    if name.startswith("blocks."):  # per-block names map one to one, the block index kept
        b, rest = name[len("blocks."):].split(".", 1)                   # "3", "attn_qkv.weight"
        old = next(k for k in _BLOCK if rest.startswith(k))
        return f"blocks.{b}.{_BLOCK[old]}{rest[len(old):]}"
    old = next(k for k in _TOP if name.startswith(k))
    return _TOP[old] + name[len(old):]


def read_authors_sedd(path, checkpoint):
    """(state dict, config dict, what it is) of their SEDD run folder or of a local HF folder."""
    # their training run folder (Hydra writes .hydra/), else a Hugging Face folder
    if os.path.isdir(os.path.join(path, ".hydra")) or os.path.isdir(os.path.join(path, "checkpoints-meta")):
        return read_run_folder(path, checkpoint)
    if not os.path.isfile(os.path.join(path, "config.json")):
        utils.fail(f"{path} is neither a SEDD run folder (.hydra/config.yaml + checkpoints-meta/checkpoint.pth) "
                   "nor a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin)")
    config, sd, name = read_hf_folder(path, "download the whole folder")
    sd = strip_wrappers(sd, SEDD_WRAPPERS)
    # their key names for as many blocks as the file holds: a missing or extra tensor fails here
    check_sedd_layout(sd, authors_names(count_blocks(sd)), os.path.join(path, name))
    return sd, config, f"Hugging Face folder ({name})"


def read_run_folder(path, checkpoint):
    """Their training run: .hydra/config.yaml and `{model, ema: {decay, num_updates, shadow_params},
    optimizer, step}`, with the EMA (what they sample with) copied over `model`."""
    cfg_path, ck_path = os.path.join(path, ".hydra", "config.yaml"), os.path.join(path, checkpoint)
    for f in (cfg_path, ck_path):
        if not os.path.isfile(f):
            utils.fail(f"SEDD run folder {path} has no {os.path.relpath(f, path)}; "
                       "it needs .hydra/config.yaml and checkpoints-meta/checkpoint.pth (or pass --checkpoint)")
    import yaml  # lazily: only the conversions read YAML
    config = yaml.safe_load(open(cfg_path)) or {}
    ck = utils.load_checkpoint(ck_path)  # torch.load(weights_only=True): plain containers of tensors only
    if not (isinstance(ck, dict) and isinstance(ck.get("model"), dict) and isinstance(ck.get("ema"), dict)
            and isinstance(ck["ema"].get("shadow_params"), (list, tuple))):
        utils.fail(f"{ck_path} is not a SEDD training checkpoint ({{model, ema: {{shadow_params}}, optimizer, "
                   f"step}}); found keys {sorted(ck)[:6] if isinstance(ck, dict) else type(ck).__name__}")
    sd = strip_wrappers(ck["model"], SEDD_WRAPPERS)
    # shadow_params is a list in their parameters() order: it lines up with authors_names(depth)
    names, shadow = authors_names(count_blocks(sd)), ck["ema"]["shadow_params"]
    check_sedd_layout(sd, names, ck_path)
    if len(shadow) != len(names) or any(tuple(t.shape) != tuple(sd[n].shape) for n, t in zip(names, shadow)):
        utils.fail(f"{ck_path}: ema.shadow_params ({len(shadow)} tensors) do not line up with the model's "
                   f"{len(names)} parameters in SEDD's parameters() order")
    sd = {**sd, **dict(zip(names, shadow))}  # the EMA's tensors replace the raw weights, name by name
    return sd, config, f"SEDD run folder, step {ck.get('step')}, EMA weights"


def count_blocks(sd):
    # distinct b of the blocks.b.* keys
    return len({k.split(".")[1] for k in sd if k.startswith("blocks.") and k.count(".") > 1})


def check_sedd_layout(sd, names, where):
    """Strict: exactly their forward's weights (plus the rotary buffer), or one line naming the rest."""
    unexpected = sorted(set(sd) - set(names) - {_INV_FREQ})
    missing = [n for n in names if n not in sd]
    if unexpected or missing:
        # the first five of each list: enough to tell a wrong model from a wrapped one
        short = lambda ks: ", ".join(ks[:5]) + (f" (+{len(ks) - 5} more)" if len(ks) > 5 else "") or "none"
        utils.fail(f"{where} is not in the SEDD layout: unexpected keys {short(unexpected)}; "
                   f"missing keys {short(missing)}")
    # SEDD can learn one embedding table per position (3-D); ours, like the released models, shares one
    if sd["vocab_embed.embedding"].dim() != 2:
        utils.fail(f"{where} has a per-position token embedding {tuple(sd['vocab_embed.embedding'].shape)} "
                   "(model.shared_embedding: False); only the shared one (the released models') is supported")


def authors_dims(sd, config, c):
    """(L, V, D, depth, cond_dim, heads) of their model. The weights decide; the config and the
    flags must agree with them; the heads come from the rotary buffer, the config or --heads."""
    V1, D = sd["vocab_embed.embedding"].shape                     # V + 1 rows: the mask token is V
    L, depth, cond_dim = sd["pos_embed"].shape[0], count_blocks(sd), sd["sigma_map.mlp.0.weight"].shape[0]
    heads = D // (2 * len(sd[_INV_FREQ])) if _INV_FREQ in sd else None   # inv_freq has head_dim / 2 entries
    sizes = {"L": L, "V": V1 - 1, "hidden_size": D, "n_blocks": depth, "cond_dim": cond_dim, "n_heads": heads}
    aliases = {"L": ("length",), "V": ("tokens",), "n_heads": ("n_heads", "num_heads", "num_attention_heads")}
    flags = {"L": c.L, "V": c.V, "n_heads": c.heads}
    for k in sizes:  # each size: the weights' value; the config's and a flag's must equal it
        for source, val in (("the config", find_key(config, aliases.get(k, (k,)))),
                            ("--heads" if k == "n_heads" else f"--{k}", flags.get(k))):
            if val in (None, 0):  # not given: nothing to check
                continue
            if sizes[k] is None:  # the heads, when the file has no rotary buffer: the config decides
                sizes[k] = int(val)
            elif int(val) != sizes[k]:
                utils.fail(f"{c.authors}: the weights give {k}={sizes[k]} but {source} says {val}")
    if sizes["n_heads"] is None:
        utils.fail(f"{c.authors}: the number of attention heads is in neither the weights nor the config; pass --heads")
    return L, V1 - 1, D, depth, cond_dim, sizes["n_heads"]


def check_convertible(sd, config, D, H, where):
    """Only SEDD-absorb with log-linear noise, scale_by_sigma, a shared embedding and rotary base
    10000 (the released models') converts: the config must not say otherwise."""
    graph, noise = find_key(config, ("graph",)) or {}, find_key(config, ("noise",)) or {}
    for key, got, want in (("graph.type", graph.get("type"), "absorb"), ("noise.type", noise.get("type"), "loglinear"),
                           ("scale_by_sigma", find_key(config, ("scale_by_sigma",)), True),
                           ("shared_embedding", find_key(config, ("shared_embedding",)), True)):
        if got is not None and got != want:
            utils.fail(f"{where}: config has {key}={got}; only SEDD-absorb with log-linear noise, scale_by_sigma "
                       "and a shared embedding (the released models') converts")
    if D % (2 * H):  # rotary pairs dimension i with i + d/2 in each head
        utils.fail(f"{where}: hidden size {D} is not a multiple of 2 x heads={H}")
    d = D // H  # their rotary frequencies must be the ones we recompute (base 10000)
    if _INV_FREQ in sd and not torch.allclose(sd[_INV_FREQ].float(), 1.0 / 10000 ** (torch.arange(0, d, 2) / d)):
        utils.fail(f"{where}: {_INV_FREQ} is not 10000^(-2k/d); a rotary base other than SEDD's does not convert")


def convert_sedd(c):
    """Their weights (the EMA of a run) in a DDiT of the same shape, saved as our checkpoint."""
    if not c.authors:
        utils.fail("give --authors PATH: their SEDD run folder or a local Hugging Face folder")
    check_new_out(c.out)
    sd, config, what = read_authors_sedd(c.authors, c.checkpoint)
    L, V, D, depth, cond_dim, H = authors_dims(sd, config, c)
    check_convertible(sd, config, D, H, c.authors)
    # a named size when the dims match one, else DxdepthxH
    size = next((n for n, dims in sedd.SIZES.items() if dims == (D, depth, H)), f"{D}x{depth}x{H}")
    dropout = float(find_key(config, ("dropout",)) or 0.1)  # SEDD's default where the config is silent
    model = sedd.DDiT(L, V, size, cond_dim, dropout)
    # ours: their weights renamed; want: our fresh DDiT's state dict
    ours, want = {our_name(n): sd[n] for n in authors_names(depth)}, model.state_dict()
    bad = [f"{k} {tuple(t.shape)} vs ours {tuple(want[k].shape)}" for k, t in ours.items() if t.shape != want[k].shape]
    if bad:
        utils.fail(f"{c.authors}: shapes differ from a DDiT of L={L} V={V} D={D} depth={depth} heads={H}: "
                   + "; ".join(bad[:3]))
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)   # every weight of ours is set
    # the config sample reads; GELU tanh: SEDD's (and their) MLP, not the toy's exact one
    cfg = dataclasses.replace(sedd.Config(), run="converted", L=L, V=V, size=size, cond_dim=cond_dim,
                              dropout=dropout, gelu="tanh")
    state = model.state_dict()  # model and ema: the same tensors, which torch.save stores once
    utils.save_checkpoint({"model": state, "ema": state, "step": 0, "config": dataclasses.asdict(cfg),
                           "dlc_meta": {}, "converted_from": {"path": os.path.abspath(c.authors), "what": what},
                           "versions": {"torch": torch.__version__}}, c.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {what} {c.authors} -> {c.out}: L={L} V={V} size={size} cond_dim={cond_dim} "
          f"params={n:,}", flush=True)
    return c.out


#################################################################################
#     dit: their DiT (accelerate folder or HF) -> one of our dit.py checkpoints #
#################################################################################
# Their train_diffusion.py trains a torch.compile'd DiTSEM (dit/models.py) under accelerate:
# save_state writes <run>/checkpoints/checkpoints/checkpoint_<i>/ with custom_checkpoint_0.pkl
# (torch.save of the EMA's state dict, keys _orig_mod.<name>: the EMA they sample with),
# model.safetensors (the raw weights, module._orig_mod.<name> under DDP) and optimizer.bin;
# metadata.json {"current_epoch", "args"} sits in <run>/checkpoints/. Their key names are ours.

@dataclass
class DitConfig:
    """dit: their EMA (what they sample with) as our `ema`, their raw weights (if any) as `model`."""
    authors: str = ""               # the authors' accelerate checkpoint_<i>/ folder or a Hugging Face folder
    out: str = ""                   # our checkpoint .pt to write (refused if it exists)


DIT_WRAPPERS = ("module.", "_orig_mod.", "model.", "transformer.", "dit.")   # DDP, compile, HF wrappers


def read_authors_dit(path):
    """(EMA state dict, raw state dict or None, hints {L, V, model, ...}) of their accelerate
    save_state folder or of a local Hugging Face folder (config.json + weights, or a diffusers
    pipeline folder whose transformer/ holds them)."""
    if not os.path.isdir(path):
        utils.fail(f"--authors {path} is not a folder (their save_state checkpoint_<i>/ or a Hugging Face folder)")
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):  # a diffusers pipeline folder
        path = os.path.join(path, "transformer")
    files = set(os.listdir(path))
    if "config.json" in files:                                              # Hugging Face folder
        config, sd, _ = read_hf_folder(path, "download the whole folder")
        return strip_wrappers(sd, DIT_WRAPPERS), None, config
    if "custom_checkpoint_0.pkl" not in files:
        utils.fail(f"{path} has no custom_checkpoint_0.pkl (the EMA that accelerate's save_state writes) "
                   "and no config.json; pass their checkpoint_<i>/ folder or a Hugging Face folder")
    # accelerate's files: the EMA as a torch pickle, the raw weights as safetensors
    read = lambda name: strip_wrappers(read_weights(os.path.join(path, name)), DIT_WRAPPERS)
    ema, raw = read("custom_checkpoint_0.pkl"), read("model.safetensors") if "model.safetensors" in files else None
    hints = {}
    for up in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):   # metadata.json of the run
        if os.path.isfile(os.path.join(up, "metadata.json")):
            hints = json.load(open(os.path.join(up, "metadata.json"))).get("args", {})
            break
    return ema, raw, hints


def authors_model_args(sd, hints, path):
    """Our DiT(**model_args) from the shapes: depth, width, patch, channels, grid, and the
    (L, V+1, D) DLC table; heads from the size name the shapes match (DiT's sizes)."""
    need = ["x_embedder.proj.weight", "pos_embed", "sem_embedder.embedding_table", "blocks.0.attn.qkv.weight"]
    if any(k not in sd for k in need):
        known = ("pos_embed", "x_embedder.", "t_embedder.", "blocks.", "final_layer.", "sem_embedder.")
        utils.fail(f"{path} is not in the layout of the authors' DLC DiT (DiTSEM): unexpected keys "
                   f"{[k for k in sorted(sd) if not k.startswith(known)][:6]}, "
                   f"missing keys {[k for k in need if k not in sd]}")
    D, C, patch, _ = sd["x_embedder.proj.weight"].shape                     # patch conv weight (D, C, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))  # blocks.<i>.*: the largest i + 1
    sizes = [n for n, (d, w, _) in dit.SIZES.items() if (d, w) == (depth, D)]   # size names of that depth and width
    if not sizes:
        utils.fail(f"{path}: depth {depth} x width {D} is none of the DiT sizes {', '.join(dit.SIZES)}")
    L, V1, _ = sd["sem_embedder.embedding_table"].shape                    # (L, V+1, D): V+1 with the drop token
    # their run's args name them L / V or dlc_l / dlc_v; absent: the table decides alone
    L_, V = (hints.get(k, hints.get(f"dlc_{k.lower()}")) for k in ("L", "V"))
    if (L_ is not None and L_ != L) or (V is not None and V != V1 - 1):
        no_drop = "; a table without drop-token rows (trained without CFG dropout) is not supported" if V == V1 else ""
        utils.fail(f"{path}: the DLC table is (L={L}, V+1={V1}, D) but the config says L={L_}, V={V}{no_drop}")
    model = f"DiT-{sizes[0]}/{patch}"
    if hints.get("model") and hints["model"].split("-", 1)[-1] != model.split("-", 1)[-1]:
        utils.fail(f"{path}: its metadata says --model {hints['model']} but the shapes are {model}")
    grid = math.isqrt(sd["pos_embed"].shape[1])                            # pos_embed (1, grid^2, D)
    return dict(model=model, input_size=grid * patch, in_channels=C, cond="dlc", num_classes=0, L=L, V=V1 - 1,
                emb_dim=0)


def convert_dit(cfg):
    """Their EMA as our `ema`, their raw weights (when the folder has them) as `model`, with the
    training config that dit.py sample and compose read (DiT's linear schedule: the imagenet preset)."""
    if not cfg.authors:
        utils.fail("give --authors FOLDER: their accelerate checkpoint_<i>/ or a Hugging Face folder")
    check_new_out(cfg.out, ".pt")
    ema, raw, hints = read_authors_dit(cfg.authors)
    margs = authors_model_args(ema, hints, cfg.authors)
    with torch.device("meta"):                                              # shapes only
        want = dit.DiT(**margs).state_dict()
    for name, sd in (("EMA", ema), ("model", raw)):  # both must fit, key for key, shape for shape
        if sd is None:
            continue
        utils.check_layout(want, sd, f"{cfg.authors} ({name}) is not in the layout of the authors' DiTSEM")
    ema = {k: ema[k].float().contiguous() for k in want}                    # fp32, our keys only
    raw = {k: raw[k].float().contiguous() for k in want} if raw is not None else ema  # else: the EMA
    pixels = margs["input_size"] * (8 if margs["in_channels"] == 4 else 1)  # latent models: the SD-VAE downsamples 8x
    imagenet = utils.presets_for(dit.PRESETS, dit.Config)["imagenet"]      # their DiT trains on DiT's linear schedule
    config = dataclasses.asdict(dit.Config(**{**imagenet, "model": margs["model"], "image_size": pixels}))
    utils.save_checkpoint({"model": raw, "ema": ema, "step": 0, "config": config, "model_args": margs,
                           "converted_from": os.path.abspath(cfg.authors), "versions": {"torch": torch.__version__}},
                          cfg.out)
    print(f"wrote {cfg.out}: {margs['model']} on {margs['in_channels']}x{margs['input_size']}x{margs['input_size']}, "
          f"DLC L={margs['L']} V={margs['V']}, {sum(v.numel() for v in ema.values()):,} weights (EMA"
          f"{' + raw model' if raw is not ema else ' only'})", flush=True)
    return cfg.out


#################################################################################
#        dlc: the authors' DLC dataset (lavoies/DLC_512x256) as one of our sets #
#################################################################################
# What the columns hold, from https://github.com/lavoiems/DiscreteLatentCode (sedd/data.py trains
# SEDD on `labels`; dit/train_diffusion.py feeds `features` to the DiT and `labels` to its SEM
# embedder; dit/extract_features_withdlc.py writes them): `labels` = the DLC, int [L] (argmax of
# the SEM head on the 224 px ADM centre crop); `features` = the SD-VAE latent x 0.18215,
# float [4, 32, 32], of the 256 px crop under one random flip drawn once per image.
# Read with pyarrow alone: parquet (the hub's files) and Arrow IPC (datasets.save_to_disk).

@dataclass
class DlcConfig:
    """dlc: their rows (codes, classes, image ids, SD-VAE latents) as one of our DLC sets."""
    authors: str = ""             # a .parquet / .arrow file, or a folder of them (hub download, save_to_disk)
    out: str = ""                 # output DLC set folder
    overwrite: bool = False       # replace an existing DLC set at --out
    split: str = "train"          # the split to read where the folder holds several
    V: int = 0                    # vocabulary; 0 = from an "<L>x<V>" in the path or dataset_info.json
    latents: bool = True          # also write `features` as latents.npy (dit.py train --latents OUT)
    chunk: int = 8192             # rows per parquet read (ImageNet: 1.28M rows, 21 GB of float32 latents)


CLASS_COLUMNS = ("label", "class", "class_id", "target", "y", "cls")                 # an integer class
NAME_COLUMNS = ("path", "id", "image_id", "filename", "file_name", "name", "key")  # an image id -> index.txt


def import_pyarrow():
    try:
        import pyarrow, pyarrow.compute, pyarrow.ipc, pyarrow.parquet  # noqa: F401
    except ImportError:
        utils.fail("authors.py dlc needs pyarrow: pip install pyarrow")
    return pyarrow


def authors_files(path, split):
    """The data files of `split`, in row order: parquet (a hub snapshot: data/<split>-0000k-of-n.parquet
    or <split>/000k.parquet) or Arrow IPC (save_to_disk: state.json lists data-0000k-of-n.arrow)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        utils.fail(f"--authors {path} does not exist; download lavoies/DLC_512x256 (huggingface-cli download "
                   "--repo-type dataset) or save_to_disk it, and pass the folder")
    # save_to_disk of a DatasetDict holds one folder per split
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):  # save_to_disk of a DatasetDict
        path = os.path.join(path, split)
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        return [os.path.join(path, f["filename"]) for f in json.load(open(state))["_data_files"]]
    # a hub snapshot: every parquet / arrow file below; the split's own, by name or folder, if any
    found = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n.endswith((".parquet", ".arrow")):
                found[os.path.join(root, n)] = n
    mine = [f for f, n in found.items() if n.startswith(split + "-") or os.path.basename(os.path.dirname(f)) == split]
    files = sorted(mine or found)  # sorted by path: the same row order on every run
    if not files:
        utils.fail(f"{path} holds no .parquet or .arrow files")
    return files


def file_batches(f, columns, chunk):
    """(schema, RecordBatches of `columns`) of one parquet file or Arrow IPC file, memory-mapped:
    the IPC stream format (what datasets writes) or, failing that, the IPC file format."""
    pa = import_pyarrow()
    if f.endswith(".parquet"):
        pf = pa.parquet.ParquetFile(f)
        return pf.schema_arrow, pf.iter_batches(batch_size=chunk, columns=columns)
    try:
        reader = pa.ipc.open_stream(pa.memory_map(f))
        batches = iter(reader)
    except pa.ArrowInvalid:  # the file format: batches by index
        reader = pa.ipc.open_file(pa.memory_map(f))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    return reader.schema, (b.select(columns) for b in batches)


def count_rows(f):
    """Rows of one file: parquet's metadata, or the IPC batches' lengths (no row data is read)."""
    if f.endswith(".parquet"):
        return import_pyarrow().parquet.ParquetFile(f).metadata.num_rows
    return sum(b.num_rows for b in file_batches(f, [], 0)[1])


def column_to_numpy(arr, name):
    """A (nested) list column with equal-length rows -> numpy [rows, d1, d2, ...]."""
    pa = import_pyarrow()
    n, shape = len(arr), []
    # peel one list level per loop: one more dim
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lens = pa.compute.min_max(pa.compute.list_value_length(arr))
        if arr.null_count or lens["min"].as_py() != lens["max"].as_py():
            utils.fail(f"column {name!r} has rows of different lengths; expected one fixed-size array per row")
        shape.append(lens["min"].as_py())
        arr = arr.flatten()  # all rows' values, one level down
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)  # (rows, d1, d2, ...)


def vocab_from_names(cfg, files, L):
    """V from --V, else from "<L>x<V>" in the dataset's path or dataset_info.json (DLC_512x256)."""
    if cfg.V:
        return cfg.V
    # where the shape is written: the dataset's name (DLC_512x256) or its dataset_info.json
    texts = [os.path.abspath(cfg.authors)]
    for d in {os.path.dirname(f) for f in files} | {cfg.authors}:
        info = os.path.join(d, "dataset_info.json")
        if os.path.isfile(info):
            texts.append(open(info).read())
    for t in texts:
        for l, v in re.findall(r"(\d+)x(\d+)", t):  # every "<number>x<number>" in the text
            if int(l) == L:  # the one whose first number is the codes' length gives V
                return int(v)
    utils.fail(f"V cannot be read from {cfg.authors} (no '{L}x<V>' in its name or dataset_info.json); pass --V "
               "(lavoies/DLC_512x256: --V 256)")


def import_columns(schema, latents, path):
    """The optional columns the import reads besides the DLC column 'labels': an integer class
    column, a string image-id column and (with --latents) the SD-VAE latents 'features'; None
    where the files have none."""
    pa, names = import_pyarrow(), schema.names
    if "labels" not in names:
        utils.fail(f"{path} has no 'labels' column (the DLC); columns: {', '.join(names)}")
    cls_col = next((c for c in CLASS_COLUMNS if c in names and pa.types.is_integer(schema.field(c).type)), None)
    name_col = next((c for c in NAME_COLUMNS if c in names and pa.types.is_string(schema.field(c).type)), None)
    return cls_col, name_col, "features" if latents and "features" in names else None


def class_labels(classes, ids, cls_col, name_col):
    """(labels int64 [N] or None, where they came from): the class column, else the ImageNet
    synsets (n01440764...) in the image ids, numbered in sorted order as ImageFolder does."""
    if cls_col:  # the batches' class arrays, joined in row order
        return np.concatenate(classes).astype(np.int64), f"column {cls_col!r}"
    if ids and all(re.match(r"(?:.*/)?(n\d{8})", s or "") for s in ids[:1000]):
        syn = [re.match(r"(?:.*/)?(n\d{8})", s).group(1) for s in ids]
        order = {s: k for k, s in enumerate(sorted(set(syn)))}  # synset -> class index
        return np.array([order[s] for s in syn], dtype=np.int64), f"synsets of {name_col!r}, sorted"
    return None, None


def store_codes(codes, c, i, tmp, N, V):
    """Rows i.. of codes.npy uint16 [N, L] from a batch of 'labels' (n, L), checked against V;
    the file is created at the first batch."""
    if codes is None:
        # (N, L) uint16 on disk
        codes = np.lib.format.open_memmap(os.path.join(tmp, "codes.npy"), "w+", np.uint16, (N, c.shape[1]))
    if c.ndim != 2 or c.shape[1] != codes.shape[1]:
        utils.fail(f"'labels' rows have shape {c.shape[1:]} after {i} rows of [{codes.shape[1]}]")
    if len(c) and (c.min() < 0 or c.max() >= V):
        utils.fail(f"'labels' holds codes outside [0, V={V}) (max {c.max()}); pass the right --V")
    codes[i:i + len(c)] = c
    return codes


def store_latents(lat, f, i, tmp, N):
    """Rows i.. of latents.npy float16 [N, 1, 4, h, h] from a batch of 'features' (n, 4, h, h)
    (any layout with 4 h h values per row); the file is created at the first batch."""
    f = f.reshape(len(f), -1)                                             # (n, 4*h*h)
    if lat is None:
        h = math.isqrt(f.shape[1] // 4)  # 4 h^2 values per row
        if 4 * h * h != f.shape[1]:
            utils.fail(f"'features' rows hold {f.shape[1]} values; expected a 4 x h x h SD-VAE latent")
        lat = np.lib.format.open_memmap(os.path.join(tmp, "latents.npy"), "w+", np.float16, (N, 1, 4, h, h))
    lat[i:i + len(f), 0] = f.reshape(len(f), 4, *lat.shape[-2:])  # (n, 4, h, h) into flip index 0
    return lat


def import_dlc(cfg):
    """Stream the authors' rows into a DLC set: codes.npy uint16 [N, L], labels.npy (an integer
    class column, or the ImageNet synset of an image-id column), index.txt (image ids) and
    latents.npy float16 [N, 1, 4, h, w] (their one fixed flip per image: index 0 only)."""
    if not cfg.authors or not cfg.out:
        utils.fail("give --authors PATH (the authors' DLC dataset) and --out DIR (the DLC set)")
    utils.check_dlc_out(cfg.out, cfg.overwrite)  # a new or empty folder, or (--overwrite) a DLC set of ours
    files = authors_files(cfg.authors, cfg.split)
    cls_col, name_col, feat_col = import_columns(file_batches(files[0], [], 1)[0], cfg.latents, files[0])
    cols = ["labels"] + [c for c in (cls_col, name_col, feat_col) if c]
    N = sum(count_rows(f) for f in files)
    if N == 0:
        utils.fail(f"{cfg.authors} holds no rows")
    classes, ids, i, V = [], [], 0, None  # i: rows written so far
    from tqdm import tqdm
    with utils.atomic_path(cfg.out) as tmp, tqdm(total=N, desc="import", leave=False) as bar:
        os.makedirs(tmp)
        codes = lat = None  # memmaps made at the first batch
        for b in (b for f in files for b in file_batches(f, cols, cfg.chunk)[1]):  # every file's rows, in order
            c = column_to_numpy(b.column("labels"), "labels")                   # (n, L)
            if V is None:  # the first batch gives L
                V = vocab_from_names(cfg, files, c.shape[1])
            codes = store_codes(codes, c, i, tmp, N, V)
            if feat_col:
                lat = store_latents(lat, column_to_numpy(b.column(feat_col), feat_col), i, tmp, N)
            if cls_col:
                classes.append(b.column(cls_col).to_numpy(zero_copy_only=False))  # (n,) ints of this batch
            if name_col:
                ids += b.column(name_col).to_pylist()  # image ids, in row order
            i += len(c)
            bar.update(len(c))
        codes.flush()  # the memmaps reach the disk before meta.json says the set is complete
        if lat is not None:
            lat.flush()
        # class labels from the class column, or from the ImageNet ids in the image names
        labels, source = class_labels(classes, ids, cls_col, name_col)
        if labels is not None:
            np.save(os.path.join(tmp, "labels.npy"), labels)
        if ids:
            with open(os.path.join(tmp, "index.txt"), "w") as fh:
                fh.writelines(f"{s}\n" for s in ids)
        meta = {"L": int(codes.shape[1]), "V": int(V), "N": int(N), "source": os.path.abspath(cfg.authors),
                "dataset": "lavoies/DLC_512x256 (the authors' DLC dataset)",
                "files": [os.path.basename(f) for f in files],
                "command": "python authors.py dlc " + " ".join(sys.argv[2:]), "labels": source, "index": name_col}
        if lat is not None:
            meta["latents"] = {"column": feat_col, "scale": 0.18215, "shape": list(lat.shape),
                               "flip": "one random flip per image, fixed at the authors' extraction (no index 1)"}
        utils.save_json(meta, os.path.join(tmp, "meta.json"))  # atomic_path swaps it in for an older or empty folder
    print(f"wrote {N} codes [N, L={codes.shape[1]}] V={V} to {cfg.out}" + (" + latents.npy" if lat is not None else ""))
    return cfg.out


COMMANDS = {"sem": (convert_sem, SemConfig, utils.presets_for(sem.PRESETS, SemConfig)),
            "sedd": (convert_sedd, SeddConfig, None), "dit": (convert_dit, DitConfig, None),
            "dlc": (import_dlc, DlcConfig, None)}


def main(argv=None):
    return utils.main(COMMANDS, __doc__, argv, default=None)   # no default: authors.py sem|sedd|dit|dlc


if __name__ == "__main__":
    main()
