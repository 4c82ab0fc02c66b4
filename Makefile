# The README's two commands: `make run` (main job) and `make test` (linter, then the whole test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: run test setup lint bench clean

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/pretrain prepare configs/tiny-cpu.yaml
	$(BIN)/pretrain train configs/tiny-cpu.yaml --resume auto

test: setup
	$(BIN)/ruff check pretrain tests benchmarks
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check pretrain tests benchmarks

clean:
	rm -rf runs data .pytest_cache
