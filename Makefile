# `make demo` runs the whole MiniPLM pipeline on the embedded default (CPU);
# `make test` runs the test suite. Both create or reuse .venv/ by themselves.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all demo test bench install clean

all: test

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash examples/pretrain_miniplm.sh

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf build *.egg-info megatron_miniplm/_cpp*.so
