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
