# Two commands on a fresh Debian box with Python 3.11 and root:
#   make run    the dev server (throwaway SoftHSM token + SQLite, initialised 3-of-5, unsealed)
#   make test   lint, types and the whole test suite against real SoftHSM, PostgreSQL, OpenBao
# Each installs what it needs: Debian packages if missing, then a virtual environment.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: run test lint typecheck pytest bench system-deps bench-deps clean

run: $(VENV)/.installed
	$(BIN)/ekms server -dev

test: $(VENV)/.installed lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest -q

bench: $(VENV)/.installed bench-deps
	$(BIN)/python bench/run.py

system-deps:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(APT) update -qq && $(APT) install -y -qq $$missing; \
	fi

bench-deps:
	@command -v wrk >/dev/null || { $(APT) update -qq && $(APT) install -y -qq wrk; }

$(VENV)/.installed: pyproject.toml | system-deps
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
