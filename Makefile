# make run   — set up the environment if missing, then run the quick profile end to end (Snakemake);
#              make run CONFIG=configs/import-example.yaml runs another config instead of params.yaml
# make test  — set up the environment if missing, then run the test suite (minutes; CI also runs test-e2e)
# make test-e2e — the end-to-end runs of the whole tiny DAG under Snakemake and DVC (tests marked slow)
VENV ?= .venv
CORES ?= 2
PYTHON ?= python3
CONFIG ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test test-e2e env lint benchmark ablation clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

run: env
	snakemake --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG))
	@echo "Reports: reports/*/report.html  (browse runs: mlflow ui --backend-store-uri sqlite:///mlflow.db)"

test: env
	python -m pytest -m "not slow"

test-e2e: env
	python -m pytest -m slow

ablation: env
	snakemake --cores $(CORES) ablation

lint: env
	snakemake --lint

benchmark: env
	python benchmarks/run.py

clean:
	rm -rf data models results reports logs .snakemake .cache mlflow.db mlflow.db.lock mlartifacts
