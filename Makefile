# dccsign developer entry points. `make serve`, `make demo` and `make test` work on a fresh Debian/Ubuntu
# machine with Python 3.11: missing system packages are installed when running as root, and
# named in an error otherwise.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DCCSIGN := $(VENV)/bin/dccsign
DEV_KEYSTORE := var/dev-keystore

# Debian packages: C toolchain and headers for the native core (OpenSSL, zlib for inflate,
# libdeflate for deflate), venv support, and for the tests the independent checkers: Node.js
# (a second HC1 verifier) and zbar (a QR decoder); SoftHSM2 is the PKCS#11 token of the tests.
SYSTEM_PACKAGES := build-essential libssl-dev zlib1g-dev libdeflate-dev python3-dev python3-venv nodejs npm zbar-tools softhsm2
SYSTEM_PROBE := scripts/check-system.sh
# The scale-out cluster's programs (`make cluster`, tests/test_cluster.py): Redis holds the
# quotas and idempotency records the engines share, HAProxy balances over them. `make test`
# installs them when it runs as root (CI) and otherwise leaves them optional (the cluster
# tests then skip, naming them); `make serve` never needs them.
CLUSTER_PACKAGES := redis-server haproxy

.PHONY: all system venv build demo serve cluster cluster-test test test-native test-python lint bench clean distclean

all: build

system:
	@sh $(SYSTEM_PROBE) $(SYSTEM_PACKAGES)

$(VENV)/.installed: pyproject.toml setup.py
	@sh $(SYSTEM_PROBE) $(SYSTEM_PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q 'Cython>=3.0'
	$(PIP) install -q --no-build-isolation -e '.[test,bench]'
	@touch $@

venv: $(VENV)/.installed

# Rebuilds the extension in place whenever a native source changed.
build: venv
	$(PY) setup.py -q build_ext --inplace
	@$(PY) -c "from dccsign import native; print('dccsign native core:', native.IMPLEMENTATION)"

demo: build
	@sh scripts/demo.sh $(DCCSIGN) $(DEV_KEYSTORE) var/demo

# The embedded default: development keystore, TLS material and policy (created when missing),
# Unix socket var/dccsign.sock, TLS on 127.0.0.1:8443, metrics on 127.0.0.1:9464.
serve: build
	@echo "in a second terminal: .venv/bin/python -m dccsign.testing.samples > samples.jsonl &&"
	@echo "  .venv/bin/dccsign sign --server unix:var/dccsign.sock samples.jsonl"
	$(DCCSIGN) serve --dev --keystore $(DEV_KEYSTORE) --unix var/dccsign.sock \
		--tcp 127.0.0.1:8443 --http 127.0.0.1:9464

# Redis, two engines (own keystore copies, keyd and audit logs) and HAProxy on 127.0.0.1 with
# deploy/haproxy.cfg, state and logs in var/cluster; prints how to sign through it. Ctrl-C stops.
cluster: build
	@sh $(SYSTEM_PROBE) $(CLUSTER_PACKAGES)
	$(PY) -m dccsign.testing.cluster --dir var/cluster

cluster-test: build
	@sh $(SYSTEM_PROBE) $(CLUSTER_PACKAGES)
	$(PY) -m pytest -q tests/test_cluster.py

tests/interop/node_modules/.package-lock.json: tests/interop/package-lock.json
	npm ci --prefix tests/interop --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error

test: build tests/interop/node_modules/.package-lock.json
	@sh $(SYSTEM_PROBE) --optional $(CLUSTER_PACKAGES)
	$(PY) -m pytest -q
	DCCSIGN_PUREPYTHON=1 $(PY) -m pytest -q -m "not slow"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: build
	$(PY) -m pytest bench/ -q --benchmark-only --benchmark-columns=mean,median,ops

clean:
	rm -rf build native/_native.c native/*.so .pytest_cache .hypothesis .benchmarks
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) var tests/interop/node_modules *.egg-info
