# edgeledger: `make demo` runs the whole system on loopback, `make test` runs the suite.
# Both install what they need first (Debian packages, pinned npm tools, a Python venv).

VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
APT_PACKAGES = mosquitto redis-server

.PHONY: setup system-deps node-tools python-env demo test lint bench agent-binary clean config-doc

setup: system-deps node-tools python-env

system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

node-tools: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

python-env: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,build]'
	touch $@

demo: setup
	$(VENV)/bin/edge-coordinator demo

test: setup
	$(PY) -m pytest -q --durations=15

# Static checks (configured in pyproject.toml): ruff on the whole tree, mypy on the packages it lists,
# and the package layering ([tool.importlinter] contracts) with import-linter.
lint: python-env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/transport.py
	$(PY) bench/signing.py
	$(PY) bench/ledger.py
	$(PY) bench/agent.py
	$(PY) bench/e2e.py
	$(PY) bench/tlog.py

agent-binary: setup
	$(PY) packaging/build_agent.py

clean:
	rm -rf build dist var .pytest_cache

# docs/CONFIG.md is generated from the settings declarations (tests/security/test_settings.py checks it).
config-doc: python-env
	$(PY) -m security.settings_render agent.config coordinator.config ledger.audit_config > docs/CONFIG.md
