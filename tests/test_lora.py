"""train_sppo.py --lora-r on the tiny policy: the merged checkpoint is base + (alpha/r) B A for every adapted module,
computed here from the saved adapter, and every other tensor is the base's to the bit; the merged model learned
(its log-ratios against the base, computed here, move toward the targets); 1 and 2 processes train alike; a run
killed mid-iteration resumes to the run never killed; a target the model lacks is refused with the names it has."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import U32, read_jsonl, write_jsonl
from test_resume import assert_same_run
from test_resume import train as train_resumable
from test_train import ranked_records, train
from train_sppo import select_responses  # noqa: E402
from common import encode_prompt, encode_text, end_of_turn_id, load_tokenizer  # noqa: E402

LORA = ["--lora-r", 8, "--lora-alpha", 16]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "ranked.jsonl"
    write_jsonl(path, ranked_records(world))
    return path


@pytest.fixture(scope="module")
def lora_run(world, data, tmp_path_factory):
    """One process, fp32, 4 steps on all 16 prompts."""
    out = tmp_path_factory.mktemp("lora_run") / "ckpt"
    p = train(world, data, out, *LORA, "--epochs", 4, "--report-to", "none")
    return out, p


def merged_by_hand(base, adapter, scale):
    """{name: (base + scale B A in float64, the bound on fp32's error of computing it)} for each adapted weight, from
    the adapter's own keys (PEFT's format: base_model.model.<module>.lora_A.weight / .lora_B.weight)."""
    out = {}
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
            w = base[module + ".weight"].double()
            # fp32 computes B A as sums of r products, then one add and one scaling: each element within
            # (r + 2) roundings of 2^-24 of the magnitudes it adds (Higham's gamma_n bound, no sqrt: a hard bound)
            bound = (a.shape[0] + 2) * U32 * (w.abs() + scale * (b.abs() @ a.abs()))
            out[module + ".weight"] = (w + scale * (b @ a), bound)
    return out


def check_merged(out, start, r, alpha):
    """The merged checkpoint against the start and OUT/adapter: the formula per adapted weight, the bit elsewhere."""
    base, merged = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (r, alpha, "LORA")
    expected = merged_by_hand(base, adapter, config["lora_alpha"] / config["r"])
    layers = json.load(open(start / "config.json"))["num_hidden_layers"]
    # every attention and MLP projection of every layer (all-linear), lm_head and embeddings not
    assert sorted(expected) == sorted(f"model.layers.{i}.{'mlp' if n in LINEAR[4:] else 'self_attn'}.{n}.weight"
                                      for i in range(layers) for n in LINEAR)
    assert merged.keys() == base.keys()
    for name, t in base.items():
        assert merged[name].dtype == t.dtype, name  # the start's dtype, as without LoRA
        if name in expected:
            want, bound = expected[name]
            # and the one rounding to the checkpoint's dtype: half its eps, relative (2^-24 fp32, 2^-8 bf16)
            bound = bound + torch.finfo(t.dtype).eps / 2 * want.abs()
            assert ((merged[name].double() - want).abs() <= bound).all(), name
            assert not torch.equal(merged[name], t), f"{name}: the adapter did not move it"
        else:
            assert torch.equal(merged[name], t), f"{name}: not adapted, so the base's to the bit"
    assert json.load(open(out / "config.json"))["dtype"] == json.load(open(start / "config.json"))["dtype"]


def test_lora_checkpoint_is_the_merged_model(world, lora_run):
    out, p = lora_run
    check_merged(out, world / "policy", 8, 16)
    # trainable: r (in + out) per adapted projection; total: that plus the base's parameters (tied embeddings once)
    c = json.load(open(world / "policy" / "config.json"))
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = 8 * ((h + heads) * 2 + (h + kv) * 2 + 3 * (h + i))
    trainable = c["num_hidden_layers"] * per_layer
    total = trainable + sum(t.numel() for t in load_file(world / "policy" / "model.safetensors").values())
    assert f"{trainable:,} trainable parameters of {total:,}" in p.stderr
    settings = json.load(open(out / "sppo_train.json"))["settings"]
    assert (settings["lora_r"], settings["lora_alpha"], settings["lora_targets"]) == (8, 16, "all-linear")


def sequence_logp(model, prompt_ids, answer_ids):
    """log p(answer | prompt), summed, by a plain forward."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(answer_ids))


def test_lora_run_learns(world, data, lora_run):
    """The merged model against the base, both read here with transformers, on the trained responses (best and
    worst): those that win more than half their games (W > 1/2) gained log-probability and those that lose lost it,
    on average, and the SPPO loss computed from these log-ratios fell from its start, mean (eta (W - 1/2))^2."""
    from transformers import AutoModelForCausalLM
    out, _ = lora_run
    tok = load_tokenizer(str(world / "policy"))
    base, merged = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (world / "policy", out))
    eot, ratios = end_of_turn_id(tok), []
    for rec in read_jsonl(data):
        prompt = encode_prompt(tok, rec["prompt"])
        for i in select_responses(rec["win_rate"], "best-worst"):
            ids = encode_text(tok, rec["responses"][i]) + [eot]
            ratios.append((sequence_logp(merged, prompt, ids) - sequence_logp(base, prompt, ids),
                           5 * (rec["win_rate"][i] - 0.5)))  # (log-ratio, target eta (W - 1/2)), eta 5 as trained
    gain = [x for x, t in ratios if t > 0]
    loss = [x for x, t in ratios if t < 0]
    assert sum(gain) / len(gain) > 0 > sum(loss) / len(loss)
    after, before = (sum((x * keep - t) ** 2 for x, t in ratios) / len(ratios) for keep in (1, 0))
    assert after < 0.9 * before, (after, before)


def bf16_policy(world, path):
    """The tiny policy stored in bf16 (as the recipes' models are): LoRA under bf16 keeps its frozen weights so."""
    shutil.copytree(world / "policy", path)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()},
              path / "model.safetensors", metadata={"format": "pt"})
    config = json.load(open(path / "config.json"))
    json.dump({**config, "dtype": "bfloat16"}, open(path / "config.json", "w"))
    return path


def test_lora_two_processes_equal_one_in_bf16(world, data, tmp_path):
    """A bf16-stored policy, --dtype bf16, in 1 process and in 2 (both under FSDP2's bf16 policy): the merged
    checkpoints are bf16, base + (alpha/r) B A where adapted and the base to the bit elsewhere, and the runs agree.
    As test_train's bf16 test derives: the same bf16 gradients summed in another fp32 order, so step 1's loss to
    float64 rounding (the same forward), its gradient norm to 1e-5 (3 x 2^-24 per element plus the norm's own
    ~log2(n) x 2^-24), and step 2 to 1e-4 (weights 2^-24 apart flip a bf16 rounding with chance ~2^-16 each)."""
    start = bf16_policy(world, tmp_path / "policy")
    one, two = tmp_path / "one", tmp_path / "two"
    settings = [*LORA, "--epochs", 1, "--batch-size", 8, "--micro-batch-size", 2, "--dtype", "bf16",
                "--gradient-checkpointing", "--report-to", "none", "--model", start]
    train(world, data, one, *settings)
    train(world, data, two, *settings, nproc=2)
    for out in (one, two):
        check_merged(out, start, 8, 16)
    a, b = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert len(a) == len(b) == 2 and a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-12)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-5)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)
    assert a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=1e-4)


def test_lora_resumes_mid_iteration(world, data, tmp_path):
    """Killed after logging step 3 (the state of step 2 kept: the adapter and its AdamW moments, not the frozen
    model), refused with other LoRA settings, then resumed: the same losses and merged weights as a run never killed,
    to the bit (as test_resume derives). LoRA dropout 0.1 draws random numbers every step: the random state carries."""
    extra = [*LORA, "--lora-dropout", 0.1]
    ref, out = tmp_path / "ref", tmp_path / "ckpt"
    train_resumable(world / "policy", data, ref, extra=extra)
    train_resumable(world / "policy", data, out, fault="train-step:3", extra=extra)
    state = f"{out}.state/step-2"
    shards = sum(os.path.getsize(os.path.join(state, n)) for n in os.listdir(state) if n.endswith(".distcp"))
    assert shards < os.path.getsize(world / "policy" / "model.safetensors") / 2, "the frozen model was saved"
    p = train_resumable(world / "policy", data, out, extra=[*LORA, "--lora-dropout", 0.2], check=False)
    assert p.returncode == 2 and "was made with lora_dropout=0.1, this run has lora_dropout=0.2" in p.stderr
    p = train_resumable(world / "policy", data, out, extra=extra)
    assert "resumed after step 2/4" in p.stderr
    assert_same_run(out, ref, world / "policy")
    assert load_file(out / "adapter" / "adapter_model.safetensors").keys() == \
        load_file(ref / "adapter" / "adapter_model.safetensors").keys()


def test_lora_target_the_model_lacks_is_refused(world, data, tmp_path):
    out = tmp_path / "ckpt"
    p = train(world, data, out, *LORA, "--lora-targets", "q_proj,qkv_proj", check=False)
    error = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and error.startswith("error: --lora-targets q_proj,qkv_proj: no module named qkv_proj")
    assert error.endswith("linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    assert not os.path.exists(out) and not os.path.exists(f"{out}.tmp") and not os.path.exists(f"{out}.state")


def test_loop_passes_lora_and_guards_it(world, tmp_path):
    """run_loop.sh with LORA_R: one small iteration of configs/tiny.env whose checkpoint is the merged model with
    its adapter beside it; the run directory then refuses another LORA_R, naming it."""
    from test_loop import loop
    out = tmp_path / "loop"
    loop(world, out, ITERS="1", LORA_R="8", LORA_ALPHA="16")
    ckpt = out / "iter1" / "checkpoint"
    check_merged(ckpt, world / "policy", 8, 16)
    assert json.load(open(ckpt / "sppo_train.json"))["settings"]["lora_r"] == 8
    p = loop(world, out, check=False, ITERS="1", LORA_R="4", LORA_ALPHA="16")
    assert p.returncode == 2 and "was made with LORA_R='8', this run has LORA_R='4'" in p.stderr
