# Two commands on a fresh clone: `make demo` and `make test`. Both install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so pip takes the wheels this project is tested with; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.lla-installed

.PHONY: install demo test test-fast bench bench-compile gpu-check lint clean docs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(PY) -m lla.demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Memory for every row (exact), step times per row; then step / E2E measured interleaved (stable on a shared host),
# plain (8 rounds: the ratios the targets are judged on), with both memory options, and in channels_last; then
# module-parallel training, 2 stages against one process (docs/pipeline.md); then the compile=true rows.
# About 15 minutes on an idle 2-core CPU with an empty Inductor cache (the compile rows take about 8 of them; a
# warm cache, /tmp/torchinductor_<user>, saves most of their compile time).
bench: install
	$(PY) -m lla.bench.cli --suite default --steps 2 --json bench/results.json --markdown bench/results.md --plot bench/results.png
	$(PY) -m lla.bench.interleaved --rounds 8 --json bench/interleaved.json --markdown bench/interleaved.md
	$(PY) -m lla.bench.interleaved --rounds 4 --options aux_checkpoint=true,backbone.fused_bn_relu=true \
		--json bench/interleaved_lean.json --markdown bench/interleaved_lean.md
	$(PY) -m lla.bench.interleaved --rounds 4 --channels-last --json bench/interleaved_cl.json \
		--markdown bench/interleaved_cl.md
	$(PY) -m lla.bench.cli --pipeline 2 --threads 1 --methods dgl,infopro --backbone resnet32 --k 16 --batch-size 64 \
		--steps 10 --warmup 3 --json bench/pipeline.json --markdown bench/pipeline.md
	$(MAKE) --no-print-directory bench-compile

# compile=true rows alone (docs/compile.md#speed): every method and E2E compiled per module and aux net, beside an
# eager E2E, plain and lean; then DGL and InfoPro at K=4 (modules of several blocks, where compiling pays on a CPU).
# Compile time is spent in untimed warm-up steps and reported per row.
bench-compile: install
	$(PY) -m lla.bench.interleaved --rounds 6 --compile --json bench/interleaved_compile.json \
		--markdown bench/interleaved_compile.md
	$(PY) -m lla.bench.interleaved --rounds 4 --compile --options aux_checkpoint=true,backbone.fused_bn_relu=true \
		--json bench/interleaved_compile_lean.json --markdown bench/interleaved_compile_lean.md
	$(PY) -m lla.bench.interleaved --rounds 4 --compile --methods dgl,infopro --k 4 \
		--json bench/interleaved_compile_k4.json --markdown bench/interleaved_compile_k4.md

# The documentation site (mkdocs + Material + mkdocstrings) into site/; --strict fails on a broken link or page.
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

# On one CUDA GPU, under 8 minutes: the `gpu` tests, then ResNet-32 K=16 and ResNet-101 K=2 at batch 128, every
# method, 32-true and bf16-mixed; writes bench/gpu.json and bench/gpu.md. Needs torch with CUDA (TORCH_SPEC).
gpu-check: install
	$(PY) -m lla.bench.gpu --out bench

lint: install
	$(VENV)/bin/ruff check lla tests run.py

clean:
	rm -rf outputs multirun .pytest_cache
