# factory: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := packer qemu-system-x86 qemu-utils mmdebstrap genisoimage cloud-image-utils \
	fdisk e2fsprogs shellcheck python3-venv python3-dev gcc make curl ca-certificates \
	vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base ruby \
	chromium-headless-shell openssh-client slurmctld slurmd slurm-client munge \
	podman runc skopeo umoci \
	$(shell cat tests/channel/apt-packages.txt 2>/dev/null)
DEMO := outputs/demo_hello_v1
# Test workers: the client profiles, the demo and the rest share the cores (tests/conftest.py).
TEST_WORKERS ?= 2
# The demo's signing key (profiles/demo.yaml, signing.key): outside the checkout, never committed.
DEMO_KEY := $(HOME)/.config/factory/keys/demo-delivery.key

.PHONY: demo test test-gpu test-hospital setup apt venv channel lint clean

## demo: set up the host, then take profiles/demo.yaml to a validated OVA in outputs/
demo: setup channel $(DEMO_KEY)
	$(VENV)/bin/factory doctor
	$(VENV)/bin/factory build profiles/demo.yaml --force
	$(VENV)/bin/factory validate $(DEMO)

## test: set up the host, then run every test (the end-to-end build included)
test: setup
	$(VENV)/bin/ruff check factory tests benchmarks
	$(VENV)/bin/pytest -ra --durations=30 -n $(TEST_WORKERS) --no-loadscope-reorder

## test-gpu: build and validate the GPU demo (driver 535 by DKMS; about 23 min under TCG once the GPU base layer is cached)
test-gpu: setup channel
	$(VENV)/bin/pytest -ra -m gpu_build tests/test_gpu.py

## test-hospital: build and validate profiles/hospital_lung_nodule_v1.yaml as written (GPU driver, PyTorch; about 40 min under TCG: build 24 min with its GPU base layer, validation 15 min)
test-hospital: setup channel
	$(VENV)/bin/pytest -ra -m hospital_build tests/test_client_profiles.py

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## channel: build (once, cached) the local conda channel the demo profile points at
channel: venv
	mkdir -p outputs/channels
	ln -sfn "$$($(PY) -m tests.channel)" outputs/channels/demo

## bench: measure the build into benchmarks/results.json (benchmarks/README.md; over 45 min on 2 cores under TCG, and both CPUs); a subset: make bench BENCH_ARGS="--only P3"
.PHONY: bench
bench: setup channel $(DEMO_KEY)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# The demo's signing key, made once (factory keygen never replaces a key).
$(DEMO_KEY): | venv
	$(VENV)/bin/factory keygen $@ --name "factory demo delivery team"

lint: venv
	$(VENV)/bin/ruff check factory tests benchmarks
	$(VENV)/bin/ruff format --check factory tests benchmarks

clean:
	rm -rf outputs
