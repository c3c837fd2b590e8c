# Two commands on a fresh machine: `make up` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto' | sort)
ARGS ?=

.PHONY: up test proto lint bench bench-generation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

## proto: generate the Python protobuf/gRPC modules beside the .proto files
proto: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos $(PROTOS)

## up: install into .venv and run the whole suite (embedded Redis) in the foreground
up: $(VENV)/.installed proto
	$(BIN)/maas up $(ARGS)

## lint: ruff and mypy (strict on services/)
lint: $(VENV)/.installed-dev proto
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## test: install with dev extras, lint, and run the whole test suite (3 processes, then the latency tests alone)
test: $(VENV)/.installed-dev proto lint
	@if command -v node >/dev/null && [ ! -d tests/node/node_modules ]; then \
		npm ci --prefix tests/node --no-audit --no-fund; fi
	$(BIN)/python -m pytest -n 3 --dist loadfile -m "not serial" $(ARGS)
	$(BIN)/python -m pytest -m serial $(ARGS) || [ $$? -eq 5 ]  # 5: ARGS selected no serial test

## bench: one table: raw ONNX Runtime, a bare Python gRPC floor, a worker direct, MaaS via the queue (ARGS="--short")
bench: $(VENV)/.installed-dev proto
	$(BIN)/python -m bench.throughput $(ARGS)

## bench-generation: streamed generation, MaaS against onnxruntime-genai direct, 1/4/16 streams (ARGS="--short")
bench-generation: $(VENV)/.installed-dev proto
	$(BIN)/python -m bench.generation $(ARGS)

clean:
	rm -rf $(VENV) .maas .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find protos -name '*_pb2*.py*' -delete
