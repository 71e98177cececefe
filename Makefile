# Set-up and tests. `make setup` is idempotent: it only does what is missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-extended test-fast clean-venv redis kernels gpu-bundle

setup: $(STAMP) redis kernels

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; the CPU build is already in.
	$(VPY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

redis:
	@bash scripts/ensure_redis.sh

# The planner's kernels, compiled into numba's cache once here (a second or less when already there).
kernels: $(STAMP)
	@$(VPY) -m oracle.warmup

test: setup
	$(VPY) -m pytest -q -m "not extended" tests

# The check matrix on four datasets nobody tuned to, and the full matrix (an hour or more here).
test-extended: setup
	$(VPY) -m pytest -q -m extended tests

test-fast: setup
	$(VPY) -m pytest -q -m "not slow and not extended" tests

clean-venv:
	rm -rf $(VENV)

# Wheels and Debian's redis-server for a GPU machine without a network (docs/gpu.md); needs `make setup`.
gpu-bundle: setup
	PY=$(VPY) bash scripts/gpu-bundle.sh
