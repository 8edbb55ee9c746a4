# Two entry points for a fresh machine (see README.md):
#   make serve   set up .venv and run the server on the embedded models
#   make test    set up .venv and run lint, type checks and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; pyproject keeps a range so any matching build works.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The two ends of the supported protobuf range (pyproject.toml): .venv holds the oldest (with
# tritonclient, which needs protobuf < 7); the wire and client tests run again with the newest
# release of the top major laid over it, from $(PROTOBUF_HIGH_DIR).
PROTOBUF_LOW ?= 6.33.5
PROTOBUF_HIGH ?= protobuf>=7.35.1,<8
PROTOBUF_HIGH_DIR := $(VENV)/protobuf-high

.PHONY: serve test lint typecheck unit setup clean bench image

# The tests' oracle (the reference package, pinned) goes in without its dependencies: see the file.
ORACLE := tests/oracle-requirements.txt

$(STAMP): pyproject.toml $(ORACLE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_PIN)"
	$(BIN)/pip install -e ".[server,dev,loadtest]" "$(TORCH_PIN)" "protobuf==$(PROTOBUF_LOW)"
	$(BIN)/pip install --no-deps -r $(ORACLE)
	touch $(STAMP)

$(PROTOBUF_HIGH_DIR)/.installed: $(STAMP)
	rm -rf $(PROTOBUF_HIGH_DIR)
	$(BIN)/pip install --no-deps --target $(PROTOBUF_HIGH_DIR) "$(PROTOBUF_HIGH)" \
		"grpcio-health-checking>=1.84" "grpcio-reflection>=1.84"
	touch $@

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/kernelgen serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/gen_sync_client.py --check
	$(BIN)/python scripts/render_envoy.py --check
	$(BIN)/mypy

test: lint $(PROTOBUF_HIGH_DIR)/.installed
	KERNELGEN_EXPECT_PROTOBUF=$(PROTOBUF_LOW) $(BIN)/pytest --junitxml=reports/junit.xml $(PYTEST_ARGS)
	PYTHONPATH=$(PROTOBUF_HIGH_DIR) KERNELGEN_EXPECT_PROTOBUF=7. $(BIN)/pytest -p no:cacheprovider \
		--junitxml=reports/junit-protobuf-high.xml tests/wire tests/client

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
