# One Makefile for setup, tests, demo and benchmarks. `make test` and `make demo` work on a
# fresh Debian machine as root: they install what they need first.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.stamp
APT_STAMP := .stamp-apt
APT_PACKAGES := iproute2 iputils-ping tshark tcpdump iperf3 procps python3-venv nftables \
	strongswan-charon strongswan-swanctl strongswan-pki libcharon-extra-plugins \
	libstrongswan-extra-plugins libstrongswan-standard-plugins postgresql
PROTO_SRC := $(shell find proto -name '*.proto')
PB_STAMP := services/pb/.stamp

.PHONY: setup proto lint typecheck unit netns test demo demo-dataplane bench clean help

help:
	@echo "make test   - install everything (apt, venv, generated code) and run all tests"
	@echo "make demo   - two sites: policy applied over REST, enforced by keymgr + two workers vs strongSwan"
	@echo "make demo-dataplane - two dataplane workers in two namespaces carrying ESP traffic"
	@echo "make bench  - benchmarks, written to docs/benchmarks.md"
	@echo "make proto  - regenerate services/pb from proto/"
	@echo "make lint   - ruff check + format check, mypy (core, policyd, policywatch, ctl)"

$(APT_STAMP):
	@if ! command -v tshark >/dev/null || ! command -v iperf3 >/dev/null \
	    || ! command -v tcpdump >/dev/null || ! command -v ping >/dev/null \
	    || ! command -v ip >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null \
	    || ! command -v nft >/dev/null || ! command -v pki >/dev/null \
	    || ! test -x /usr/lib/ipsec/charon || ! command -v swanctl >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(PB_STAMP): $(VENV_STAMP) $(PROTO_SRC) scripts/gen_proto.py
	$(PY) scripts/gen_proto.py
	@touch $@

proto: $(VENV_STAMP)
	$(PY) scripts/gen_proto.py
	@touch $(PB_STAMP)

setup: $(APT_STAMP) $(VENV_STAMP) $(PB_STAMP)

lint: setup
	$(PY) -m ruff check services tests scripts
	$(PY) -m ruff format --check services tests scripts
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -q -m "not netns" tests

netns: setup
	$(PY) -m pytest -q -m netns tests

test: setup lint
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m services.demo

demo-dataplane: setup
	$(PY) -m services.dataplane.demo

BENCH_APT := strongswan-charon strongswan-swanctl libcharon-extra-plugins \
	libstrongswan-extra-plugins libstrongswan-standard-plugins iperf3

bench: setup
	@test -x /usr/lib/ipsec/charon || (export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(BENCH_APT))
	BENCH_ONLY="$(BENCH_ONLY)" $(PY) scripts/bench.py

clean:
	rm -rf .venv services/pb $(APT_STAMP) .pytest_cache .mypy_cache .ruff_cache
