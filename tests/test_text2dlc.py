"""text2dlc.py: Eq. 5 by hand, SFT masking, the sampler against an oracle, vocabulary
extension on a tiny transformers model, torchrun (DDP tiny and FSDP2 on gloo), bad input."""
import json, math, os, subprocess, sys

import numpy as np
import pytest
import torch

import utils
from conftest import ROOT, captioned_dlc_set, run_script, torchrun
import text2dlc as t2d

SCRIPT = os.path.join(ROOT, "text2dlc.py")


def run_main(args, cwd, monkeypatch):
    """The command line in this process (torch is already imported: seconds, not tens)."""
    monkeypatch.chdir(cwd)
    t2d.main([str(a) for a in args])


def fails_with(args, cwd, monkeypatch, words):
    with pytest.raises(SystemExit) as e:
        run_main(args, cwd, monkeypatch)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and words in msg, msg


def test_loss_by_hand():
    # T = 3 tokens, vocabulary 2, uniform logits at every position: CE = log 2 wherever masked
    x0 = torch.tensor([[0, 1, 1]])
    logits = torch.zeros(1, 3, 2)
    masked = torch.tensor([[True, False, True]])
    p = torch.tensor([[0.5]])
    got = t2d.masked_diffusion_loss(logits, x0, masked, p, n_tokens=3)
    assert math.isclose(got.item(), (2 * math.log(2) / 0.5) / 3, rel_tol=1e-6)
    # a confident logit where nothing is masked changes nothing; a wrong one on a masked token does
    logits2 = logits.clone()
    logits2[0, 1] = torch.tensor([50.0, -50.0])                # position 1 (unmasked) badly wrong
    assert math.isclose(t2d.masked_diffusion_loss(logits2, x0, masked, p, 3).item(), got.item(), rel_tol=1e-6)
    logits2[0, 0] = torch.tensor([-5.0, 5.0])
    assert t2d.masked_diffusion_loss(logits2, x0, masked, p, 3).item() > got.item() + 1


def test_unmasked_positions_have_zero_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    x0 = torch.randint(7, (2, 5))
    masked = torch.rand(2, 5) < 0.5
    t2d.masked_diffusion_loss(logits, x0, masked, torch.full((2, 1), 0.3), 10).backward()
    assert (logits.grad[~masked] == 0).all() and (logits.grad[masked].abs().sum(-1) > 0).all()


def test_forward_process_rate_and_sft_mask():
    x0 = torch.randint(10, (4000, 20))
    L = 8
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, L:] = False                                    # SFT: caption never masked
    t = torch.full((4000,), 0.5)
    xt, m, p = t2d.forward_process(x0, 99, 1e-3, maskable, t=t)
    assert not m[:, L:].any() and (xt[:, L:] == x0[:, L:]).all()
    assert abs(m[:, :L].float().mean().item() - ((1 - 1e-3) * 0.5 + 1e-3)) < 0.01
    assert ((xt == 99) == m).all()


def test_linear_schedule():
    assert t2d.num_transfer_tokens(10, 4).tolist() == [3, 3, 2, 2]
    assert t2d.num_transfer_tokens(8, 8).tolist() == [1] * 8


def test_sampler_oracle_most_confident_first():
    L, V, off, start, mask_id, steps = 6, 5, 10, 15, 2, 3
    vocab = off + V + 1
    conf_order = [3, 0, 5, 1, 4, 2]                            # position 3 most confident, then 0, ...
    target = torch.tensor([4, 1, 0, 2, 3, 1])

    def oracle(x):                                             # controlled logits, huge mass off the DLC range
        B, T = x.shape
        lg = torch.zeros(B, T, vocab)
        lg[..., :off] = 100.0                                  # word ids would win without the restriction
        for rank, pos in enumerate(conf_order):
            lg[:, pos, off + target[pos]] = 10.0 - rank        # sharper = more confident
        return lg

    hist = []
    codes = t2d.sample_dlc(oracle, torch.zeros(2, 4, dtype=torch.long), L, V, off, start, mask_id, steps,
                           temperature=0.0, history=hist)
    assert len(hist) == steps
    assert (codes == target).all() and codes.min() >= 0 and codes.max() < V
    filled = [set((h[0] != mask_id).nonzero().flatten().tolist()) for h in hist]
    assert filled[0] == {3, 0} and filled[1] == {3, 0, 5, 1} and filled[2] == set(range(L))
    # Gumbel draws stay in range and are reproducible with a generator
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = t2d.sample_dlc(oracle, torch.zeros(2, 4, dtype=torch.long), L, V, off, start, mask_id, 2, 1.0, generator=g1)
    b = t2d.sample_dlc(oracle, torch.zeros(2, 4, dtype=torch.long), L, V, off, start, mask_id, 2, 1.0, generator=g2)
    assert (a == b).all() and a.min() >= 0 and a.max() < V


def tiny_hf_model_dir(path, vocab_words=("a", "red", "green", "blue", "square", "circle", "on", "background")):
    """A randomly initialised 2-layer Llama with a word-level tokenizer, saved offline."""
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]", "[PAD]", "[EOS]", "[MASK]"] + list(vocab_words)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    cfg = tf.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, mask_token_id=3)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_vocab_extension_keeps_old_rows(tmp_path):
    path = tiny_hf_model_dir(tmp_path / "hf")
    model, tok = t2d.load_hf(path)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    out0 = model.get_output_embeddings().weight.detach().clone()
    ids = torch.tensor([tok("a red square", add_special_tokens=False)["input_ids"]])
    V = 7
    off, start = t2d.extend_vocab(model, V)
    assert (off, start) == (emb0.shape[0], emb0.shape[0] + V)
    emb1, out1 = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb1.shape[0] == emb0.shape[0] + V + 1 and out1.shape[0] == out0.shape[0] + V + 1
    assert torch.equal(emb1[: emb0.shape[0]], emb0) and torch.equal(out1[: out0.shape[0]], out0)
    assert model.config.vocab_size == emb0.shape[0] + V + 1
    assert tok("a red square", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert t2d.model_logits(model, torch.tensor([[start, off + V - 1]])).shape[-1] == emb0.shape[0] + V + 1


def test_train_sample_probe_end_to_end(tmp_path, monkeypatch, capsys):
    dlc = captioned_dlc_set(tmp_path / "dlc")
    run_main(["--dlc", dlc, "--run", "t", "--steps", "10", "--batch_size", "16", "--d_model", "32",
              "--n_layers", "1", "--log_every", "5", "--ckpt_every", "10"], tmp_path, monkeypatch)
    assert os.path.isfile(tmp_path / "runs/text2dlc-t/checkpoints/ckpt_0000010.pt")
    out = tmp_path / "gen"
    run_main(["sample", "--ckpt", tmp_path / "runs/text2dlc-t", "--prompt",
              "a red square on a green background", "--n", "5", "--out", out, "--steps", "4"], tmp_path, monkeypatch)
    s = utils.load_dlc_set(str(out), L=8, V=32)
    assert s["codes"].shape == (5, 8) and s["meta"]["prompt"] == "a red square on a green background"
    assert s["meta"]["sampler"]["steps"] == 4
    capsys.readouterr()
    run_main(["probe", "--dlc", out, "--ref", dlc], tmp_path, monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["all_match"] <= 1 and res["n"] == 5


def test_torchrun_tiny_ddp(tmp_path):
    dlc = captioned_dlc_set(tmp_path / "dlc")
    torchrun([SCRIPT, "--dlc", dlc, "--steps", "4", "--batch_size", "8", "--d_model", "32",
              "--n_layers", "1", "--log_every", "2", "--global_batch", "32"], cwd=tmp_path)
    log = open(tmp_path / "runs/text2dlc-toy/log.txt").read()
    assert "world=2 accum=2" in log and "step       4" in log


def test_torchrun_fsdp_hf_path(tmp_path, monkeypatch):
    path = tiny_hf_model_dir(tmp_path / "hf")
    dlc = captioned_dlc_set(tmp_path / "dlc", n=64)
    torchrun([SCRIPT, "--model", "llada", "--model_path", path, "--dlc", dlc, "--steps", "3",
              "--batch_size", "4", "--log_every", "1", "--act_ckpt", "--max_caption", "8", "--ema_decay", "0"],
             cwd=tmp_path)
    log = open(tmp_path / "runs/text2dlc-toy/log.txt").read()
    assert "fsdp=True" in log and "step       3" in log
    ck = utils.load_checkpoint(str(tmp_path / "runs/text2dlc-toy/checkpoints/ckpt_0000003.pt"))
    assert ck["model"]["model.embed_tokens.weight"].shape[0] == 12 + 32 + 1   # consolidated, extended
    run_main(["sample", "--ckpt", tmp_path / "runs/text2dlc-toy", "--prompt", "a red square",
              "--n", "2", "--out", tmp_path / "g", "--steps", "2"], tmp_path, monkeypatch)
    assert utils.load_dlc_set(str(tmp_path / "g"), L=8, V=32)["codes"].shape == (2, 8)


def test_bad_input_one_line_nothing_written(tmp_path, monkeypatch):
    nocap = captioned_dlc_set(tmp_path / "nocap", captions=False)
    fails_with(["--dlc", nocap, "--run", "x"], tmp_path, monkeypatch, "captions.jsonl")
    fails_with(["--model", "llada", "--model_path", tmp_path / "nope", "--dlc", nocap, "--run", "x"],
               tmp_path, monkeypatch, "model_path")
    assert not os.path.exists(tmp_path / "runs")
    # V mismatch between a checkpoint and the DLC set (resume), and bad sampler settings
    a = captioned_dlc_set(tmp_path / "a")
    run_main(["--dlc", a, "--run", "v", "--steps", "2", "--batch_size", "4", "--d_model", "16",
              "--n_layers", "1", "--ckpt_every", "2"], tmp_path, monkeypatch)
    b = captioned_dlc_set(tmp_path / "b", V=40)
    before = sorted(os.listdir(tmp_path / "runs/text2dlc-v")), open(tmp_path / "runs/text2dlc-v/log.txt").read()
    fails_with(["--dlc", b, "--run", "v", "--resume", "--steps", "4"], tmp_path, monkeypatch, "V=32")
    assert (sorted(os.listdir(tmp_path / "runs/text2dlc-v")), open(tmp_path / "runs/text2dlc-v/log.txt").read()) == before
    fails_with(["sample", "--ckpt", tmp_path / "runs/text2dlc-v", "--prompt", "a red square",
                "--out", tmp_path / "o", "--steps", "99"], tmp_path, monkeypatch, "--steps")
    assert not os.path.exists(tmp_path / "o")
    fails_with(["probe", "--dlc", a, "--ref", b], tmp_path, monkeypatch, "V=")


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    # 3 steps then --resume to 6 == 6 in one go: every draw (batch, t, masks) is a function of
    # (seed, step, rank); warm-up (50 steps) covers all 6, so the lr does not depend on --steps
    dlc = captioned_dlc_set(tmp_path / "dlc")
    tiny = ["--dlc", dlc, "--batch_size", "8", "--d_model", "16", "--n_layers", "1", "--log_every", "1"]
    run_main([*tiny, "--run", "full", "--steps", "6"], tmp_path, monkeypatch)
    run_main([*tiny, "--run", "half", "--steps", "3"], tmp_path, monkeypatch)
    run_main([*tiny, "--run", "half", "--steps", "6", "--resume"], tmp_path, monkeypatch)
    a = utils.load_checkpoint(str(tmp_path / "runs/text2dlc-full/checkpoints/ckpt_0000006.pt"))
    b = utils.load_checkpoint(str(tmp_path / "runs/text2dlc-half/checkpoints/ckpt_0000006.pt"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i, st in a["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["opt"]["state"][i][k]), (i, k)
    loss = lambda run: [l.split("loss ")[1][:6] for l in open(tmp_path / f"runs/text2dlc-{run}/log.txt") if "loss" in l]
    assert loss("half") == loss("full")


def test_prompt_words_unknown_warn_or_refuse(tmp_path, monkeypatch, capsys):
    dlc = captioned_dlc_set(tmp_path / "dlc")
    run_main(["--dlc", dlc, "--run", "w", "--steps", "1", "--batch_size", "4", "--d_model", "16",
              "--n_layers", "1"], tmp_path, monkeypatch)
    capsys.readouterr()
    base = ["sample", "--ckpt", tmp_path / "runs/text2dlc-w", "--n", "2", "--steps", "2"]
    run_main([*base, "--prompt", "a scarlet square on a green backdrop", "--out", tmp_path / "g"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert "warning:" in err and "backdrop, scarlet" in err
    assert utils.load_dlc_set(str(tmp_path / "g"))["codes"].shape == (2, 8)
    fails_with([*base, "--prompt", "zebra crossing", "--out", tmp_path / "z"], tmp_path, monkeypatch, "none of its words")
    assert not os.path.exists(tmp_path / "z")
def authors_llada_dir(path, V=5):
    """A tiny random Llama folder extended as the authors' finetuning does: <|start_sem|> as the
    sep token, then <|sem_vocab_i|> for i < V, embeddings resized (lavoies/DLC_LLADA_L512's layout)."""
    tf = pytest.importorskip("transformers")
    from tokenizers import AddedToken
    tiny_hf_model_dir(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"sep_token": t2d.AUTHORS_START})
    tok.add_tokens([AddedToken(t2d.AUTHORS_DLC.format(i), single_word=True, normalized=False) for i in range(V)])
    model = tf.LlamaForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def test_authors_llada_folder_token_mapping_and_sample(tmp_path, monkeypatch):
    path, tok = authors_llada_dir(tmp_path / "dlc_llada", V=5)
    be, state = t2d.authors_backend(path, L=4)
    assert (state["V"], be.dlc_offset, be.extra["start_id"]) == (5, tok.convert_tokens_to_ids("<|sem_vocab_0|>"),
                                                                 tok.convert_tokens_to_ids("<|start_sem|>"))
    assert be.dlc_offset + 4 == tok.convert_tokens_to_ids("<|sem_vocab_4|>")   # value i = id(start) + 1 + i
    prompt = be.encode(["a red square"])
    assert prompt[0].tolist() == tok("<|start_sem|>a red square")["input_ids"]  # their chat_sem.py prompt
    target = torch.tensor([3, 0, 4, 1])
    ids = torch.tensor([tok.convert_tokens_to_ids(f"<|sem_vocab_{int(t)}|>") for t in target])

    def oracle(x):                                             # their layout: [L masks, <|start_sem|> prompt]
        assert (x[:, 4:] == prompt).all()
        lg = torch.zeros(*x.shape, len(tok))
        lg[:, torch.arange(4), ids] = 5.0
        return lg
    for remasking in ("low_confidence", "random"):
        codes = t2d.sample_dlc(oracle, prompt.expand(2, -1), 4, 5, be.dlc_offset, be.start_id, be.mask_id, 2,
                               temperature=0.0, remasking=remasking, generator=torch.Generator().manual_seed(0))
        assert (codes == target).all()
    out = tmp_path / "gen"
    run_main(["sample", "--model_path", path, "--L", "4", "--prompt", "a red square", "--n", "3", "--steps", "2",
              "--temperature", "0.2", "--remasking", "random", "--out", out], tmp_path, monkeypatch)
    s = utils.load_dlc_set(str(out), L=4, V=5)
    assert s["codes"].shape == (3, 4) and s["meta"]["sampler"]["remasking"] == "random"
    # training on their folder uses their ids: no second vocabulary extension
    cfg = {"model": "llada", "model_path": path, "seed": 0, "max_caption": 4}
    be2 = t2d.build_backend(cfg, 4, 5)
    assert (be2.dlc_offset, be2.start_id) == (be.dlc_offset, be.extra["start_id"])
    assert be2.model.get_input_embeddings().weight.shape[0] == len(tok)
    fails_with(["sample", "--model_path", path, "--prompt", "a", "--out", tmp_path / "o"], tmp_path, monkeypatch, "--L")
    plain = tiny_hf_model_dir(tmp_path / "plain")
    fails_with(["sample", "--model_path", plain, "--L", "4", "--prompt", "a", "--out", tmp_path / "o"], tmp_path,
               monkeypatch, "<|start_sem|>")
    assert not os.path.exists(tmp_path / "o")


def test_probe_breaks_ties_by_the_nearest_code_whatever_the_hash_seed(tmp_path):
    """k = 2 neighbours that disagree on every attribute: the vote is a tie, and the nearer code
    (distance 0) decides, in every process (a set's iteration order follows PYTHONHASHSEED)."""
    ref_caps = ["a red square on a green background", "a blue circle on a yellow background"]
    utils.save_dlc_set(str(tmp_path / "ref"), np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), {"L": 4, "V": 4},
                       captions=ref_caps)
    utils.save_dlc_set(str(tmp_path / "gen"), np.array([[0, 0, 0, 0], [1, 1, 1, 1]]),
                       {"L": 4, "V": 4, "prompt": ref_caps[0]}, captions=ref_caps)
    code = "import sys, text2dlc; text2dlc.main(sys.argv[1:])"
    for seed in ("0", "1", "2"):
        p = subprocess.run([sys.executable, "-c", code, "probe", "--dlc", str(tmp_path / "gen"), "--ref",
                            str(tmp_path / "ref"), "--k", "2"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed})
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.strip().splitlines()[-1])["all_match"] == 1.0, seed
