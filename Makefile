# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both (re)create .venv from constraints.txt when pyproject.toml or constraints.txt changed, make sure
# Fashion-MNIST is present, then run.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
CONFIG ?= configs/fashion_tops.yaml
PYTEST_ARGS ?=
# Installed without their declared dependencies (see the `mobile` extra in pyproject.toml: xdsl 0.28 declares
# typing-extensions<4.13, which no pydantic 2.14 environment can satisfy); what they need is in the extra.
MOBILE_NODEPS := litert-torch litert-converter xdsl

.PHONY: demo test lint venv data testdeps clean-cache

venv: $(STAMP)

# uv installs the same pinned versions as pip would, about three times faster (parallel downloads and unpacking).
UV := $(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt uv
	$(UV) -e ".[dev,demo,mobile,sign,npu,search]"
	$(UV) --no-deps $(MOBILE_NODEPS)
	@touch $(STAMP)

data:
	@bash scripts/ensure_fashion_mnist.sh

# sshd (the SSH-target tests) and chromium (the report rendering test), from Debian when missing.
testdeps:
	@bash scripts/ensure_test_deps.sh

demo: venv data
	$(VENV)/bin/edgesmith build $(CONFIG)

lint: venv
	$(VENV)/bin/ruff check .

test: venv data testdeps lint
	$(VENV)/bin/python -m pytest -n auto --dist loadfile --durations=25 $(PYTEST_ARGS)

clean-cache:
	rm -rf builds
