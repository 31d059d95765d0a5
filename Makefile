# One command each on a fresh clone: `make demo`, `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK := True
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test demo demo-model paper bench bench-scale bench-host bench-gpu lint clean

install: $(STAMP)

# Re-installs only when the project definition changes; a second `make install` takes seconds.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned to the builds these machines ship on local disk
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	# s3fs and moto must resolve together (a separate moto install breaks aiobotocore's botocore pin)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.demo --output build/demo

# Rebuilds the shipped demo CLIP (same seeds, same data order; <= 30 min on 2 cores).
demo-model: $(STAMP)
	nice -n 10 $(BIN)/python -m tmars_ray.devtools.demo_model --output tmars_ray/models/assets/tmars-demo.safetensors

# The paper's experiment in miniature (a benchmark, <= 40 min on 2 cores); table to BENCHMARKS.md.
paper: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.paper --write BENCHMARKS.md

# Benchmarks, never part of `make test`. BENCH_ROWS=1M,4M,16M,64M for the full selection sweep.
BENCH_ROWS ?= 1M,4M
bench: $(STAMP)
	mkdir -p build/bench
	$(BIN)/python -m tmars_ray.devtools.bench --samples 400 --write BENCHMARKS.md
	$(BIN)/python -m tmars_ray.devtools.bench --clip-only --write BENCHMARKS.md
	$(BIN)/python -m tmars_ray.devtools.bench_detect --samples 200 | tee build/bench/detect.md
	$(BIN)/python -m tmars_ray.devtools.bench_select --rows $(BENCH_ROWS) | tee build/bench/select.md

# Orchestration at scale: 2,000 x 4 and 20 x 400 tiny samples, local disk and local S3.
bench-scale: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.bench_scale --s3
	$(BIN)/python -m tmars_ray.devtools.bench_select --rows 16M --skip-memory --cluster local

# Host CPU per sample and object-store traffic of the GPU layout, measured on the CPU.
bench-host: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.bench host --samples 400

# On a fresh GPU machine: the gpu extra replaces the CPU ONNX Runtime (never both), then the
# whole job on the GPU(s); figures appended to BENCHMARKS.md.
bench-gpu: $(STAMP)
	$(BIN)/pip uninstall -y -q onnxruntime
	$(BIN)/pip install -q -e ".[gpu]"
	$(BIN)/python -m tmars_ray.devtools.bench_gpu --samples 20000 --write BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check tmars_ray jobs tests
	$(BIN)/ruff format --check tmars_ray jobs tests

clean:
	rm -rf build .pytest_cache
