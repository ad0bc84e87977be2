"""Tiny random-weight causal LMs that carry the REAL tokenizers and chat templates of the recipes' models.

    python examples/tiny/real_vocab.py --out runs/tiny/real              # all kinds, each into OUT/KIND
    python examples/tiny/real_vocab.py --out runs/tiny/real --kind llama3

Offline and in seconds: the vocabularies come from installed packages (nothing is downloaded and nothing is
copied into this repository), the weights are random (torch seed), the models narrow and shallow. What they
exercise is everything around the weights that users of the real checkpoints meet: the real token ids, the real
BOS/EOS ids, the real chat templates (how prompt and answer are glued together), tokenizer.json in the form the
hub's files have, and the tokenizer's own file next to it.

kinds
    mistral-2023  Mistral-7B-Instruct-v0.2 (SPPO's Mistral recipe): sentencepiece vocabulary of 32,000
                  (mistral_common's tokenizer.model.v1, the v1 tokenizer of Mistral-7B v0.1/v0.2), the chat
                  template the model had in Dec 2023 when SPPO was released: '<s>[INST] x [/INST]' + answer
                  glued to ']' + '</s>'.
    mistral       the same vocabulary with the model's current chat template: '<s> [INST] x [/INST]' + ' ' +
                  answer + '</s>'.
    llama3        Meta-Llama-3-8B-Instruct (SPPO's Llama-3 recipe): tiktoken vocabulary of 128,000 + 256 special
                  tokens (the `llama-models` package's llama3/tokenizer.model; a test requirement), its chat
                  template, eos <|eot_id|> and generation_config eos_token_id [128001, 128009] as the hub's files
                  have.

Neither real model has a pad token, and neither do these (HF generate warns and pads with eos; the project's
code must not rely on one).
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

KINDS = ("mistral-2023", "mistral", "llama3")

# ---------------------------------------------------------------------------------------------------------------
# Chat templates: public text, character for character.
#
# Mistral-7B-Instruct-v0.2, Dec 2023 (the template SPPO's generation used). Source: the model's
# tokenizer_config.json as released (huggingface.co/mistralai/Mistral-7B-Instruct-v0.2), quoted in llama.cpp's
# tests/test-chat-template.cpp as "mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)"
# (and with the rest of that tokenizer_config.json in llama-cpp-python's tests/test_llama_chat_format.py).
MISTRAL_2023_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Mistral-7B-Instruct-v0.2, current (Mistral's "v1" template with an optional system prompt). Source: the model's
# tokenizer_config.json today, quoted in llama.cpp's tests/test-chat-template.cpp as
# "mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)". Real newlines between the
# tags; the '\\n\\n' in the system branch is a Jinja escape (backslash-n in the template text).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# Meta-Llama-3-8B-Instruct. Source: the model's tokenizer_config.json (huggingface.co/meta-llama/
# Meta-Llama-3-8B-Instruct; the add_generation_prompt branch was added after the April 2024 release; llama.cpp's
# tests/test-chat-template.cpp quotes the release text, which always ends with the assistant header). The two
# newlines after <|end_header_id|> are real newlines.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3's 256 special tokens (meta-llama/llama3's tokenizer.py; Llama-3.1 renamed several reserved ones, which is
# what llama-models' own tokenizer.py lists, so the names are spelled out here).
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HUGE = 1000000000000000019884624838656  # model_max_length in both hub tokenizer_config.json files


def package_file(package, *parts):
    """Path of a data file inside an installed package (never copied into this repository)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed (see requirements/)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found (package {package!r} changed?)")
    return path


def mistral_vocab_file():
    return package_file("mistral_common", "data", "tokenizer.model.v1")


def llama3_vocab_file():
    return package_file("llama_models", "llama3", "tokenizer.model")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers

def mistral_backend(model_file):
    """tokenizers.Tokenizer as in the hub's Mistral-7B-Instruct-v0.2 tokenizer.json, which transformers' legacy
    LlamaConverter made (2023): BPE with byte fallback over the sentencepiece pieces, merges ordered by piece
    score, normaliser Prepend('▁') + Replace(' ', '▁') (sentencepiece's dummy prefix, applied to every stretch of
    text between special tokens), no pre-tokeniser, <s> $A post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"] and sp.is_byte(3)  # byte fallback
    scores = [(sp.id_to_piece(i), 0.0 if i < 3 else sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(scores)}
    # merges: every split of every piece into two pieces, the 2023 SentencePieceExtractor's order (by the merged
    # piece's score, highest first; ties in vocabulary order)
    merges = []
    for piece, score in scores:
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges = [(left, right) for left, right, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def mistral_tokenizer(template):
    """The hub's tokenizer_config.json: tokenizer_class LlamaTokenizer, legacy true, bos/eos/unk, no pad."""
    from transformers import LlamaTokenizer
    backend = mistral_backend(mistral_vocab_file())
    tok = LlamaTokenizer(
        vocab=backend.get_vocab(), merges=[], legacy=True, add_bos_token=True, add_eos_token=False,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False,
        spaces_between_special_tokens=False, use_default_system_prompt=False, model_max_length=HUGE,
        chat_template=template)
    tok._tokenizer = backend  # tokenizer.json exactly as the hub's (the class rebuilds a Metaspace one on load)
    return tok


def fast_tiktoken_converter():
    """transformers' TikTokenConverter, computing the same vocabulary and merges (same order) faster: each token's
    byte-level spelling once, not once per merge it takes part in."""
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    class Converter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, tiktoken_url):
            ranks = self.load_tiktoken_bpe(tiktoken_url)
            table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
            spell = {t: t.decode("latin-1").translate(table) for t in ranks}  # byte-level BPE's printable spelling
            merges = []
            for token, rank in ranks.items():
                local = [(token[:i], token[i:]) for i in range(1, len(token))
                         if token[:i] in ranks and token[i:] in ranks]
                local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
                merges += [(rank, left, right) for left, right in local]
            merges.sort(key=lambda m: m[0])  # stable: by the merged token's rank, then as above
            return {spell[t]: r for t, r in ranks.items()}, [(spell[left], spell[right]) for _, left, right in merges]
    return Converter


def llama3_tokenizer():
    """The hub's Meta-Llama-3-8B-Instruct tokenizer: byte-level BPE over tiktoken's ranks (merges in rank order,
    ignore_merges), Llama-3's split regex, 256 special added tokens, <|begin_of_text|> $A post-processor;
    tokenizer_config: PreTrainedTokenizerFast, bos <|begin_of_text|>, eos <|eot_id|> (the hub's value since May
    2024; <|end_of_text|> before), no pad."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    backend = fast_tiktoken_converter()(vocab_file=llama3_vocab_file(), pattern=LLAMA3_PATTERN,
                                        extra_special_tokens=LLAMA3_SPECIAL).converted()
    assert backend.token_to_id("<|begin_of_text|>") == 128000 and backend.get_vocab_size() == 128256
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=True, model_max_length=HUGE, model_input_names=["input_ids", "attention_mask"],
        chat_template=LLAMA3_TEMPLATE)


# ---------------------------------------------------------------------------------------------------------------
# Models

def tiny_config(kind, vocab_size, bos, eos):
    """Real architecture class, vocabulary and special ids; narrow and shallow (vLLM's CPU attention wants
    head_dim in {32, 64, 80, ...}); untied embeddings as the real models; 2 query heads sharing 1 KV head
    (grouped-query attention, as both real models)."""
    from transformers import LlamaConfig, MistralConfig
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
                  torch_dtype="float32")
    if kind == "llama3":
        return LlamaConfig(rope_theta=500000.0, **common)
    return MistralConfig(rope_theta=1000000.0, sliding_window=None, **common)


def build(kind, out, seed=0):
    """Write a tiny random-weight checkpoint of `kind` (one of KINDS) into `out` (replaced). Returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "llama3":
        tok, vocab_file = llama3_tokenizer(), llama3_vocab_file()
        bos, eos = 128000, 128009
        # the hub's generation_config.json: both ends stop (<|end_of_text|>, <|eot_id|>), and its sampling defaults
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=[128001, 128009], do_sample=True, temperature=0.6,
                               top_p=0.9, max_length=4096)
    else:
        tok = mistral_tokenizer(MISTRAL_2023_TEMPLATE if kind == "mistral-2023" else MISTRAL_TEMPLATE)
        vocab_file = mistral_vocab_file()
        bos, eos = 1, 2
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos)  # the hub's generation_config.json
    config = tiny_config(kind, len(tok), bos, eos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = gen

    out = os.fspath(out).rstrip("/")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # chat_template inside tokenizer_config.json, where the hub's files have it (and tools older than
    # transformers' chat_template.jinja look for it)
    tok.save_pretrained(tmp, save_jinja_files=False)
    # The tokenizer's own file, for tools that want it (sentencepiece, llama.cpp's converter, Meta's and
    # mistral_common's tokenizers). tokenizer.json is what transformers and vLLM load.
    shutil.copyfile(vocab_file, os.path.join(tmp, "tokenizer.model"))
    # Keys of the hub's tokenizer_config.json that transformers 5 does not write back. "legacy": true matters:
    # transformers 5 rebuilds a LlamaTokenizer from tokenizer.json's vocabulary with a Metaspace pre-tokeniser
    # whose prepend scheme follows it ("always", as the sentencepiece model and the legacy normaliser;
    # without it "first": no '▁' after <s>, so '<s>[INST]' would be '[' not '▁[').
    # tokenizer_class: transformers 5 writes its new name for the Llama-3 one; the hub's file says
    # PreTrainedTokenizerFast, which transformers 4 needs and 5 maps to the same class.
    hub_keys = (dict(tokenizer_class="PreTrainedTokenizerFast") if kind == "llama3" else
                dict(legacy=True, add_bos_token=True, add_eos_token=False, pad_token=None))
    path = os.path.join(tmp, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(hub_keys)
    assert cfg["chat_template"] == tok.chat_template
    with open(path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="each kind is written to OUT/KIND")
    ap.add_argument("--kind", action="append", choices=KINDS, help="repeatable; default: all kinds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)  # see build.py: tiny matrices, shared cores
    for kind in args.kind or KINDS:
        t0 = time.time()
        path = build(kind, os.path.join(args.out, kind), args.seed)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"{kind}: {path} ({size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
