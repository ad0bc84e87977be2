"""The docs cannot drift: what README.md and docs/*.md name must exist in the code they describe.

Checked: every relative link (and its #anchor) and every repository path; every `module.function` named;
every `make` target and make variable; every flag written after a script (`python generate.py --k 5`,
`evaluate.py --ranker-dtype`, `bash run_loop.sh`) is one that script's argparse parser accepts; every config
variable (VAR=... in commands, a backticked ALL_CAPS name) is one that the configs, run_loop.sh, the Makefile or
the code sets or reads; docs/configuration.md's table gives each config variable's real default and flag; and no
doc, config, script or docstring speaks of how the project was made (sessions, lent machines, "issue N").
Reads files only: no model, no subprocess but bash sourcing a config.
"""
import ast
import glob
import os
import re
import subprocess

import pytest

from conftest import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Named in the docs but set or read by nothing here: the variable and why it is named.
EXTERNAL_VARS = {"ATEN_CPU_CAPABILITY": "read by torch: the CPU kernel family (docs/tests.md, make test-kernels)",
                 "OMP_NUM_THREADS": "read by torch (OpenMP): a process's threads (docs/troubleshooting.md)",
                 "OPENAI_API_KEY": "read by alpaca_eval's GPT-4 Turbo judge",
                 "WANDB_MODE": "read by wandb (offline: no account, no network)",
                 "FRAC_LEN": "the released code's generate.sh variable (reproducing.md's deviation table)",
                 "VAR": "the placeholder in `VAR=${VAR:-default}`",
                 "SLURM_CONF": "read by SLURM's commands (docs/cluster.md's cluster on one machine)",
                 "HF_TOKEN": "read by huggingface_hub: the token for gated models",
                 "HF_HOME": "read by huggingface_hub: where the token and the hub cache live",
                 "HF_HUB_OFFLINE": "read by huggingface_hub: no network, the cache only",
                 "NCCL_DEBUG": "read by NCCL (docs/troubleshooting.md)", "NCCL_IB_DISABLE": "read by NCCL",
                 "NCCL_SOCKET_IFNAME": "read by NCCL"}
CONFIGS = ["mistral7b", "tiny"]  # the columns of docs/configuration.md's table


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# -----------------------------------------------------------------------------
# markdown: code lines, inline code spans, links, headings

def split_markdown(text):
    """(command lines of the code blocks, prose lines). A code block is fenced (```) or indented 4 spaces after
    a blank line; continuation lines ending in `\\` are joined and `#` comments dropped."""
    code, prose, fenced, in_indented, prev_blank = [], [], False, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and (prev_blank or in_indented)
        if fenced or indented:
            code.append(line)
        else:
            prose.append(line)
        in_indented = indented or (in_indented and not line.strip())
        prev_blank = not line.strip()
    joined = re.sub(r"\\\n\s*", " ", "\n".join(code))
    commands = [re.sub(r"(^|\s)#.*", "", line).strip() for line in joined.splitlines()]
    return [c for c in commands if c], prose


def inline_spans(prose):
    """The text of every `code span` (one may run across a line break)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", "\n".join(prose))]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(rel):
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", read(rel), flags=re.M)}


def parsed(rel):
    commands, prose = split_markdown(read(rel))
    return commands, prose, inline_spans(prose)


# -----------------------------------------------------------------------------
# what the code defines

def tracked_top_level():
    """The repository's top-level names (what `git ls-files` holds; the working tree where git is missing)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {f.split("/")[0] for f in files.split()}
    except (OSError, subprocess.CalledProcessError):
        names = set(os.listdir(ROOT)) - {".venv", "runs", ".git"}
    return names | {"docs"}


def script_flags(rel):
    """The option strings a script accepts: its parser() when it has one (the stages), else the literal
    add_argument("--...") calls in its source; evaluate.py also passes generate.py's flags through."""
    module = rel[:-3].replace("/", ".")
    if "/" not in rel and "def parser()" in read(rel):
        import importlib
        flags = set(importlib.import_module(module).parser()._option_string_actions)
    else:
        flags = {a.value for node in ast.walk(ast.parse(read(rel)))
                 if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                 for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    if rel in ("evaluate.py", "answers.py"):  # both pass the flags they do not know to generate.py
        flags |= script_flags("generate.py")
    return flags | {"-h", "--help"}


def module_names(rel):
    """Top-level names a Python file defines (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(read(rel)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def make_targets_and_vars():
    text = read("Makefile")
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.M))
    variables = set(re.findall(r"^(\w+)\s*[?:]?=", text, flags=re.M))
    return targets, variables


def known_variables():
    """Every variable a reader may be told to set: config and run_loop.sh assignments, make variables, the
    environment variables our code reads, and the few read by outside tools (EXTERNAL_VARS)."""
    names = set(EXTERNAL_VARS)
    for rel in [*glob.glob(os.path.join(ROOT, "configs", "*.env")), os.path.join(ROOT, "run_loop.sh")]:
        text = read(rel)
        names |= set(re.findall(r"(?:^|[\s;])(?:export\s+)?([A-Z][A-Z0-9_]*)=", text))
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))  # read: $CUDA_VISIBLE_DEVICES, ${GEN_ARGS-}
    names |= make_targets_and_vars()[1]
    for rel in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if "/.venv/" not in rel:
            names |= set(re.findall(r"environ(?:\.get\(|\.setdefault\(|\[)\"([A-Z][A-Z0-9_]*)\"", read(rel)))
    return names


# -----------------------------------------------------------------------------
# what the docs name

SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def script_calls(command):
    """(script, [flags]) for every repository script in a command line: the flags written after it, up to
    the next shell separator."""
    tokens, calls = command.split(), []
    for i, tok in enumerate(tokens):
        script = tok.strip("\"'")
        if not (script.endswith(".py") or script.endswith(".sh")) or not os.path.isfile(os.path.join(ROOT, script)):
            continue
        flags, depth = [], 0  # depth: inside a usage line's [...], where `|` separates alternatives
        for t in tokens[i + 1:]:
            if depth == 0 and (t in SEPARATORS or t.endswith(";")):
                break
            depth += t.count("[") - t.count("]")
            m = re.match(r"^\[?(--?[a-zA-Z][\w-]*)", t)
            if m:
                flags.append(m.group(1))
        calls.append((script, flags))
    return calls


def repo_paths(token, top):
    """The repository path a token names, or None: its first component must be a tracked top-level name."""
    path = token.lstrip("\"'([").rstrip("\"'.,:;)]").rstrip("/")
    if not path or not re.fullmatch(r"[\w.\-/*{},]+", path):
        return None
    stem, _, attr = path.rpartition(".")
    if stem and os.path.isfile(os.path.join(ROOT, stem + ".py")) and attr != "py":
        return None  # `bench/benchutil.import_llm_blender`: a function, checked as one
    first = path.split("/")[0]
    if first not in top or ("/" not in path and not re.search(r"\.(py|sh|md|env|txt|json|png|ini|cff)$", path)
                            and first not in {"Makefile", "docs", "tests", "configs", "bench", "examples"}):
        return None
    return path


def exists(path):
    for alt in re.findall(r"\{([^}]*)\}", path)[:1]:  # configs/{a,b}.env: each must exist
        return all(exists(path.replace("{" + alt + "}", a, 1)) for a in alt.split(","))
    return bool(glob.glob(os.path.join(ROOT, path)))


def doc_items():
    """Per doc: its command lines (code blocks, then every inline span) and its prose."""
    items = []
    for rel in DOCS:
        commands, prose, spans = parsed(rel)
        items.append((rel, commands + spans, prose))
    return items


# -----------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("rel", DOCS)
def test_links_resolve(rel):
    _, prose, _ = parsed(rel)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
        if not os.path.exists(os.path.join(ROOT, dest)):
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest}")
    assert not bad, f"{rel}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", DOCS)
def test_named_paths_and_functions_exist(rel):
    commands, _, spans = parsed(rel)
    top, bad = tracked_top_level(), []
    for tok in {t for line in commands + spans for t in line.split()}:
        path = repo_paths(tok, top)
        if path and not exists(path):
            bad.append(f"path {path}")
    modules = {os.path.basename(p)[:-3]: os.path.relpath(p, ROOT) for d in ("", "examples/tiny", "bench")
               for p in glob.glob(os.path.join(ROOT, d, "*.py"))}
    for span in spans:  # `common.encode_prompt`, `world.judge_score`, `bench/benchutil.import_llm_blender()`
        m = re.fullmatch(r"([\w/]+)\.(\w+)(?:\(\))?", span)
        if not m or m.group(2) in {"py", "sh", "md", "json", "jsonl", "env", "txt", "png", "lock"}:
            continue
        where = m.group(1) + ".py" if "/" in m.group(1) else modules.get(m.group(1))
        if where and os.path.isfile(os.path.join(ROOT, where)) and m.group(2) not in module_names(where):
            bad.append(f"{span}: {where} defines no {m.group(2)}")
    assert not bad, f"{rel} names what does not exist:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("rel", DOCS)
def test_make_targets_exist(rel):
    commands, _, spans = parsed(rel)
    targets, variables = make_targets_and_vars()
    variables |= known_variables()  # `SEED=1 make demo`: a config variable through the environment
    bad = []
    for line in commands + spans:
        for words in re.findall(r"(?:^|[\s;&|])make((?:\s+[\w.=<>/$-]+)+)", line):
            for w in words.split():
                name = w.split("=")[0]
                if ("=" in w and name not in variables) or \
                        ("=" not in w and not w.startswith("-") and w not in targets):
                    bad.append(f"`make ... {w}` in: {line}")
    assert not bad, f"{rel}: make targets or variables the Makefile lacks:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", [*DOCS, "Makefile"])
def test_flags_are_accepted(rel):
    lines = read(rel).replace("\\\n", " ").splitlines() if rel == "Makefile" else \
        (lambda c, p, s: c + s)(*parsed(rel))
    bad = []
    for line in lines:
        for script, flags in script_calls(line):
            accepted = {"-h", "--help"} if script.endswith(".sh") else script_flags(script)  # run_loop.sh --help
            bad += [f"{script} {f}  (in: {line.strip()[:100]})" for f in flags if f not in accepted]
    assert not bad, f"{rel}: flags the script does not accept:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", DOCS)
def test_config_variables_exist(rel):
    commands, _, spans = parsed(rel)
    known, bad = known_variables(), set()
    for line in commands + spans:
        named = re.findall(r"(?:^|\s)(?:export\s+)?([A-Z][A-Z0-9_]*)=", line)
        if re.fullmatch(r"[A-Z][A-Z0-9_]+", line.strip()):  # a backticked name: `GEN_ARGS`
            named.append(line.strip())
        bad |= {v for v in named if v not in known}
    assert not bad, f"{rel} names variables nothing sets or reads: {sorted(bad)}"


# -----------------------------------------------------------------------------
# docs/configuration.md: every config variable, its defaults, the flag it feeds

def config_values(name):
    """What a config sets, as run_loop.sh sees it (sourced by bash, environment cleared); None: unset."""
    names = " ".join(sorted(config_variables()))
    script = f'source configs/{name}.env; for v in {names}; do echo "$v=${{!v-<unset>}}"; done'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout
    return {k: (None if v == "<unset>" else v) for k, v in (line.split("=", 1) for line in out.splitlines())}


def config_variables():
    return {v for p in glob.glob(os.path.join(ROOT, "configs", "*.env"))
            for v in re.findall(r"^([A-Z][A-Z0-9_]*)=", read(p), flags=re.M)}


def config_table():
    """docs/configuration.md's table of variables: {VAR: {"mistral7b": value, "tiny": value, "feeds": cell}}."""
    rows = {}
    for line in read("docs/configuration.md").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[A-Z][A-Z0-9_]*`", cells[0]):
            value = {"(empty)": "", "-": None}
            rows[cells[0].strip("`")] = {**{c: value.get(v, v.strip("`")) for c, v in zip(CONFIGS, cells[1:3])},
                                         "feeds": cells[3]}
    return rows


def test_configuration_table_lists_every_variable_with_its_defaults():
    table = config_table()
    missing = config_variables() - set(table)
    assert not missing, f"docs/configuration.md: config variables missing from the table: {sorted(missing)}"
    for name in CONFIGS:
        values = config_values(name)
        wrong = {v: (row[name], values.get(v)) for v, row in table.items()
                 if v in values and row[name] != values[v]}
        assert not wrong, f"docs/configuration.md vs configs/{name}.env (doc, config): {wrong}"


def test_configuration_table_names_the_flag_run_loop_passes():
    loop = read("run_loop.sh")
    bad = []
    for var, row in config_table().items():
        for script, flag in re.findall(r"`(\w+\.py) (--[\w-]+)`", row["feeds"]):
            # run_loop.sh passes it as `--flag "$VAR"` (or the loop's lower-case copy: --model "$model")
            if not re.search(rf'{re.escape(flag)} "\$(?:{var}|{var.lower()})"', loop):
                bad.append(f"{var}: run_loop.sh does not pass {script} {flag} \"${var}\"")
    assert not bad, "\n".join(bad)


# -----------------------------------------------------------------------------
# the voice: the project speaks of what it does and what was measured, never of how it was made

# Words about the making of the project: who worked in which session or workplace, on what lent machine, and
# tracker numbers of its own ("issue 19", "reported in issue 23"). External references name their repository
# (uclaml/SPPO#13), which these patterns leave alone. `scope="session"` is pytest's word, not ours.
MAKING = re.compile(r"\bsessions?\b|\bworkplaces?\b|\blent\b|\bissues?\s+#?\d+", re.IGNORECASE)
VOICE_SUFFIXES = (".md", ".py", ".sh", ".sbatch", ".env", ".txt", ".cff", ".ini", "Makefile", ".ci/run")


def voice_files():
    """Every tracked text a user reads: docs, code and its docstrings and comments, configs, the Makefile, CI."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*"), recursive=True)
                 if "/.venv/" not in p and os.path.isfile(p)]
    # (this file names the words in order to find them)
    return sorted(f for f in files if f.endswith(VOICE_SUFFIXES) and f != "tests/test_docs.py"
                  and not f.startswith(("tests/bad_inputs/", "runs/")))


def making_words(text):
    """(line number, line) of every line that speaks of how the project was made."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if MAKING.search(line.replace('scope="session"', ""))]


def test_making_words_are_found():
    """The patterns catch what they are for and leave an external reference and pytest's scope alone."""
    caught = ["as reported in issue 23", "(issue 12, part 1)", "no GPU was lent", "this workplace's machine",
              "beside three other sessions' tests", "see Issue #7"]
    assert [n for n, _ in making_words("\n".join(caught))] == list(range(1, len(caught) + 1))
    assert not making_words('uclaml/SPPO#13; an issue in llm-blender\n@pytest.fixture(scope="session")\nexcellent')


@pytest.mark.parametrize("rel", voice_files())
def test_speaks_of_the_product_not_its_making(rel):
    bad = making_words(read(rel))
    assert not bad, f"{rel}: words about how the project was made (say what it does and what was measured, with " \
                    "the machine and date):\n" + "\n".join(f"  line {n}: {line[:120]}" for n, line in bad)
