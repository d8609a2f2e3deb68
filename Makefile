# The project's two commands:  `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh the virtual environment in $(VENV) (Python 3.10: sal-detectron2 is a
# cp310 wheel), install the pinned dependencies and build the enact_ops extension.
#   ENACT_SKIP_DETECTRON2=1   keep the detectron2 you already have (don't install sal-detectron2)
#   PYTHON310=/path/python    the interpreter to create the venv with
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CSRC := $(wildcard enact_ops/csrc/*.cpp enact_ops/csrc/*.h enact_ops/csrc/cpu/*.cpp enact_ops/csrc/cuda/*.cu enact_ops/csrc/cuda/*.cuh)
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: env test test-detrex demo benchmark-ops benchmark-attention build-cuda-check clean

env: $(VENV)/.built

$(VENV)/.deps: requirements/base.txt requirements/detectron2.txt
	@set -e; py="$(PYTHON310)"; \
	if [ -z "$$py" ]; then for c in python3.10 $$HOME/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10; do \
	  if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then py="$$c"; break; fi; done; fi; \
	if [ -z "$$py" ]; then echo "error: Python 3.10 not found (needed by sal-detectron2); set PYTHON310=/path/to/python3.10" >&2; exit 1; fi; \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/base.txt $(if $(ENACT_SKIP_DETECTRON2),,-r requirements/detectron2.txt)
	@touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $@

test: env
	$(PY) -m pytest -q tests

# The tests against real detrex (marked `detrex`), with skipping turned into failure.
#   DETREX_SRC=<detrex checkout or source archive (.tar.gz)>   required
# The tree is unpacked / copied into $(DETREX_DIR) (writable, rebuilt when DETREX_SRC is newer),
# its C++ extension built in place for the CPU, and put on the path through DETREX_ROOT; pip
# never installs detrex or its requirements.txt (requirements/detrex.txt instead).
DETREX_DIR ?= build/detrex
$(VENV)/.deps-detrex: $(VENV)/.deps requirements/detrex.txt
	$(PY) -m pip install -q -r requirements/detrex.txt
	@touch $@

test-detrex: env $(VENV)/.deps-detrex
	@set -e; src="$(DETREX_SRC)"; dest="$(DETREX_DIR)"; \
	if [ -z "$$src" ]; then echo "error: set DETREX_SRC=<detrex checkout or source archive>, e.g. make test-detrex DETREX_SRC=../detrex" >&2; exit 1; fi; \
	if [ ! -e "$$src" ]; then echo "error: DETREX_SRC=$$src does not exist" >&2; exit 1; fi; \
	if [ ! -f "$$dest/.source" ] || [ "$$(cat $$dest/.source)" != "$$(realpath $$src)" ] || [ "$$src" -nt "$$dest/.source" ]; then \
	  rm -rf "$$dest"; mkdir -p "$$dest"; \
	  if [ -d "$$src" ]; then tar -C "$$src" --exclude=.git -cf - . | tar -C "$$dest" -xf -; \
	  else tar -xzf "$$src" -C "$$dest" --strip-components=1; fi; \
	  test -d "$$dest/projects" -a -d "$$dest/detrex" || { echo "error: $$src is not a detrex source tree (no projects/ and detrex/)" >&2; exit 1; }; \
	  realpath "$$src" > "$$dest/.source"; \
	fi; \
	if ! ls "$$dest"/detrex/_C*.so >/dev/null 2>&1; then \
	  echo "building detrex's extension in $$dest (CPU)"; \
	  (cd "$$dest" && FORCE_CUDA=0 MAX_JOBS=2 $(abspath $(PY)) setup.py -q build_ext --inplace > build.log 2>&1) \
	    || { tail -30 "$$dest/build.log"; exit 1; }; \
	fi
	DETREX_ROOT=$(abspath $(DETREX_DIR)) ENACT_REQUIRE_DETREX=1 $(PY) -m pytest -q -m detrex tests $(PYTEST_OPTS)

# The main job: Conditional DETR + ENACT trained from scratch on the built-in shapes dataset
# (generated on first use under ./datasets), evaluated with COCOEvaluator on its 500 validation
# images, then pictures of what ENACT does on 4 of them and its statistics over all 500.  Extra overrides: DEMO_OPTS="...".
DEMO_CONFIG := configs/shapes/conditional_detr_r18_shapes_enact.py
DEMO_OUT := output/shapes/conditional_detr_r18_enact
demo: env
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) train.output_dir=$(DEMO_OUT) $(DEMO_OPTS)
	$(PY) tools/visualize_enact.py --config-file $(DEMO_CONFIG) --checkpoint $(DEMO_OUT)/model_final.pth \
	  --split val --num-images 4 --output $(DEMO_OUT)/enact_vis
	$(PY) tools/enact_stats.py --config-file $(DEMO_CONFIG) --checkpoint $(DEMO_OUT)/model_final.pth \
	  --split val --output $(DEMO_OUT)/enact_stats
	@echo "demo: metrics in $(DEMO_OUT)/metrics.json, pictures in $(DEMO_OUT)/enact_vis (index.html), statistics in $(DEMO_OUT)/enact_stats"

benchmark-ops: env
	$(PY) tools/benchmark_ops.py

benchmark-attention: env
	$(PY) tools/benchmark_attention.py

# Compile the CUDA kernels without a GPU (nvcc only) into build/cuda-lib and load the result.
build-cuda-check: $(VENV)/.deps
	FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2 \
	  $(PY) setup.py -q build_ext --build-temp build/cuda-temp --build-lib build/cuda-lib
	$(PY) -c "import glob, importlib.util, torch; \
	  spec = importlib.util.spec_from_file_location('enact_ops._C', glob.glob('build/cuda-lib/enact_ops/_C*.so')[0]); \
	  m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); \
	  assert m.with_cuda and hasattr(torch.ops.enact_ops, 'segment_softmax_pool_forward'); \
	  print('CUDA build of enact_ops: OK')"

# The prepared GPU check (tools/gpu_check.py, docs/gpu_check.md): needs torch, pytest, a compiler and
# nvcc only -- no venv or detectron2 -- so on the GPU machine: make gpu-check GPU_CHECK_PY=python3.
# Results under $(GPU_CHECK_OUT) as each stage ends; GPU_CHECK_OPTS e.g. "--budget-s 300 --detector off".
.PHONY: gpu-check
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= output/gpu_check
gpu-check:
	$(GPU_CHECK_PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_OPTS)

clean:
	rm -rf build *.egg-info enact_ops/_C*.so
