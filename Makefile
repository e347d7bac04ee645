# Two commands on a fresh machine:
#   make demo   set up .venv, train a tiny GPT on the Python stdlib's source (~2 min on 2 CPU cores), print samples
#   make test   set up .venv, run the test suite
# Override the pinned versions, e.g. make demo TORCH=torch==2.11.0 TRITON=triton==3.6.0

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
DEMO_TIME ?= 120
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" "$(TRITON)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python train.py --out-dir out/demo --max-time $(DEMO_TIME) --max-steps 100000 \
		--lr 2e-3 --warmup 50 --eval-interval 200 --eval-iters 10 --log-interval 50
	$(BIN)/python sample.py --checkpoint out/demo --prompt "def " --num-samples 3 \
		--max-new-tokens 300 --temperature 0.7 --seed 0

# pytest exits 5 when it collects no test; that is not a failure of the code.
# The second run repeats the kernel tests with the untimed Hopper candidates forced on.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(BIN)/python -m pytest -q --candidates tests/test_ffn.py tests/test_attention.py tests/test_layer_norm.py; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) out
