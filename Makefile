# Two commands are all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WEIGHTS_VGG16 ?= imagenet
WEIGHTS_INCEPTION ?= imagenet
DEMO_DIR ?= demo

.PHONY: demo test lint clean

$(BIN)/furnitype: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,ray,int8,serve]"
	touch $@

test: $(BIN)/furnitype
	$(BIN)/ruff check furnitype tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

demo: $(BIN)/furnitype
	$(BIN)/python -m furnitype.demo $(DEMO_DIR) --weights-vgg16 "$(WEIGHTS_VGG16)" --weights-inception "$(WEIGHTS_INCEPTION)"

lint: $(BIN)/furnitype
	$(BIN)/ruff check furnitype tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
