"""Run a script as __main__ (python spy_models.py SCRIPT ARGS...) with transformers' AutoModelForCausalLM
constructors wrapped: each call appends {"rank", "call", "meta"} to the file $SPY_LOG, "meta" saying whether
the model it returned holds its parameters on the meta device (no memory). Used under torchrun to see which
processes read the checkpoint. torch.distributed.init_process_group is wrapped too: {"rank", "call",
"backend", "timeout_s"}, the timeout the process group was given, and torch's AdamW and RMSprop: {"rank", "call",
"foreach"}, each parameter group's foreach once the optimizer is made (False: one tensor at a time; None: torch's
default, which is foreach on a GPU). With SPY_COMPUTE=1 each process also appends,
at exit, what the first linear layer of its first decoder layer computed: the dtypes of its outputs and how many
of its calls ran during a backward pass (gradient checkpointing recomputes the forward there)."""
import atexit
import json
import os
import runpy
import sys

import torch

from transformers import AutoModelForCausalLM


def spy(name):
    original = getattr(AutoModelForCausalLM, name)  # a bound classmethod

    def wrapped(*args, **kwargs):
        model = original(*args, **kwargs)
        with open(os.environ["SPY_LOG"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "call": name,
                                "meta": all(p.is_meta for p in model.parameters())}) + "\n")
        if os.environ.get("SPY_COMPUTE"):
            watch(model)
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


def spy_optimizers():
    """train_sppo.py looks torch.optim.AdamW / RMSprop up when it makes its optimizer: a subclass there logs."""
    for name in ("AdamW", "RMSprop"):
        class Spied(getattr(torch.optim, name)):
            def __init__(self, *args, _name=name, **kwargs):
                super().__init__(*args, **kwargs)
                with open(os.environ["SPY_LOG"], "a") as f:
                    f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "call": _name,
                                        "foreach": [g["foreach"] for g in self.param_groups]}) + "\n")
        setattr(torch.optim, name, Spied)


def watch(model):
    layer = next(m for m in model.modules() if type(m).__name__ in model._no_split_modules)
    linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    seen = {"dtypes": set(), "calls": 0, "in_backward": 0}

    def hook(module, inputs, output):
        seen["dtypes"].add(str(output.dtype))
        seen["calls"] += 1
        seen["in_backward"] += torch._C._current_graph_task_id() != -1  # -1 outside the autograd engine

    def report():
        with open(os.environ["SPY_LOG"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "dtypes": sorted(seen["dtypes"]),
                                "calls": seen["calls"], "in_backward": seen["in_backward"]}) + "\n")
    linear.register_forward_hook(hook)
    atexit.register(report)


if __name__ == "__main__":
    spy_process_group()
    spy_optimizers()
    spy("from_pretrained")
    spy("from_config")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
