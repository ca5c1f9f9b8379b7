"""The documentation stays true: every `python X.py CMD` line of README.md, pipeline.sh, paper.sh,
BENCHMARKS.md, docs/*.md and the scripts' docstrings names a sub-command that exists and options
it takes; the README stays readable in one sitting; the scripts keep >= 20 comment lines per 100
and functions of at most 60 lines; and no file points at documents outside the repository."""
import ast, dataclasses, glob, importlib, json, os, re, subprocess, sys

from conftest import ROOT
import utils

DOCS = ["README.md", "pipeline.sh", "paper.sh", "BENCHMARKS.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = ["toy_gmm.py", "sem.py", "sedd.py", "dit.py", "text2dlc.py", "evaluate.py", "authors.py", "utils.py"]
# a documented command line: `python X.py`, `$PY "$D/X.py"` (pipeline.sh) or `torchrun [options] X.py`,
# then its words up to the end of the line (shell continuations joined), a backtick, a comment or a
# shell operator
LAUNCH = r'(?:\bpython3?|\$PY|\$\{PYTHON[^}]*\}|\btorchrun(?:\s+-\S+)*)'
LINE = re.compile(LAUNCH + r'\s+"?(?:\$D/|\./)?([A-Za-z_]\w*)\.py"?([^`#|;&>\n]*)')


def command_lines(text):
    """[(script, words after X.py)] of the command lines in a text that name one of our scripts."""
    return [(script, [w.strip('"`\'') for w in rest.split()])
            for script, rest in LINE.findall(text.replace("\\\n", " "))
            if os.path.exists(os.path.join(ROOT, script + ".py"))]  # not `python -m pytest`, other tools


def subcommand(words):
    """(sub-command, its options) of a line's words: None for the script's default sub-command, ""
    for a placeholder such as CMD that names no concrete one."""
    if words[:1] == ["--"]:                               # torchrun ... X.py -- CMD: torchrun drops the --
        words = words[1:]
    if not words or words[0].startswith("-"):
        return None, words
    return (words[0] if re.fullmatch(r"[a-z][a-z0-9_]*", words[0]) else ""), words[1:]


def commands_of(lines):
    """{(script, cmd)} of (script, words) lines; cmd is None for the script's default sub-command,
    and placeholders (CMD) are left out."""
    return {(script, cmd) for script, words in lines for cmd in [subcommand(words)[0]] if cmd != ""}


def commands_in(text):
    return commands_of(command_lines(text))


def documented_lines():
    """[(where, script, words after X.py)] of every documented command line, the scripts' own
    docstrings included (students read them first)."""
    texts = [(name, open(os.path.join(ROOT, name)).read()) for name in DOCS if os.path.exists(os.path.join(ROOT, name))]
    texts += [(name, ast.get_docstring(ast.parse(open(os.path.join(ROOT, name)).read())) or "") for name in SCRIPTS]
    return [(where, script, words) for where, text in texts for script, words in command_lines(text)]


def documented_commands():
    return commands_of((script, words) for _, script, words in documented_lines())


def dispatcher_names(script):
    """String constants of the script's dispatcher, wherever the command names live: main(), a
    module-level COMMANDS table, or the `if __name__ == "__main__":` block (a shared dispatcher)."""
    tree = ast.parse(open(os.path.join(ROOT, script + ".py")).read())
    parts = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            parts.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and "COMMAND" in t.id.upper() for t in targets):
                parts.append(node)
        elif isinstance(node, ast.If):                    # if __name__ == "__main__": ...
            parts.append(node)
    return {n.value for part in parts for n in ast.walk(part)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# one subprocess per script: import it and call main([CMD, "--help"]) for each documented CMD;
# prints {cmd: [exit code or message]} (utils.fail raises SystemExit("error: ..."))
PROBE = r"""
import contextlib, io, json, sys
mod = __import__(sys.argv[1])
out = {}
for cmd in sys.argv[2:]:
    argv = ([] if cmd == "-" else [cmd]) + ["--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            mod.main(argv)
        out[cmd] = 0
    except SystemExit as e:
        out[cmd] = 0 if e.code in (0, None) else str(e.code)
print("RESULT " + json.dumps(out))
"""


def missing_commands(pairs):
    """The (script, cmd) pairs that do not exist, as lines "python X.py CMD: why". One subprocess
    per script, all started at once (importing torch dominates)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    procs = {}
    for script in sorted({s for s, _ in pairs}):
        cmds = sorted({c or "-" for s, c in pairs if s == script})
        procs[script] = subprocess.Popen([sys.executable, "-c", PROBE, script, *cmds], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bad = []
    for script, p in procs.items():
        out, err = p.communicate(timeout=900)
        line = [l for l in out.splitlines() if l.startswith("RESULT ")]
        assert line, f"{script}: {err[-2000:]}"
        known = dispatcher_names(script)
        for cmd, res in json.loads(line[-1][7:]).items():
            if res == 0:
                continue                                  # --help printed and exited 0
            # no --help for this command: it must reach its option parser (not "unknown command")
            # and be named in the dispatcher
            unknown = "unknown command" in res or "unknown sub-command" in res
            if unknown or (cmd != "-" and cmd not in known):
                bad.append(f"python {script}.py {'' if cmd == '-' else cmd}: {res}")
    return bad


def test_documented_commands_exist():
    pairs = documented_commands()
    assert {"toy_gmm", "sem", "sedd", "dit", "text2dlc", "evaluate", "authors"} <= {s for s, _ in pairs}, pairs
    bad = missing_commands(pairs)
    assert not bad, "documented commands that do not exist:\n" + "\n".join(bad)


def test_missing_command_is_caught():
    """toy_gmm.py parses its options before it looks at the command, so only the dispatcher
    check can tell that `sample` is not one of its commands."""
    bad = missing_commands({("toy_gmm", "sample"), ("toy_gmm", "bench"), ("toy_gmm", None)})
    assert len(bad) == 1 and bad[0].startswith("python toy_gmm.py sample"), bad


def test_parser_sees_commands():
    """The parser itself: pipeline.sh's style, torchrun with `--`, default commands, placeholders."""
    text = ('$PY "$D/sem.py" encode --ckpt x\n torchrun --nproc_per_node=8 dit.py -- sample --n 1\n'
            'python toy_gmm.py --modes=4\npython sedd.py CMD --help\npython -m pytest -q tests\n')
    assert commands_in(text) == {("sem", "encode"), ("dit", "sample"), ("toy_gmm", None)}


def option_errors(where, script, words):
    """Why a documented line would not parse: an option that is no field of its sub-command's
    config (aliases allowed) or a preset it does not have. Values are not checked (placeholders)."""
    mod = importlib.import_module(script)
    cmd, words = subcommand(words)
    if cmd == "":
        return []                                                       # a placeholder such as CMD
    cmd = cmd or "train"                                                # the default sub-command
    if cmd not in mod.COMMANDS:
        return [f"{where}: python {script}.py: no sub-command {cmd!r}"]
    _, cls, presets = mod.COMMANDS[cmd]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = []
    for i, w in enumerate(words):
        m = re.fullmatch(r"--([A-Za-z][\w-]*)(=.*)?", w)
        if not m:
            continue
        key = m.group(1).replace("-", "_")
        key = utils.ALIASES.get(key, key) if utils.ALIASES.get(key) in fields else key
        if key == "preset":
            name = (m.group(2) or "=")[1:] or (words[i + 1] if i + 1 < len(words) else "")
            if not name.startswith("$") and name not in (presets or {}):
                bad.append(f"{where}: python {script}.py {cmd}: no preset {name!r}")
        elif key not in fields and key != "help":
            bad.append(f"{where}: python {script}.py {cmd}: no option --{key}")
    return bad


def test_documented_options_exist():
    """Every option written on a documented command line is one its sub-command takes."""
    lines = documented_lines()
    assert len(lines) > 50 and {s for _, s, _ in lines} >= {"sem", "sedd", "dit", "text2dlc", "evaluate"}
    bad = [e for line in lines for e in option_errors(*line)]
    assert not bad, "documented options that do not exist:\n" + "\n".join(sorted(set(bad)))


def test_option_check_catches_a_wrong_option():
    assert option_errors("x", "sedd", ["sample", "--ckpt", "a", "--num", "3", "--run-name", "b"]) == [
        "x: python sedd.py sample: no option --run_name"]                  # --num is an alias of --n
    assert option_errors("x", "dit", ["--preset", "imagenet", "--steps=2"]) == []
    assert option_errors("x", "dit", ["--preset=nope"]) == ["x: python dit.py train: no preset 'nope'"]
    assert option_errors("x", "sedd", ["synth", "--n", "3"]) == ["x: python sedd.py: no sub-command 'synth'"]
    assert option_errors("x", "evaluate", ["CMD", "--help"]) == []      # a placeholder


def test_readme_readable_in_one_sitting():
    n = len(open(os.path.join(ROOT, "README.md")).read().splitlines())
    assert n <= 350, f"README.md has {n} lines (at most 350; per-script detail goes to docs/)"


def test_no_reference_to_files_outside_the_repository():
    files = [p for ext in ("md", "py") for p in glob.glob(os.path.join(ROOT, "**", "*." + ext), recursive=True)
             if os.sep + "runs" + os.sep not in p]
    assert files
    bad = []
    for path in files:
        text = open(path, errors="replace").read()
        for name in FORBIDDEN:
            if name in text:
                bad.append(f"{os.path.relpath(path, ROOT)}: {name}")
    assert not bad, bad


# written in two pieces so that this file does not name them itself
FORBIDDEN = ["REFERENCE" + ".md", "DESIGN" + ".md", "GUIDELINES" + ".md"]


def readability(path):
    """(lines, comment lines, [(function, its lines) over 60]) of a Python file. A comment line
    has words: section banners (#####) and pragmas (# noqa, # type: ...) do not count."""
    import io, tokenize
    src = open(path).read()
    words = lambda c: re.search(r"[A-Za-z]", c) and not re.match(r"#\s*(noqa|type:|pragma)", c)
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT and words(t.string)}
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(ast.parse(src))
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60]
    return len(src.splitlines()), len(comments), long


def test_scripts_commented_and_functions_short():
    """Every script: >= 20 comment lines per 100 lines, and no function longer than 60 lines."""
    bad = []
    for name in SCRIPTS:
        n, c, long = readability(os.path.join(ROOT, name))
        if 100 * c < 20 * n:
            bad.append(f"{name}: {c} comment lines in {n} ({100 * c / n:.1f} per 100; at least 20)")
        bad += [f"{name}: {f}() is {k} lines (at most 60)" for f, k in long]
    assert not bad, bad


def test_readability_measure(tmp_path):
    """The measure itself: a comment-free 61-line function fails both checks; a comment counts once,
    a banner or a pragma not at all."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "a.py").write_text(f"def f():\n{body}\n")
    assert readability(tmp_path / "a.py") == (61, 0, [("f", 61)])
    (tmp_path / "b.py").write_text("x = 1  # one\n# two\ns = '# not a comment'\n####\ny = 2  # noqa\n")
    assert readability(tmp_path / "b.py") == (5, 2, [])
