"""One source of truth for the recipe: the scripts' own defaults are the released recipe, and
configs/mistral7b.env (what run_loop.sh passes) restates them; configs/tiny.env sets only what differs."""
import os
import subprocess

import pytest

from conftest import ROOT
import generate  # noqa: E402
import rank  # noqa: E402
import train_sppo  # noqa: E402

# config variable -> (script's parser, flag's dest)
FLAGS = {"K": (generate, "k"), "TEMPERATURE": (generate, "temperature"), "TOP_P": (generate, "top_p"),
         "MAX_TOKENS": (generate, "max_tokens"), "SEED": (generate, "seed"), "SEED_MODE": (generate, "seed_mode"),
         "RANKER": (rank, "ranker"), "PROB_MODE": (rank, "prob_mode"),
         "ETA": (train_sppo, "eta"), "LR": (train_sppo, "lr"), "EPOCHS": (train_sppo, "epochs"),
         "BATCH": (train_sppo, "batch_size"), "MICRO_BATCH": (train_sppo, "micro_batch_size"),
         "OPTIMIZER": (train_sppo, "optimizer"), "WARMUP": (train_sppo, "warmup_ratio"),
         "MAX_LENGTH": (train_sppo, "max_length"), "MAX_PROMPT_LENGTH": (train_sppo, "max_prompt_length"),
         "SELECT": (train_sppo, "select"), "TRAIN_SEED": (train_sppo, "seed"), "LOSS": (train_sppo, "loss"),
         "LORA_R": (train_sppo, "lora_r"), "LORA_ALPHA": (train_sppo, "lora_alpha"),
         "LORA_DROPOUT": (train_sppo, "lora_dropout"), "LORA_TARGETS": (train_sppo, "lora_targets"),
         "SAVE_EVERY": (train_sppo, "save_every"), "REPORT_TO": (train_sppo, "report_to")}


def config(name, **env):
    """The variables a config sets, as run_loop.sh sees them (sourced by bash, environment cleared)."""
    script = f'source configs/{name}.env; for v in {" ".join(FLAGS)} GEN_ARGS TRAIN_ARGS GPUS PROMPTS; do echo "$v=${{!v}}"; done'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], **env}).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("var", FLAGS)
def test_release_config_restates_the_scripts_defaults(var):
    module, dest = FLAGS[var]
    default = module.parser().get_default(dest)
    value = config("mistral7b")[var]
    assert type(default)(value) == default, f"configs/mistral7b.env {var}={value}, {module.__name__}.py default {default}"


def test_tiny_config_sets_only_what_differs():
    release, tiny = config("mistral7b"), config("tiny")
    lines = [line.split("=", 1)[0] for line in open(os.path.join(ROOT, "configs", "tiny.env"))
             if "=" in line and not line.startswith("#")]
    for var in FLAGS:
        assert (tiny[var] != release[var]) == (var in lines), f"tiny.env: {var} should be set only if it differs"
    assert tiny["TRAIN_ARGS"] == "" and tiny["GPUS"] == "0" and release["GPUS"] == "8"
    assert config("tiny", K="3")["K"] == "3"  # the environment still wins
    # a value with braces: '{iter}' inside ${VAR:-...} must not end the expansion early (it left a stray '}')
    assert release["PROMPTS"] == "UCLA-AGI/data-mistral-7b-instruct-sppo-iter{iter}"
    assert config("mistral7b", PROMPTS="my.jsonl")["PROMPTS"] == "my.jsonl"


def test_run_settings_accept_another_spelling_of_the_same_path(tmp_path, monkeypatch):
    """run_loop.sh's OUT guard: the same model directory given relative or absolute is the same setting; another
    directory, or the same name resolved from elsewhere, is not."""
    import common
    (tmp_path / "policy").mkdir()
    (tmp_path / "other").mkdir()
    settings = str(tmp_path / "out" / "settings.txt")
    os.makedirs(os.path.dirname(settings))
    monkeypatch.chdir(tmp_path)
    common.check_run_settings(settings, [f"MODEL={tmp_path / 'policy'}", "K=5"])
    common.check_run_settings(settings, ["MODEL=policy", "K=5"])  # relative: accepted
    common.check_run_settings(settings, ["MODEL=./policy/", "K=5"])
    with pytest.raises(common.InputError, match="was made with MODEL="):
        common.check_run_settings(settings, ["MODEL=other", "K=5"])
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(common.InputError, match="was made with MODEL="):
        common.check_run_settings(settings, ["MODEL=policy", "K=5"])  # no such directory from here


@pytest.mark.parametrize("name", ["generate", "rank", "train_sppo", "evaluate", "answers"])
def test_help_shows_every_default(name, monkeypatch):
    """Every stage's --help gives each flag's default (read from its parser, the one source of defaults) and keeps
    its docstring as written: a usage line that continues over a backslash stays on two lines."""
    import argparse
    import importlib
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping splits "(default: ...)"
    ap = importlib.import_module(name).parser()
    text, missing = ap.format_help(), []
    for action in ap._actions:
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue  # required flags and on/off switches have no default to show
        start = text.index("\n  " + ", ".join(action.option_strings)) + 1
        block = text[start:text.find("\n  -", start)]  # its line(s), up to the next flag's
        if f"(default: {action.default})" not in block and "default:" not in (action.help or ""):
            missing.append(block.strip()[:100])
    assert not missing, f"{name}.py --help: flags without their default:\n" + "\n".join(missing)
    doc = importlib.import_module(name).__doc__
    continued = [ln for ln in doc.splitlines() if ln.rstrip().endswith("\\")][:1]
    assert all(ln.rstrip() in text for ln in continued), f"{name}.py --help joined its docstring's usage lines"


def test_run_settings_let_what_changes_no_result_change(tmp_path):
    """After an out-of-memory error a user lowers MICRO_BATCH or adds --gradient-checkpointing to TRAIN_ARGS and
    reruns into the same OUT: accepted, as train_sppo.py accepts them for its own checkpoint. Another dtype is a
    setting: refused, saying why and what may change."""
    import common
    settings = str(tmp_path / "settings.txt")
    first = ["K=5", "MICRO_BATCH=8", "TRAIN_ARGS=--gradient-checkpointing --dtype bf16"]
    common.check_run_settings(settings, first)
    for train_args in ["--dtype bf16", "--dtype bf16 --micro-batch-size 2 --save-every=10",
                       "--report-to none --gradient-checkpointing --dtype bf16 --dist-timeout-minutes 90"]:
        common.check_run_settings(settings, ["K=5", "MICRO_BATCH=2", f"TRAIN_ARGS={train_args}"])
    common.check_run_settings(settings, ["K=5", "TRAIN_ARGS=--dtype bf16"])  # a loop that sets no MICRO_BATCH
    assert open(settings).read() == "K=5\nMICRO_BATCH=8\nTRAIN_ARGS=--gradient-checkpointing --dtype bf16\n"
    with pytest.raises(common.InputError, match=r"was made with TRAIN_ARGS='--dtype bf16', this run has "
                                                r"TRAIN_ARGS='--dtype fp32'; .*what may change between runs of one "
                                                r"OUT: MICRO_BATCH, GEN_ARGS --gpu-memory-utilization"):
        common.check_run_settings(settings, ["K=5", "TRAIN_ARGS=--gradient-checkpointing --dtype fp32"])
    with pytest.raises(common.InputError, match="was made with TRAIN_ARGS='--dtype bf16', this run has "
                                                "TRAIN_ARGS='--dtype bf16 --attn-implementation eager'"):
        common.check_run_settings(settings, ["K=5", "TRAIN_ARGS=--dtype bf16 --attn-implementation eager"])


def test_run_settings_let_generation_and_ranking_memory_change(tmp_path):
    """vLLM's memory share and PairRM's batch size may change on a rerun (what a user tries when a stage runs out of
    memory); generation's dtype or context length may not."""
    import common
    settings = str(tmp_path / "settings.txt")
    common.check_run_settings(settings, ["GEN_ARGS=--dtype bf16", "RANK_ARGS="])
    common.check_run_settings(settings, ["GEN_ARGS=--gpu-memory-utilization 0.8 --dtype bf16 --enforce-eager",
                                         "RANK_ARGS=--batch-size 4 --write-every=64"])
    with pytest.raises(common.InputError, match="was made with GEN_ARGS='--dtype bf16', this run has "
                                                "GEN_ARGS='--dtype bf16 --max-model-len 4096'"):
        common.check_run_settings(settings, ["GEN_ARGS=--dtype bf16 --max-model-len 4096", "RANK_ARGS="])
    with pytest.raises(common.InputError, match="was made with RANK_ARGS='', this run has RANK_ARGS='--dtype fp32'"):
        common.check_run_settings(settings, ["GEN_ARGS=--dtype bf16", "RANK_ARGS=--batch-size 4 --dtype fp32"])


def test_train_knob_flags_are_left_out_of_train_sppos_settings(tmp_path):
    """common.KNOB_FLAGS["TRAIN_ARGS"] (what the loop lets change) are exactly the train_sppo.py flags that its own
    run_settings ignores, besides the paths: changing one leaves a checkpoint's settings as they were."""
    import common
    data = tmp_path / "ranked.jsonl"
    data.write_text("{}\n")
    ap = train_sppo.parser()
    base = ["--model", "m", "--data", str(data), "--out", "o"]
    settings = train_sppo.run_settings(ap.parse_args(base), "bf16")
    other = {"--micro-batch-size": "3", "--gradient-checkpointing": None, "--save-every": "7", "--report-to": "none",
             "--dist-timeout-minutes": "5"}
    assert set(other) == set(common.KNOB_FLAGS["TRAIN_ARGS"])
    for flag, value in other.items():
        args = ap.parse_args(base + [flag] + ([value] if value else []))
        assert train_sppo.run_settings(args, "bf16") == settings, flag
    changed = ap.parse_args(base + ["--max-grad-norm", "2"])  # a setting, for contrast
    assert train_sppo.run_settings(changed, "bf16") != settings


@pytest.mark.parametrize("wheels", ["present", "absent"])
def test_setup_says_where_torch_comes_from(tmp_path, wheels):
    """`make setup` takes torch from the local wheel folder when it exists, else from the PyTorch project's CPU wheel
    index, and says which before installing (make -n: the commands, nothing run)."""
    folder = tmp_path / "wheels"
    if wheels == "present":
        folder.mkdir()
    p = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", f"WHEELS={folder}"], cwd=ROOT,
                       capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    install = next(line for line in p.stdout.splitlines() if "pip install" in line and "cpu.txt" in line)
    if wheels == "present":
        assert f"torch 2.13.0+cpu from the wheel folder {folder}" in p.stdout
        assert f"--find-links {folder}" in install and "--extra-index-url" not in install
    else:
        assert "torch 2.13.0+cpu from the index https://download.pytorch.org/whl/cpu" in p.stdout
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install and "--find-links" not in install
