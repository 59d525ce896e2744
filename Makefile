# The commands a fresh machine needs (see README.md):
#   make quickstart   set up .venv, then train and evaluate DenseCLIP on the generated dataset (CPU)
#   make quickstart-semseg   the same for semantic segmentation (Semantic FPN, mIoU)
#   make test         set up .venv, then run the test suite
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup quickstart quickstart-semseg test

setup:
	@VENV="$(VENV)" bash scripts/setup_env.sh

quickstart: setup
	$(PYTHON) tools/quickstart.py

quickstart-semseg: setup
	$(PYTHON) tools/quickstart.py --task semseg

test: setup
	$(PYTHON) -m pytest
