# ComfyHub. The two commands that matter: `make run` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= var

# Debian packages each command needs. As root they are installed with apt; otherwise we say which are missing.
RUN_PACKAGES := redis-server nginx
TEST_PACKAGES := redis-server nginx caddy docker.io chromium debootstrap b3sum openssl postgresql

.PHONY: help run test bench check-python venv venv-dev run-packages test-packages clean

help:
	@echo "make run    set up and run ComfyHub (SQLite and a local Redis under $(DATA_DIR)/)"
	@echo "make test   set up and run the whole test suite (real Redis, Docker, Chromium, PostgreSQL)"
	@echo "make bench  run the benchmarks in bench/"

# apt-get install what is missing (as root) or name it (as a normal user). A shell fragment: use it in a recipe.
ensure_packages = missing=""; \
	for pkg in $(1); do \
	  dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	      || { echo "apt-get could not install:$$missing"; exit 1; }; \
	  else \
	    echo "Missing system packages:$$missing"; \
	    echo "Install them with: sudo apt-get install$$missing   (or run make as root)"; exit 1; \
	  fi; \
	fi

# redis-server unless REDIS_URL names another Redis; nginx unless COMFYHUB_NGINX=false.
run-packages:
	@packages=""; nginx_off=""; \
	  case "$$(echo "$${COMFYHUB_NGINX:-true}" | tr A-Z a-z)" in false|0|no|off) nginx_off=1;; esac; \
	  for pkg in $(RUN_PACKAGES); do \
	    if [ "$$pkg" = redis-server ] && [ -n "$$REDIS_URL" ]; then continue; fi; \
	    if [ "$$pkg" = nginx ] && [ -n "$$nginx_off" ]; then continue; fi; \
	    packages="$$packages $$pkg"; \
	  done; \
	  $(call ensure_packages,$$packages)

test-packages:
	@$(call ensure_packages,$(TEST_PACKAGES))

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || \
	  { echo "ComfyHub needs Python 3.10 or newer (Django 5.2); $(PYTHON) is $$($(PYTHON) --version 2>&1)."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else echo "Missing system package: python3-venv. Install it with: sudo apt-get install python3-venv"; exit 1; fi; }

$(VENV)/.runtime: requirements.txt | check-python
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

$(DATA_DIR)/secret_key:
	@mkdir -p $(DATA_DIR)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > $@

run: run-packages venv $(DATA_DIR)/secret_key
	@if [ -z "$$SECRET_KEY" ]; then export SECRET_KEY_FILE="$${SECRET_KEY_FILE:-$(DATA_DIR)/secret_key}"; fi; \
	  exec $(PY) manage.py serve

# The whole suite on SQLite and, beside it, its database-sensitive part (POSTGRES_PART in tests/testenv.py) on a
# private PostgreSQL the tests start: two sessions at once, as the suite mostly waits on containers and workers (each
# has its own Redis, database, container names and port range). The PostgreSQL part's report follows the SQLite one;
# either failing fails the target. TEST_SERIAL=1 runs them one after the other. With DATABASE_URL=postgres://... all
# of the suite runs once, on that server.
test: test-packages venv-dev
	@if [[ "$$DATABASE_URL" =~ ^(postgres|postgresql|pgsql):// ]]; then \
	  echo "+ pytest (all of it on the PostgreSQL server DATABASE_URL names)"; exec $(PY) -m pytest; \
	fi; \
	status=0; pg_log=$$(mktemp -t comfyhub-test-postgres.XXXXXX); \
	pg_part() { COMFYHUB_TEST_DATABASE=postgres $(PY) -m pytest -m postgres -p no:cacheprovider; }; \
	if [ -n "$$TEST_SERIAL" ]; then \
	  echo "+ pytest (SQLite)"; $(PY) -m pytest || status=$$?; \
	  echo "+ pytest -m postgres (the database-sensitive part, on a private PostgreSQL)"; pg_part || status=$$?; \
	  exit $$status; \
	fi; \
	echo "+ pytest -m postgres (the database-sensitive part, on a private PostgreSQL; started beside the SQLite run)"; \
	pg_part > "$$pg_log" 2>&1 & pg_pid=$$!; \
	echo "+ pytest (SQLite)"; $(PY) -m pytest || status=$$?; \
	wait $$pg_pid || status=$$?; \
	echo "+ pytest -m postgres (its report)"; cat "$$pg_log"; rm -f "$$pg_log"; \
	exit $$status

bench: test-packages venv-dev
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
