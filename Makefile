# Quick start: `make demo`, `make test`. Everything runs on the CPU, offline after install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= a red apple

.PHONY: demo test clean

$(BIN)/flowflash: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the CPU wheel here; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[data,eval,serve,openvino,test]'
	touch $@

demo: $(BIN)/flowflash
	@mkdir -p outputs
	$(BIN)/flowflash generate "$(PROMPT)" -o outputs/demo.png

test: $(BIN)/flowflash
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
