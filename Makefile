# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   creates .venv if needed, installs advgen, runs the demo pipeline
#   make test   creates .venv if needed, installs advgen, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION_DEB := /usr/share/datasets/fashion-mnist

.PHONY: install demo test fashion-mnist bench clean-demo profiles

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
# torchattacks, the reference the attack tests compare against: --no-deps, as it pins requests~=2.25
# (which DVC's own dependencies outgrew); it needs nothing else that is not installed already.
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	@touch $(STAMP)

install: $(STAMP)

# Debian ships Fashion-MNIST; install it when we can (root), else say how.
fashion-mnist:
	@if [ ! -d $(FASHION_DEB) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST not found in $(FASHION_DEB). Either 'sudo apt-get install dataset-fashion-mnist'," \
	         "or put the four original .gz files in demo/data/fashion_mnist/raw/ (or set ADVGEN_MIRROR);" \
	         "with internet access advgen downloads them itself."; \
	  fi; \
	fi

# Profiles (demo/ and the others) are DVC projects of their own; their dvc.yaml is generated from the
# root dvc.yaml by `advgen profile`. Run this after editing dvc.yaml; a test fails while one is stale.
PROFILES := demo smoke $(sort $(dir $(wildcard studies/*/*/params.yaml)))

profiles: install
	$(BIN)/advgen profile $(PROFILES)

# The demo: demo/dvc.yaml (generated from dvc.yaml) on demo/params.yaml.
demo: install fashion-mnist
	cd demo && PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	cd demo && PATH="$(CURDIR)/$(BIN):$$PATH" dvc metrics show -R metrics/fashion_mnist/*/train.json
	@echo "report: demo/reports/README.md (figures in demo/reports/figures/); plots: cd demo && dvc plots show"

test: install fashion-mnist
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/train_speed.py

clean-demo:
	rm -rf demo/data demo/metrics demo/dvc.lock
