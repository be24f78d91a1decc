# Two commands on a fresh machine (see README):
#   make sample   installs everything, then runs the main job on the sample data
#   make test     installs everything, then runs the lint and the test suite (.ci/run calls it)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

.PHONY: install sample test lint bench mutants clean

install: $(VENV)/.installed

# uv installs exactly what uv.lock pins: the registry's torch/torchvision builds (the same stack as
# the GPU clusters); plain pip here would take a local CPU-only torch that the registry torchvision
# cannot load. --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so every process
# (Ray workers included) would otherwise compile torch, Ray and MLflow at each start.
$(VENV)/.installed: pyproject.toml uv.lock
	command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv==$(UV_VERSION)"
	UV_PROJECT_ENVIRONMENT=$(VENV) uv sync -q --frozen --extra dev --compile-bytecode --python 3.11
	touch $@

sample: install
	$(PY) pipeline/run.py --config configs/sample.yaml --set run.tracking_server=true

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Mutation testing (docs/testing.md), not part of CI: mutmut over the modules [tool.mutmut] in
# pyproject.toml lists, with their fast tests; then the score a module. MUTANTS narrows the run to
# some mutants by name, e.g. make mutants MUTANTS='zeroseg.losses.*'. mutmut keeps its results in
# mutants/ and re-runs only the mutants of changed functions; rm -rf mutants for a clean measurement.
MUTANTS ?=
mutants: install
	@# mutmut copies tests/ into mutants/ only when it creates mutants/: refresh them
	if [ -d mutants/tests ]; then rm -rf mutants/tests && cp -r tests mutants/tests; fi
	ZEROSEG_DATA=$${ZEROSEG_DATA:-$(abspath ../shared/data)} $(VENV)/bin/mutmut run --max-children $$(nproc) $(MUTANTS) > mutants.log 2>&1 || (tail -40 mutants.log; exit 1)
	$(PY) devtools/mutation_report.py

clean:
	rm -rf work .pytest_cache
