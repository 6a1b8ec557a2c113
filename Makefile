# Common tasks. The venv lives in .venv (as in the README and .ci/run).
PY := .venv/bin/python

.PHONY: install run test test-all lint format bench bench-lora docs tiny8-table tiny8-diagnostics fusion-table ci

install:  ## create .venv and install fusion_bench with the test and dev extras
	python3 -m venv .venv
	$(PY) -m pip install -e ".[test,dev]"

run:  ## the default job: task arithmetic on tiny8, offline
	.venv/bin/fusion_bench

test:  ## the README's test command (unit + integration, offline, ~15 min on 2 cores)
	$(PY) -m pytest

test-all:  ## include slow tests
	$(PY) -m pytest -m "slow or not slow"

lint:  ## ruff (check + format) and yamllint, as CI
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/yamllint -s conf

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench:  ## merge speed/memory benchmarks (see docs/benchmarks.md)
	$(PY) benchmarks/run_all.py

bench-lora:  ## LoRA merges in Core Space / KnOTS vs the same rule on expanded experts (docs/methods/lora.md)
	$(PY) benchmarks/lora_merge.py

docs:  ## check that every method config has its docs page and index row
	$(PY) scripts/check_docs.py

tiny8-table:  ## regenerate the tiny8 results table in docs/tiny8.md
	$(PY) scripts/tiny8_table.py

tiny8-diagnostics:  ## task-vector size, linearity, cosines and low rank of the tiny8 experts (issue 17)
	$(PY) scripts/tiny8_diagnostics.py

fusion-table:  ## the tiny8 fusion table (parents, ensemble, vanilla, every fusion method; ~45 min)
	$(PY) scripts/fusion_table.py

ci:
	bash .ci/run
