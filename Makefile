# Two commands on a fresh machine (see README):
#   make sample   installs everything, then runs the main job on the sample data
#   make test     installs everything, then runs the test suite (.ci/run calls it)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

.PHONY: install sample test bench clean

install: $(VENV)/.installed

# uv installs the registry's torch/torchvision builds (the same stack as the GPU clusters);
# plain pip here would take a local CPU-only torch that the registry torchvision cannot load.
$(VENV)/.installed: pyproject.toml
	command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv==$(UV_VERSION)"
	uv venv -q --allow-existing --python 3.11 $(VENV)
	uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	touch $@

sample: install
	$(PY) pipeline/run.py --config configs/sample.yaml

test: install
	$(PY) -m pytest -q

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf work .pytest_cache
