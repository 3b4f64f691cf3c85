# make demo  - install everything (first time) and run the main job on the bundled demo corpus
# make test  - install everything (first time) and run the tests (about 15 minutes on 2 cores)
# make test-fast - the unit tests only (no Ray, about a minute): the edit-test loop
# make lint  - ruff (lint + format check), import-linter (the layers; only jobs.ray imports ray), mypy
# make docs  - the documentation site under site/ (mkdocs --strict; the config reference regenerated first)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs setup bench clean

demo: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/demo.yaml
	$(PY) -m jobs.search --config configs/demo.yaml --query "Which company beat revenue estimates?" --k 3

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(PY) -m retrieval_core.config.reference > docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

bench: $(STAMP)
	$(PY) bench/encode_vs_st.py
	$(PY) bench/eval_vs_st.py
	$(PY) bench/index_scale.py
	$(PY) bench/mine_vs_st.py

clean:
	rm -rf out
