# snpemu: `make up` starts the virtual host; `make test` runs every test.
# Both install what is missing first (a .venv, and Debian's prometheus when apt-get can).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-compose-test install-mutation up test test-unit test-cluster test-compose lint mutate bench lab protos protos-check clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(STAMP)

up: $(STAMP)
	$(PY) -m snpemu.launcher up

# every test, the compose test included (it runs podman as root)
test: $(STAMP) install-compose-test
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m "not cluster and not compose"

test-cluster: $(STAMP)
	$(PY) -m pytest -m cluster

# docker-compose.yml brought up under podman, driven from the host, brought down (root)
test-compose: $(STAMP) install-compose-test
	$(PY) -m pytest -m compose

install-compose-test:
	bash scripts/install-compose-test.sh

lint: $(STAMP)
	$(PY) -m pytest -m style

# mutmut, at the version pyproject.toml's `mutation` extra pins (snpemu itself is not reinstalled)
install-mutation: $(STAMP)
	$(PY) -m pip install -q $$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["mutation"])')

# mutation testing of the cores against the unit tests, not part of `make test`
# (docs/testing.md: scores, survivors, duration); `make mutate CORES="abi kvm" JOBS=2`
CORES ?=
JOBS ?= 1
mutate: install-mutation
	nice $(PY) scripts/mutate.py -j $(JOBS) $(CORES)

bench: $(STAMP)
	$(PY) bench/rmp_bench.py
	$(PY) bench/psp_bench.py
	$(PY) bench/kvm_bench.py
	$(PY) bench/guest_bench.py

# every lab scenario under every violation policy, each on a fresh virtual host (about 5 min);
# the table, docs/lab/results.json, docs/lab/results.png and docs/lab-results.md
lab: $(STAMP)
	$(PY) -m snpemu.lab --out docs/lab --doc docs/lab-results.md

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf .snpemu .pytest_cache .mypy_cache .ruff_cache
