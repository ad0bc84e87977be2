"""Shared fixtures: the tiny world is built once per pytest run, offline, in a temp directory."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_stage(script, *args, check=True, env=None):
    """Run one stage as a real subprocess; returns the CompletedProcess (stdout/stderr as text)."""
    # One thread: the tiny models gain nothing from more, and on a busy machine extra threads cost 5-10x.
    e = dict(os.environ, SPPO_PROGRESS="0", OMP_NUM_THREADS="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                       capture_output=True, text=True, env=e, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def require_vllm():
    """vLLM tests skip on a machine without vllm, but fail in CI (CI=true), where it must be installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("vllm is not importable, and CI must run the vLLM tests")
        pytest.skip("vllm not installed")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny world (policy, ranker, prompts). SPPO_TEST_WORLD=DIR reuses one built earlier with
    `python examples/tiny/build.py --out DIR --world-version 1` (a developer's shortcut; CI always builds it
    afresh). World v1: its judge is decisive (a better answer wins outright), so what the tests assert about
    the ranker's verdicts and the loop's gains is clear-cut."""
    prebuilt = os.environ.get("SPPO_TEST_WORLD")
    if prebuilt and os.environ.get("CI") != "true":
        from pathlib import Path
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("tiny") / "world"
    run_stage("examples/tiny/build.py", "--out", out, "--world-version", "1")
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The three tiny real-vocabulary models (mistral-2023, mistral, llama3: examples/tiny/real_vocab.py), built
    once per pytest run (a few seconds each)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
    import real_vocab
    out = tmp_path_factory.mktemp("real_vocab")
    return {kind: real_vocab.build(kind, out / kind) for kind in real_vocab.KINDS}
