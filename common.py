"""What two or more stages share: JSONL reading with precise errors, sharding, resumable atomic output, the
one settings check, and the policy's tokenizer (loading it, and encoding chats as the policy sees them).

Every stage reads records {"id": ..., ...} and writes one record per input record. While it runs it
appends to OUT.partial (flushed per batch); only a complete run renames that to OUT. A rerun keeps the
complete lines of OUT.partial, skips their ids and appends the rest, so finished work is never lost and a
later stage never sees a half-written file.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile


class InputError(Exception):
    """Bad input or settings: reported as one line, exit code 2, no output written."""


def fail(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def main_guard(main):
    """Run main(); turn an InputError into a one-line error and exit code 2."""
    try:
        main()
    except InputError as e:
        fail(str(e))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The stages' --help: the docstring as written (its usage lines keep their line breaks) and every flag's default
    after its help, "(default: 0.7)", unless the help already says it. Required flags and on/off switches have none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not shows_default(action) or "%(default)" in text or "default:" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action):
        if not action.help and shows_default(action):  # argparse prints no help line for a flag without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def shows_default(action):
    return bool(action.option_strings) and not action.required and action.default is not argparse.SUPPRESS \
        and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))


# -----------------------------------------------------------------------------
# reading

def read_jsonl(path):
    """Yield (line_number, record) for each non-blank line; every fault names the file and line."""
    if not os.path.isfile(path):
        if os.path.exists(path + ".partial"):  # a stage never reads another's unfinished output
            raise InputError(f"{path}: no such file ({path}.partial is the unfinished output of a stage that "
                             "stopped; rerun that stage to complete it)")
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})")
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_reject_constant)
            except (json.JSONDecodeError, ValueError) as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e})")
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def _reject_constant(name):
    # json accepts NaN/Infinity by default; no stage has a use for them.
    raise ValueError(f"{name} is not allowed")


def field(path, n, rec, name, kind):
    """rec[name], checked to be of type `kind`, or an InputError naming file, line and field."""
    if name not in rec:
        raise InputError(f"{path}:{n}: field '{name}' is missing")
    value = rec[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InputError(f"{path}:{n}: field '{name}' should be {want}, got {type(value).__name__}")
    return value


def is_hub_id(path):
    """Whether a --model/--ranker that is not a directory could still be a hub id ("org/name"): a missing
    local path is then reported as such instead of as a failed download."""
    return (not os.path.exists(path) and not path.startswith((".", "/")) and path.count("/") == 1
            and not os.path.isdir(path.split("/")[0]))


def prompt_id(prompt):
    """A stable id for a record that has none: the first 16 hex digits of the prompt's SHA-1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def load_prompts(source):
    """[{"id", "prompt"} or {"id", "messages"}] from a JSONL file, or from a hub dataset name with a `prompt`
    column. A record carries `prompt` (one user turn) or `messages` (a conversation ending in the user turn to
    answer: MT-Bench's second turn, a system prompt); `prompt` wins when both are there."""
    if os.path.exists(source) or source.endswith(".jsonl") or source.endswith(".json"):
        rows = list(read_jsonl(source))
    else:
        rows = list(enumerate(_hub_prompts(source), 1))
    records, seen = [], {}
    for n, rec in rows:
        if "prompt" in rec or "messages" not in rec:
            prompt = field(source, n, rec, "prompt", str)
            if not prompt.strip():
                raise InputError(f"{source}:{n}: field 'prompt' is empty")
            text, record = prompt, {"prompt": prompt}
        else:
            messages = check_messages(source, n, rec["messages"])
            text, record = json.dumps(messages, ensure_ascii=False, sort_keys=True), {"messages": messages}
        rid = rec.get("id", prompt_id(text))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise InputError(f"{source}:{n}: field 'id' should be a string, got {type(rid).__name__}")
        rid = str(rid)
        if rid in seen:
            raise InputError(f"{source}:{n}: field 'id' repeats '{rid}' from line {seen[rid]}")
        seen[rid] = n
        records.append({"id": rid, **record})
    if not records:
        raise InputError(f"{source}: no records")
    return records


def check_messages(source, n, messages):
    """A conversation to answer: a non-empty list of {"role": system|user|assistant, "content": text} whose last
    turn is the user's (the model writes the next one). Returns it with only those two keys."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{source}:{n}: field 'messages' should be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InputError(f"{source}:{n}: field 'messages[{i}]' should be {{\"role\": system, user or assistant, "
                             "\"content\": a string}")
        if not m["content"].strip() and m["role"] != "assistant":  # a model's own earlier answer may be empty
            raise InputError(f"{source}:{n}: field 'messages[{i}].content' is empty")
    if messages[-1]["role"] != "user":
        raise InputError(f"{source}:{n}: field 'messages' ends with a '{messages[-1]['role']}' turn; it should end "
                         "with the user turn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _hub_prompts(name):
    try:
        import datasets
    except ImportError:
        raise InputError(f"{name}: not a file, and the `datasets` package that reads hub datasets is missing")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub raises many types; all mean "cannot read this"
        raise InputError(f"{name}: not a file and not a readable hub dataset ({type(e).__name__}: {e})".split("\n")[0])
    if "prompt" not in ds.column_names and "messages" not in ds.column_names:
        raise InputError(f"{name}: hub dataset has no 'prompt' or 'messages' column (columns: "
                         f"{', '.join(ds.column_names)})")
    for row in ds:
        yield {k: row[k] for k in ("id", "prompt", "messages") if k in row}


def check_number(path, n, name, x, lo=-math.inf, hi=math.inf):
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not lo <= x <= hi:
        raise InputError(f"{path}:{n}: field '{name}' has {x!r}, expected a finite number in [{lo}, {hi}]")


# -----------------------------------------------------------------------------
# sharding

def parse_shard(text):
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/n, e.g. 0/8")
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def take_shard(records, shard):
    """Every record whose position mod n == i: n shards cover every record once, in balanced parts."""
    i, n = shard
    return records[i::n]


def merge_shards(out, order, paths):
    """Write the records of the shard outputs `paths` to OUT in the order of the records in `order` (the stage's
    input: a prompts file or hub dataset, or the previous stage's output), atomically. A shard's output keeps its
    input's order but may lack records (generate.py skips prompts longer than the context), so shard 0's records,
    then shard 1's, or taking them in turn, would make the order, and the batches training draws from it, depend
    on the number of shards."""
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    lines.append((field(path, n, json.loads(line), "id", (str, int)), path, n, line))
    if lines:  # (an empty merge reads no input)
        rank = {r["id"]: i for i, r in enumerate(load_prompts(order))}
        seen = {}
        for rid, path, n, _ in lines:
            if str(rid) not in rank:
                raise InputError(f"{path}:{n}: field 'id' has '{rid}', which {order} does not have")
            if str(rid) in seen:
                raise InputError(f"{path}:{n}: field 'id' repeats '{rid}' from {seen[str(rid)]}")
            seen[str(rid)] = f"{path}:{n}"
        lines.sort(key=lambda x: rank[str(x[0])])
    def write(tmp):  # synced before the rename: the merged output is the stage's, which a later stage trusts
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line for *_, line in lines)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(out, write)


# -----------------------------------------------------------------------------
# resumable atomic output

def check_settings(old, new, where, hint):
    """The one rule for resuming: an output made with other settings is refused, naming the first that differs.
    Used by ResumableWriter (JSONL stages), train_sppo.py (a finished checkpoint) and run_loop.sh (its OUT)."""
    for name in {**new, **old}:  # both ways: a setting only the old output has differs too
        if not same_setting(old.get(name), new.get(name)):
            raise InputError(f"{where}: was made with {name}={old.get(name)!r}, this run has {name}={new.get(name)!r}; "
                             f"{hint}")


def same_setting(a, b):
    """Equal, or two spellings of one existing file or directory (relative and absolute, or via a link)."""
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and a and b
    return bool(paths and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


_fault_hits = {}


def fault_point(name, before_kill=None):
    """Test hook for tests/test_faults.py: SPPO_FAULT=NAME[:N] SIGKILLs this process the N-th time (default
    1st) it reaches the point NAME, so a test can stop a stage exactly where a kill hurts most. Points:
    partial-written (a batch appended to OUT.partial and synced), torn-write (half a record line written:
    set by ResumableWriter itself), before-rename (OUT.tmp complete, OUT not yet replaced), after-rename (OUT
    in place, OUT.partial not yet removed), train-step (train_sppo.py: a step logged in OUT.tmp),
    checkpoint-weights (the weights saved in OUT.tmp, not the tokenizer), checkpoint-written (OUT.tmp
    complete, not yet renamed), state-shards (train_sppo.py: a training state's shards written in
    OUT.state/step-N.tmp, not its train_state.json, not yet renamed). Unset, it does nothing. STAGE/NAME
    (rank/partial-written) picks the point in one stage only, for a setting a whole loop inherits.
    before_kill() runs just before the kill. With SPPO_FAULT_PAUSE=FILE the process writes FILE there and
    waits to be killed instead, so a test can kill the whole loop (as a scheduler would) exactly at the point,
    however brief it is."""
    spec = os.environ.get("SPPO_FAULT")
    stage = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    if not spec or spec.partition(":")[0] not in (name, f"{stage}/{name}"):
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(spec.partition(":")[2] or 1):
        if before_kill is not None:
            before_kill()
        sys.stderr.flush()
        if os.environ.get("SPPO_FAULT_PAUSE"):
            open(os.environ["SPPO_FAULT_PAUSE"], "w").close()
            while True:
                signal.pause()
        os.kill(os.getpid(), signal.SIGKILL)


def check_paths(inputs, out):
    """Refuse an output that would overwrite an input, or that cannot be written, before any work."""
    for p in inputs:
        if os.path.exists(p) and os.path.abspath(p) == os.path.abspath(out):
            raise InputError(f"{out}: the output path is the input path; choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isfile(parent):
        raise InputError(f"{out}: cannot create the output directory ({parent} is a file)")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output directory ({e.strerror})")
    try:  # try it: os.access says yes to root even where a write fails (read-only file systems, /proc)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{out}: the output directory {parent} is not writable ({e.strerror})")


# What a rerun of the loop may change: how the work is done, not what it computes; the first things to change after
# an out-of-memory error. Each is a flag its stage leaves out of its own settings (train_sppo.run_settings, the
# "generate" and "rank" records): the micro-batch splits the same global batch (the same losses up to float
# summation order), gradient checkpointing recomputes the same activations, a generated answer depends only on its
# prompt and seed (never on batching or memory), and PairRM's batching changes only rounding.
RUN_KNOBS = ("MICRO_BATCH",)
KNOB_FLAGS = {  # config variable -> {flag: how many values follow it}
    "GEN_ARGS": {"--gpu-memory-utilization": 1, "--kv-cache-gb": 1, "--enforce-eager": 0, "--write-every": 1},
    "RANK_ARGS": {"--batch-size": 1, "--write-every": 1},
    "TRAIN_ARGS": {"--micro-batch-size": 1, "--gradient-checkpointing": 0, "--save-every": 1, "--report-to": 1,
                   "--dist-timeout-minutes": 1}}


def without_knobs(settings):
    """The loop's settings less what changes no result: RUN_KNOBS dropped, KNOB_FLAGS cut out of the *_ARGS.
    {"K": "5", "MICRO_BATCH": "8", "TRAIN_ARGS": "--dtype bf16 --micro-batch-size=4"} -> {"K": "5", "TRAIN_ARGS":
    "--dtype bf16"}."""
    kept = {k: v for k, v in settings.items() if k not in RUN_KNOBS}
    for var, flags in KNOB_FLAGS.items():
        if var not in kept:
            continue
        words, rest = kept[var].split(), []
        while words:
            word = words.pop(0)
            flag = word.split("=", 1)[0]
            if flag in flags:
                del words[:0 if "=" in word else flags[flag]]
            else:
                rest.append(word)
        kept[var] = " ".join(rest)
    return kept


def check_run_settings(path, pairs):
    """run_loop.sh's guard on its OUT: `path` (OUT/settings.txt) holds the loop's NAME=VALUE lines. The first run
    writes it (atomically); a later run with another value of a setting is refused, by check_settings. What changes
    no result (without_knobs) may change: the file keeps the first run's values."""
    new = dict(p.split("=", 1) for p in pairs)
    out = os.path.dirname(path) or "."
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        knobs = ", ".join([*RUN_KNOBS, *(f"{var} {' '.join(flags)}" for var, flags in KNOB_FLAGS.items())])
        check_settings(without_knobs(old), without_knobs(new), out,
                       f"a run directory holds one experiment, and this changes what is computed (what may change "
                       f"between runs of one OUT: {knobs}); use another OUT or delete {out}")
        return
    write_text(path, "".join(f"{k}={v}\n" for k, v in new.items()))


def write_atomic(path, write):
    """write(tmp_path), then rename: a reader never sees half a file."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, w)


def run_generate(flags, verbose, what):
    """generate.py as a subprocess (evaluate.py and answers.py take their answers from it), with vLLM's INFO log
    kept quiet unless `verbose`; a failure is one InputError naming `what` (generate.py's own error is above)."""
    env = dict(os.environ) if verbose else dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    here = os.path.dirname(os.path.abspath(__file__))
    rc = subprocess.call([sys.executable, os.path.join(here, "generate.py"), *map(str, flags)], env=env)
    if rc != 0:
        raise InputError(f"generate.py failed {what} (exit code {rc}; its error is above)")


class ResumableWriter:
    """Appends records to OUT.partial and renames it to OUT on close(); resumes what a killed run wrote.

    `settings` is what made the records (model, seed, K, ...). It is stored in every record under
    `settings_key`, and a resumed run with other settings is refused, naming the setting that differs.
    """

    def __init__(self, out, settings, settings_key):
        self.out, self.partial = out, out + ".partial"
        self.settings, self.key = settings, settings_key
        self.done = {}  # id -> record already written
        for path in (out, self.partial):
            if os.path.exists(path):
                self._load(path)
        self.complete = os.path.exists(out)
        self.file = None

    def _load(self, path):
        with open(path, "rb") as f:
            data = f.read()
        # A kill mid-write leaves at most one unterminated last line: drop it, keep the rest.
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data) and path == self.partial:
            with open(path, "r+b") as f:
                f.truncate(len(keep))
        for n, line in enumerate(keep.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise InputError(f"{path}:{n}: cannot resume from a malformed line; delete the file to start over")
            check_settings(rec.get(self.key, {}), self.settings, f"{path}:{n}", f"use another --out or delete {path}")
            self.done[str(rec.get("id"))] = rec

    def write(self, records):
        """Append finished records (each already carrying its id) and make them durable."""
        if self.file is None:
            self.file = open(self.partial, "a", encoding="utf-8")
        for rec in records:
            rec[self.key] = self.settings
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"
            if rec is records[-1]:
                fault_point("torn-write", lambda: self._sync(line[: len(line) // 2]))
            self.file.write(line)
            self.done[rec["id"]] = rec
        self._sync()
        fault_point("partial-written")

    def _sync(self, text=""):
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self, ids):
        """Write OUT with the records for `ids`, in that order, atomically; remove OUT.partial."""
        if self.file is not None:
            self.file.close()
        missing = [i for i in ids if i not in self.done]
        assert not missing, f"internal error: {len(missing)} records were never written"
        if self.complete and list(self.done) == list(ids) and not os.path.exists(self.partial):
            return
        tmp = self.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in ids:
                f.write(json.dumps(self.done[i], ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fault_point("before-rename")
        os.replace(tmp, self.out)
        fault_point("after-rename")
        if os.path.exists(self.partial):
            os.remove(self.partial)


def progress(iterable=None, total=None, desc=None, unit="it"):
    """A tqdm progress bar on stderr; SPPO_PROGRESS=0 turns it off. In a log file it updates every 10 s."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("SPPO_PROGRESS") == "0", mininterval=0.1 if sys.stderr.isatty() else 10)


# -----------------------------------------------------------------------------
# the policy's tokenizer: one way to load it and one way to encode a chat, for generate.py and train_sppo.py

def load_tokenizer(model):
    """The model's tokenizer; a missing or incomplete checkpoint is an InputError, not a traceback."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise InputError(f"--model {model}: directory has no config.json (not a checkpoint)")
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
        if not any(os.path.isfile(os.path.join(model, f)) for f in names):
            raise InputError(f"--model {model}: the checkpoint has no tokenizer (none of {', '.join(names)})")
    elif not is_hub_id(model):
        raise InputError(f"--model {model}: no such checkpoint directory")
    from transformers import AutoTokenizer  # after the path checks: its import takes seconds
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # hub and tokenizer errors come in many types; all mean "cannot load"
        raise InputError(f"--model {model}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not tok.chat_template:
        raise InputError(f"--model {model}: the tokenizer has no chat template")
    return tok


def _special_strings(tok):
    """The strings the tokenizer turns into control tokens (BOS, EOS, [INST], <|eot_id|>, ...), longest first."""
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    return sorted(specials, key=len, reverse=True)


def encode_text(tok, text):
    """Token ids of plain text, with no BOS added and control-token strings in it ('</s>', '<|eot_id|>')
    encoded as the characters they are: a user who writes '</s>' has not ended the turn."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def encode_chat(tok, messages, add_generation_prompt=False):
    """Token ids of a conversation through the tokenizer's own chat template (which adds BOS itself).

    Tokenising the rendered string would read '</s>' or '<s>' typed by a user as control tokens. So the
    template is rendered once with a marker in place of each message, which tells template text from message
    text; the string is cut only at the template's own control tokens (where the tokenizer cuts anyway), and
    every piece between them is encoded as text. Without control-token strings in the messages this equals
    tokenising the rendered string (tested on the recipes' real tokenizers).
    """
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not any(s in m["content"] for m in messages for s in _special_strings(tok)):
        return tok(text, add_special_tokens=False)["input_ids"]
    return _encode_pieces(tok, messages, add_generation_prompt, text)


def _encode_pieces(tok, messages, add_generation_prompt, text):
    """encode_chat's careful path: `text` cut at the template's own control tokens, each piece encoded as text."""
    specials = _special_strings(tok)
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    shape = tok.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)], tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    pieces = re.split("(\ue000\\d+\ue001)", shape)  # template, mark, template, mark, ..., template
    if [p for p in pieces[1::2]] != marks:
        raise InputError("the chat template repeats or reorders the messages; cannot tell its text from theirs")
    for strip in (False, True):  # some templates trim each message (Llama-3's `| trim`)
        contents = [m["content"].strip() if strip else m["content"] for m in messages]
        if "".join(p for pair in zip(pieces[::2], contents + [""]) for p in pair) == text:
            break
    else:
        raise InputError("the chat template changes the message text; cannot tell its text from the messages'")
    cut = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    ids, run = [], ""  # run: text since the last control token of the template
    for i, template in enumerate(pieces[::2]):
        parts = cut.split(template)
        for j, part in enumerate(parts):
            if j % 2:  # a control token of the template itself
                ids += encode_text(tok, run) + [tok.convert_tokens_to_ids(part)]
                run = ""
            else:
                run += part
        run += contents[i] if i < len(contents) else ""
    return ids + encode_text(tok, run)


def encode_prompt(tok, prompt):
    """Token ids of a one-turn prompt (or of a conversation: a list of messages) and the assistant header: exactly
    what the policy is given to answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(tok, messages, add_generation_prompt=True)


def end_of_turn_id(tok):
    """The control token the chat template closes an assistant turn with (</s>, <|eot_id|>, <|im_end|>, ...):
    the first one after the answer in a rendered exchange; the tokenizer's EOS if the template has none."""
    mark = "\ue000answer\ue001"
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}],
                                   tokenize=False)
    after = text[text.index(mark) + len(mark):] if mark in text else ""
    found = [(after.find(s), s) for s in _special_strings(tok) if s in after]
    return tok.convert_tokens_to_ids(min(found)[1]) if found else tok.eos_token_id


# -----------------------------------------------------------------------------
# watching a run live: TensorBoard or Weights & Biases (train_sppo.py's steps, evaluate.py's win rates)

class Reporter:
    """report(metrics, step) sends named numbers to TensorBoard or W&B (rank 0 only); close() flushes. One that
    fails warns once and stops: a run never fails because of its dashboard."""

    def __init__(self, kind, send=None, close=None):
        self.kind, self.send, self.closer = kind, send, close

    def __call__(self, metrics, step):
        if self.send is not None:
            try:
                self.send(metrics, step)
            except Exception as e:  # a dashboard's library can raise anything; none of it may stop training
                self.fail(e)

    def fail(self, e):
        print(f"warning: --report-to {self.kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
              "the run goes on without it", file=sys.stderr, flush=True)
        self.send = self.closer = None

    def close(self):
        if self.closer is not None:
            try:
                self.closer()
            except Exception as e:
                self.fail(e)


def open_reporter(kind, logdir, name, config, purge_step=None):
    """A Reporter for --report-to KIND: TensorBoard event files in logdir, or a W&B run (offline with
    WANDB_MODE=offline) in logdir's parent, its id derived from `name` so a rerun continues it; "none": one that
    sends nothing. One that cannot start (the package missing, no account, a bad directory) warns and sends nothing."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=10)
            send = lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]  # noqa: E731
            return Reporter(kind, send, writer.close)
        if kind == "wandb":
            import wandb
            wb = wandb.init(project="sppo", name=name, dir=os.path.dirname(logdir), config=config, resume="allow",
                            id=hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:16])
            return Reporter(kind, lambda metrics, step: wb.log(metrics, step=step), wb.finish)
    except Exception as e:  # warn and go on
        Reporter(kind).fail(e)
    return Reporter(kind)


if __name__ == "__main__":  # run_loop.sh: python common.py check-run-settings OUT/settings.txt NAME=VALUE ...
    if sys.argv[1:2] == ["check-run-settings"] and len(sys.argv) > 2:  # and: merge-shards OUT ORDER SHARD...
        main_guard(lambda: check_run_settings(sys.argv[2], sys.argv[3:]))
    elif sys.argv[1:2] == ["merge-shards"] and len(sys.argv) > 3:
        main_guard(lambda: merge_shards(sys.argv[2], sys.argv[3], sys.argv[4:]))
    else:
        fail("usage: python common.py check-run-settings FILE NAME=VALUE ... | merge-shards OUT ORDER SHARD ...")
