"""The preference model P(y beats y' | x) that rank.py and evaluate.py ask: PairRM, a reward model, an LLM judge, or
a Python function.

All four answer one question through one method, `pair_logits(pairs)`: for each (prompt, first, second), a logit
M with M > 0 when `first` is the better answer. Callers ask both orders and combine them as for PairRM,
P = (sigmoid(M(a, b)) + 1 - sigmoid(M(b, a))) / 2, so a position bias cancels and P(a, b) + P(b, a) = 1.

    pairrm  PairRM (llm-blender/PairRM-hf, the release's): M is its logit, one forward per ordered pair.
    reward  a sequence-classification model with one output (a Bradley-Terry reward model such as Skywork-Reward):
            each (prompt, response) is scored once through the model's own chat template, r = its output, and
            M(a, b) = r_a - r_b. K forwards per prompt, not K(K-1). Both orders then give P = sigmoid(r_a - r_b):
            a transitive preference, the special case of SPPO's general P that a scalar reward can express.
    judge   an instruct LLM run by vLLM, asked with a prompt template (JUDGE_TEMPLATE, replaceable) which of two
            answers is better; M = log p(verdict "A") - log p(verdict "B") at its first answer token, so
            sigmoid(M) is the softmax over the two verdict tokens. A general, non-transitive preference like
            PairRM's, from any model vLLM runs; one prompt forward per ordered pair.
    function  a Python function NAME(prompt, response) -> float, named FILE.py:NAME or package.module:NAME: a rule
            written as code (a verifiable answer, a format, a length budget; TRL's reward_funcs). It scores each
            (prompt, response) once, s = its value, and M(a, b) = s_a - s_b: P = sigmoid(s_a - s_b), as for a
            reward model.

The kind is read from the model's config.json (PairRM's has source_prefix_id; a reward model's architecture is
*ForSequenceClassification; a judge's *ForCausalLM), or from the --ranker value's form (WHERE:NAME is a function),
or named with --ranker-kind.
"""
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys

import numpy as np

from common import InputError, encode_chat, is_hub_id
from pairrm import (SOURCE_MAX_LENGTH, check_ranker_path, count_long_sources, default_batch_size,
                    default_dtype, load_ranker, pair_logits)

KINDS = ("pairrm", "reward", "judge", "function")
JUDGE_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "judge-prompt.txt")
VERDICTS = ("A", "B")  # the judge's answer tokens: the first response is A, the second B


# -----------------------------------------------------------------------------
# which kind, and is it there

def read_config(path):
    """config.json of a local directory, or of a hub id (downloaded, or from the cache); None if unreadable."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                return json.load(f)
        if is_hub_id(path):  # the cached copy if there is one (no network round trip), else a download
            from huggingface_hub import hf_hub_download, try_to_load_from_cache
            cached = try_to_load_from_cache(path, "config.json")
            with open(cached if isinstance(cached, str) else hf_hub_download(path, "config.json"), encoding="utf-8") as f:
                return json.load(f)
    except Exception:  # missing, offline, malformed: the loader then says what is wrong, in one line
        return None
    return None


def detect_kind(path, kind="auto"):
    """`kind`, or for "auto" the kind the model's config.json says; PairRM when there is no config to read
    (the default hub id offline), so that its loader reports what is missing as it always has."""
    if kind != "auto" or path == "llm-blender/PairRM-hf":  # (the default needs no look-up)
        return "pairrm" if kind == "auto" else kind
    if ":" in path and not os.path.exists(path):  # FILE.py:NAME or package.module:NAME (hub ids have no colon)
        return "function"
    config = read_config(path)
    if config is None or "source_prefix_id" in config:
        return "pairrm"
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "reward"
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return "judge"
    raise InputError(f"--ranker {path}: cannot tell its kind from config.json (architectures {archs}); "
                     "name it with --ranker-kind pairrm|reward|judge|function")


def check_preference_path(path, kind):
    """InputError unless `path` is a complete model directory of that kind's files, or looks like a hub id."""
    if kind == "pairrm":
        return check_ranker_path(path)
    if kind == "function":
        return load_function(path)
    if os.path.isdir(path):
        files = os.listdir(path)
        missing = [] if "config.json" in files else ["config.json"]
        if not any(f.endswith(".safetensors") for f in files):
            missing.append("*.safetensors")
        if not any(f in files for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            missing.append("a tokenizer")
        if missing:
            raise InputError(f"--ranker {path}: incomplete {kind} model directory (no {', '.join(missing)})")
    elif not is_hub_id(path):
        raise InputError(f"--ranker {path}: no such ranker directory")


def read_judge_template(path):
    """The judge's prompt template: text with {prompt}, {first} and {second}, each once."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--judge-template {path}: cannot read it ({e})")
    for name in ("prompt", "first", "second"):
        if text.count("{" + name + "}") != 1:
            raise InputError(f"--judge-template {path}: should contain {{{name}}} exactly once")
    return text


def settings(kind, template=None):
    """What the kind adds to a stage's recorded settings, so a resume with another kind or template is refused.
    PairRM adds nothing: outputs made before other kinds existed resume as they did."""
    if kind == "pairrm":
        return {}
    if kind == "judge":
        return {"ranker_kind": kind, "judge_template": hashlib.sha1(template.encode("utf-8")).hexdigest()[:16]}
    return {"ranker_kind": kind}


def default_dtype_for(kind, device):
    """PairRM: fp16 on CUDA as released. Reward models and judges are LLMs trained in bf16: bf16 on CUDA (fp16
    can overflow in them). fp32 on a CPU for all."""
    if kind == "pairrm" or not device.startswith("cuda"):
        return default_dtype(device)
    return "bf16"


def load_preference(path, kind, device="cpu", dtype="fp32", batch_size=None, template=None):
    """The preference model of that kind, ready to answer pair_logits(pairs, progress_bar)."""
    batch_size = batch_size or default_batch_size(device)
    if kind == "pairrm":
        return PairRM(path, device, dtype, batch_size)
    if kind == "reward":
        return RewardModel(path, device, dtype, batch_size)
    if kind == "function":
        return ScoreFunction(path)
    return LLMJudge(path, dtype, template)


# -----------------------------------------------------------------------------
# the four kinds

class PairRM:
    kind = "pairrm"

    def __init__(self, path, device, dtype, batch_size):
        self.model, self.tokenizer = load_ranker(path, device, dtype)
        self.device, self.batch_size = device, batch_size

    def warnings(self, prompts):
        long = count_long_sources(self.tokenizer, prompts)
        return [f"{long} prompts are longer than PairRM's {SOURCE_MAX_LENGTH}-token source limit; it reads the "
                "start of each (as llm-blender does)"] if long else []

    def pair_logits(self, pairs, progress_bar=None, ids=None):
        return pair_logits(self.model, self.tokenizer, pairs, self.batch_size, self.device, progress_bar)


def torch_dtype(dtype):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def cannot_load(path, kind, e):
    return InputError(f"--ranker {path}: cannot load the {kind} model ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0]})")


class RewardModel:
    kind = "reward"

    def __init__(self, path, device, dtype, batch_size):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        try:
            config = AutoConfig.from_pretrained(path)
            if config.num_labels != 1:  # (checked before the weights, whose head would not fit it)
                raise InputError(f"--ranker {path}: a reward model has one output; this one has num_labels="
                                 f"{config.num_labels}")
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype),
                                                                       use_safetensors=True)
        except InputError:
            raise
        except Exception as e:  # hub, config and weight errors come in many types; all mean "cannot load"
            raise cannot_load(path, "reward", e)
        if not self.tokenizer.chat_template:
            raise InputError(f"--ranker {path}: the reward model's tokenizer has no chat template")
        self.model, self.device = model.to(device).eval(), device
        # Without a pad id the model cannot find each row's last token in a padded batch: one row at a time.
        self.batch_size = batch_size if model.config.pad_token_id is not None else 1
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    def warnings(self, prompts):
        return []

    def scores(self, items):
        """r for each distinct (prompt, response): the model's output on [user: prompt, assistant: response]
        through its chat template. Right padding: the model reads each row at its last non-pad token, which
        padding on the right does not move. {(prompt, response): float}."""
        import torch
        items = sorted(set(items))
        rows = [encode_chat(self.tokenizer, [{"role": "user", "content": x}, {"role": "assistant", "content": y}])
                for x, y in items]
        if any(len(r) > self.context for r in rows):
            print(f"warning: {sum(len(r) > self.context for r in rows)} prompt+response rows are longer than the "
                  f"reward model's {self.context}-token context; it reads the start of each", file=sys.stderr)
            rows = [r[:self.context] for r in rows]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out, pad = np.empty(len(rows)), self.model.config.pad_token_id or 0
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx])
                mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in idx])
                ids, mask = ids.to(self.device), mask.to(self.device)
                out[idx] = self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().numpy()
        return dict(zip(items, out.tolist()))

    def pair_logits(self, pairs, progress_bar=None, ids=None):
        """M = r_first - r_second, each response scored once however many pairs it is in."""
        r = self.scores([(x, y) for x, a, b in pairs for y in (a, b)])
        if progress_bar is not None:
            progress_bar.update(len(pairs))
        return np.array([r[(x, a)] - r[(x, b)] for x, a, b in pairs], dtype=np.float64)


class LLMJudge:
    kind = "judge"

    def __init__(self, path, dtype, template):
        # The engine in this process, on every platform: on a CPU its extra process only adds start-up time (as
        # in generate.py), and on a GPU a forked engine would die on the CUDA that rank.py's device check has
        # already touched (generate.py's note); a judge reads one token per prompt, so overlap buys little.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig, AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            config = AutoConfig.from_pretrained(path).get_text_config()
        except Exception as e:
            raise cannot_load(path, "judge", e)
        if not self.tokenizer.chat_template:
            raise InputError(f"--ranker {path}: the judge's tokenizer has no chat template")
        self.verdict_ids = []
        for v in VERDICTS:
            ids = self.tokenizer.encode(v, add_special_tokens=False)
            if len(ids) != 1:
                raise InputError(f"--ranker {path}: the verdict '{v}' is {len(ids)} tokens in the judge's tokenizer, "
                                 "not one")
            self.verdict_ids.append(ids[0])
        self.path, self.dtype, self.template, self.config, self.llm = path, dtype, template, config, None
        self.context = min(getattr(config, "max_position_embeddings", None) or 8192, 8192)
        self.engine()  # started now, so that a stage's timing of its work leaves out vLLM's start-up

    def warnings(self, prompts):
        return []

    def engine(self):
        """vLLM, started once. On a CPU its KV cache is sized for a few judge prompts of the longest
        length (vLLM's default would reserve 90% of the machine's memory); on a GPU it takes 90% of it."""
        if self.llm is None:
            from vllm import LLM
            from vllm.platforms import current_platform
            kw = dict(model=self.path, dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.dtype],
                      max_model_len=self.context, seed=0)
            if current_platform.is_cpu():
                c = self.config
                head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
                per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * (4 if self.dtype == "fp32" else 2)
                kw.update(enforce_eager=True, kv_cache_memory_bytes=max(64 << 20, 8 * per_token * self.context))
            try:
                self.llm = LLM(**kw)
            except Exception as e:
                reason = " ".join(str(e).split())[:400] or type(e).__name__
                raise InputError(f"--ranker {self.path}: vLLM could not start the judge: {type(e).__name__}: {reason}")
        return self.llm

    def prompt_ids(self, prompt, first, second):
        """The judge's input: the template filled in as one user turn, through its chat template, ending where
        the judge's answer begins."""
        values = {"prompt": prompt, "first": first, "second": second}  # one pass: a response's "{second}" stays text
        text = re.sub(r"\{(prompt|first|second)\}", lambda m: values[m.group(1)], self.template)
        return encode_chat(self.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)

    def pair_logits(self, pairs, progress_bar=None, ids=None):
        """M = log p(A) - log p(B) at the judge's first answer token, all pairs in one batched vLLM call."""
        from vllm import SamplingParams
        rows = [self.prompt_ids(x, a, b) for x, a, b in pairs]
        long = sum(len(r) >= self.context for r in rows)
        if long:
            raise InputError(f"--ranker {self.path}: {long} judge prompts are longer than the judge's "
                             f"{self.context}-token context; use a judge with a longer one or shorter responses")
        a, b = self.verdict_ids
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logprob_token_ids=[a, b])
        outs = self.engine().generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        logits = np.empty(len(rows), dtype=np.float64)
        for n, o in enumerate(outs):
            lp = o.outputs[0].logprobs[0]  # {token id: Logprob} of the first answer token
            logits[n] = lp[a].logprob - lp[b].logprob
        if progress_bar is not None:
            progress_bar.update(len(rows))
        return logits


@functools.lru_cache(maxsize=None)
def load_function(spec):
    """The function that `spec` names, FILE.py:NAME or package.module:NAME (imported from the current directory
    too); every way that fails is an InputError naming the file or module and the function."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise InputError(f"--ranker {spec}: a preference function is FILE.py:NAME or package.module:NAME")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise InputError(f"--ranker {spec}: no such file {where}")
            found = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except InputError:
        raise
    except SyntaxError as e:
        raise InputError(f"--ranker {spec}: {e.filename or where}:{e.lineno}: syntax error ({e.msg})")
    except ModuleNotFoundError as e:
        raise InputError(f"--ranker {spec}: cannot import {where} (no module named '{e.name}')")
    except Exception as e:  # whatever the module's own top level raises
        raise InputError(f"--ranker {spec}: importing {where} raised {type(e).__name__}: {first_line(e)}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--ranker {spec}: {where} has no function {name}" +
                         ("" if fn is None else f" ({name} is a {type(fn).__name__})"))
    return fn


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0]


class ScoreFunction:
    kind = "function"

    def __init__(self, spec):
        self.spec, self.fn = spec, load_function(spec)
        self.name = spec.rpartition(":")[2]

    def warnings(self, prompts):
        return []

    def score(self, prompt, response, rid):
        """s = NAME(prompt, response), a finite real number; anything else names the prompt id."""
        where = f"--ranker {self.spec}: {self.name}() on prompt id '{rid}'"
        try:
            s = self.fn(prompt, response)
        except Exception as e:
            raise InputError(f"{where} raised {type(e).__name__}: {first_line(e)}")
        if not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise InputError(f"{where} returned {s!r:.60}, not a finite number")
        return float(s)

    def pair_logits(self, pairs, progress_bar=None, ids=None):
        """M = s_first - s_second, each (prompt, response) scored once however many pairs it is in. `ids`: each
        pair's prompt id, for the error messages."""
        ids = ids or ["?"] * len(pairs)
        s = {}
        for (x, a, b), rid in zip(pairs, ids):
            for y in (a, b):
                if (x, y) not in s:
                    s[(x, y)] = self.score(x, y, rid)
        if progress_bar is not None:
            progress_bar.update(len(pairs))
        return np.array([s[(x, a)] - s[(x, b)] for x, a, b in pairs], dtype=np.float64)
