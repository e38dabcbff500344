# Two commands: `make run` (the product on embedded defaults) and `make test` (the whole suite).
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# uvicorn's graceful timeout stays above the app's own (CHATBOT_SHUTDOWN_GRACE, from the
# environment or .env, default 10 s), so streams end with their terminal event instead of being cut.
GRACEFUL_TIMEOUT = $(BIN)/python -c "from chatbot.settings import CHATBOT; print(int(CHATBOT['SHUTDOWN_GRACE']) + 5)"

.PHONY: run test install install-dev lint format bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing runtime dependencies (llama-cpp-python compiles from source the first time: ~5 min)..."
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

.env:
	@echo "Creating .env with a fresh DJANGO_SECRET_KEY (edit it to configure the chatbot)."
	@printf '# Local configuration; see the table in README.md.\nDJANGO_SECRET_KEY=%s\n' \
		"$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > $@

run: install .env
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/uvicorn chatbot.asgi:application --host $(HOST) --port $(PORT) --lifespan on \
		--timeout-graceful-shutdown "$$($(GRACEFUL_TIMEOUT))"

test: install-dev
	scripts/ensure-chromium.sh
	scripts/ensure-node.sh
	$(BIN)/ruff check .
	node --import ./tests/js/register-importmap.mjs --test tests/js/
	$(BIN)/python -m pytest
	scripts/test-backends.sh

lint: install-dev
	$(BIN)/ruff check .

format: install-dev
	$(BIN)/ruff format .

bench: install-dev
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) staticfiles test-artifacts
