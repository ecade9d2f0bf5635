# The two commands of the README.  Each creates .venv when missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test bench clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) experiments/quickstart.py --force

test: $(VENV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(VENV_STAMP)
	$(PY) experiments/bench_merge_core.py --params 500e6

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
