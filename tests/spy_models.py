"""Run a script as __main__ (python spy_models.py SCRIPT ARGS...) with transformers' AutoModelForCausalLM
constructors wrapped: each call appends {"rank", "call", "meta"} to the file $SPY_LOG, "meta" saying whether
the model it returned holds its parameters on the meta device (no memory). Used under torchrun to see which
processes read the checkpoint. torch.distributed.init_process_group is wrapped too: {"rank", "call",
"backend", "timeout_s"}, the timeout the process group was given."""
import json
import os
import runpy
import sys

from transformers import AutoModelForCausalLM


def spy(name):
    original = getattr(AutoModelForCausalLM, name)  # a bound classmethod

    def wrapped(*args, **kwargs):
        model = original(*args, **kwargs)
        with open(os.environ["SPY_LOG"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "call": name,
                                "meta": all(p.is_meta for p in model.parameters())}) + "\n")
        return model
    setattr(AutoModelForCausalLM, name, wrapped)


def spy_process_group():
    import torch.distributed as dist
    original = dist.init_process_group

    def wrapped(backend=None, *args, timeout=None, **kwargs):
        with open(os.environ["SPY_LOG"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "call": "init_process_group",
                                "backend": backend, "timeout_s": timeout and timeout.total_seconds()}) + "\n")
        return original(backend, *args, timeout=timeout, **kwargs)
    dist.init_process_group = wrapped


if __name__ == "__main__":
    spy_process_group()
    spy("from_pretrained")
    spy("from_config")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
