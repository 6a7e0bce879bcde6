# mlx_tune: `make demo` runs the whole pipeline, `make test` the test suite.
# Works on a fresh Linux or macOS machine with Python 3.10+ (nothing installed by hand).

PYTHON ?= python3
VENV   := .venv
PY     := scripts/python
STAMP  := $(VENV)/.installed
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup test test-fast test-accelerator lint demo demo-dpo demo-grpo screenshots bench bench-quick bench-rivals bench-llamacpp clean help

help:
	@echo "make demo         the whole pipeline on SmolLM2: data -> train -> fuse -> serve -> test"
	@echo "make demo-dpo     the same with DPO: the model learns to prefer short, right answers"
	@echo "make demo-grpo    GRPO from a reward file: the held-out reward, base vs tuned (configs/grpo-demo.yaml)"
	@echo "make test         set up .venv and run the test suite"
	@echo "make test-fast    the suite without the slow tests (-m 'not slow'): the inner loop"
	@echo "make test-accelerator  backend-sensitive tests on the Metal/CUDA code path (MLX_TUNE_KERNELS=accelerator)"
	@echo "make lint         ruff (lint + import order) and mypy over the typed seams"
	@echo "make setup        .venv + package + OpenBLAS and Chromium (Linux) + demo model"
	@echo "make screenshots  the studio's browser test, saving its screenshots to docs/"
	@echo "make bench        all benchmarks (long); make bench-quick: under 20 minutes"
	@echo "make bench-llamacpp  build llama.cpp once (cached) and let it judge our GGUF files"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Without the demo model the tests that need it skip; under CI=true a failed download fails the run.
$(MODEL): | $(VENV)/bin/python
	@$(VENV)/bin/python scripts/fetch_demo_model.py || [ "$$CI" != "true" ]

setup: $(STAMP) $(MODEL)
	@scripts/setup_system.sh

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
PYTEST = rc=0; $(PY) -m pytest $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test: setup
	@$(call PYTEST,tests --durations=15)

test-fast: setup
	@$(call PYTEST,tests -m "not slow")

# The branch Macs and CUDA machines take (mx.quantized_matmul layers, float16 compute,
# fused attention, the head without dequantizing), run here on the CPU for real.
test-accelerator: setup
	@export MLX_TUNE_KERNELS=accelerator; $(call PYTEST,tests -m "accelerator and not slow")

LINT_PATHS := mlx_tune tests bench scripts data_transform.py test_mlx.py
# mypy checks the typed seams: config objects, the loading return type, runtime, atomic
# writes, and the adapter, training and export entry points.
TYPED := mlx_tune/config.py mlx_tune/typed_config.py mlx_tune/errors.py mlx_tune/atomic.py mlx_tune/runtime mlx_tune/model/loading.py \
	mlx_tune/model/attention.py mlx_tune/model/flash.py mlx_tune/model/attention_shapes.py mlx_tune/model/head.py mlx_tune/model/packing.py \
	mlx_tune/adapters/__init__.py mlx_tune/adapters/inject.py mlx_tune/adapters/files.py mlx_tune/adapters/manager.py \
	mlx_tune/training/run.py mlx_tune/export/fuse.py mlx_tune/adapters/trainable.py mlx_tune/training/full.py \
	mlx_tune/export/full.py mlx_tune/planning/full.py \
	mlx_tune/training/best.py mlx_tune/training/tracking.py mlx_tune/evaluation/live.py mlx_tune/data/masks.py \
	mlx_tune/training/preference_losses.py mlx_tune/training/preference.py mlx_tune/data/pairs.py \
	mlx_tune/data/pair_batches.py mlx_tune/training/lanes.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(TYPED)

demo: setup
	@scripts/demo.sh

demo-dpo: setup
	@DEMO_CONFIG=configs/dpo-demo.yaml DEMO_RAW=data/dpo_demo_raw/pairs.jsonl DEMO_DATA_OUT=data/dpo_demo \
	  DEMO_PROMPTS=data/dpo_demo_eval_prompts.jsonl scripts/demo.sh

demo-grpo: setup
	./train_by_mlx.sh configs/grpo-demo.yaml

screenshots: setup
	@export MLX_TUNE_STUDIO_SHOTS=docs; $(call PYTEST,tests/test_studio_browser.py)

bench: setup
	$(PY) bench/run_all.py

bench-quick: setup
	$(PY) bench/run_all.py --quick

bench-rivals: setup
	bench/install_rivals.sh
	bench/build_llamacpp.sh || true

# llama.cpp from the llama-cpp-python sdist, built once into ~/.cache/mlx_tune/llama.cpp (minutes on 2 cores).
bench-llamacpp: setup
	$(PY) bench/bench_llamacpp.py

clean:
	rm -rf outputs .pytest_cache
