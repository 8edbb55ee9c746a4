# Two entry points for a fresh machine (see README.md):
#   make serve   set up .venv and run the server on the embedded models
#   make test    set up .venv and run lint, type checks and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; pyproject keeps a range so any matching build works.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck unit setup clean bench image

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_PIN)"
	$(BIN)/pip install -e ".[server,dev,loadtest]" "$(TORCH_PIN)"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/kernelgen serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/gen_sync_client.py --check
	$(BIN)/mypy

test: lint
	$(BIN)/pytest --junitxml=reports/junit.xml $(PYTEST_ARGS)

# The CPU image, docker/Dockerfile.cpu, with podman (docker where its daemon answers): installs
# podman and makes a local base image where they are missing, rebuilds only when the inputs
# changed; IMAGE_ARGS passes options (python3 scripts/container_image.py build --help).
image:
	$(PYTHON) scripts/container_image.py build $(IMAGE_ARGS)

# The benchmark suite (several minutes); results and README in benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) reports
