# The commands a fresh machine needs (see README.md):
#   make quickstart   set up .venv, then train and evaluate DenseCLIP on the generated dataset (CPU)
#   make quickstart-semseg   the same for semantic segmentation (Semantic FPN, mIoU)
#   make test         set up .venv, then run the test suite
#   make demo-app     the browser demo (demo/app.py, Gradio) on http://127.0.0.1:7860 with the quick-start
#                     models, on the CPU; trains the quick-start Mask R-CNN first when its weights are missing.
#                     APP_ARGS passes options, e.g. make demo-app APP_ARGS="--port 8080"
#   make test-browser the browser tests: demo/app.py's page in a headless Chromium (installs the demo and
#                     browser-test extras, and Chromium with apt-get when /usr/bin/chromium is missing)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
APP_ARGS ?=

.PHONY: setup quickstart quickstart-semseg test demo-app test-browser

setup:
	@VENV="$(VENV)" bash scripts/setup_env.sh

quickstart: setup
	$(PYTHON) tools/quickstart.py

quickstart-semseg: setup
	$(PYTHON) tools/quickstart.py --task semseg

test: setup
	$(PYTHON) -m pytest

demo-app:
	@VENV="$(VENV)" EXTRAS=demo bash scripts/setup_env.sh
	@if [ ! -f output/quickstart/model_final.pth ]; then \
	  echo "[demo-app] no output/quickstart/model_final.pth yet: training the quick-start model first (make quickstart, about 6 minutes)"; \
	  $(PYTHON) tools/quickstart.py; \
	fi
	GRADIO_ANALYTICS_ENABLED=False $(PYTHON) demo/app.py --device cpu $(APP_ARGS)

test-browser:
	@VENV="$(VENV)" EXTRAS=demo,browser-test bash scripts/setup_env.sh
	@bash scripts/install_chromium.sh
	$(PYTHON) -m pytest tests/test_app.py tests/test_app_browser.py
