# Each target sets up its own virtualenv; the only prerequisite is Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint mypy pytest bench clean install system-deps

# Debian packages the tests drive (tests never install anything themselves).
SYSTEM_PACKAGES := prometheus prometheus-alertmanager chromium systemd munge slurmctld slurmd slurm-client

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gpuwarden demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

mypy: $(STAMP)
	$(BIN)/mypy

# Most tests wait on servers and on scenario clocks, not on the CPU: spread them over workers
# (a module's tests stay together; see tests/conftest.py). PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 4
pytest: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --durations=20 $(PYTEST_ARGS)

# Installs the missing SYSTEM_PACKAGES with apt-get when run as root; elsewhere says what to install.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $$missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }; \
	else \
		echo "warning: missing Debian packages:$$missing (tests that need them fail): sudo apt-get install$$missing"; \
	fi

test: system-deps lint mypy pytest

# bench/node_exporter.py compares the agent with Debian's prometheus-node-exporter: installed here
# when missing and run as root (no test needs it, so it is not in SYSTEM_PACKAGES).
bench: $(STAMP)
	@command -v prometheus-node-exporter >/dev/null 2>&1 || command -v node_exporter >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing prometheus-node-exporter (for the node_exporter comparison)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus-node-exporter >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus-node-exporter >/dev/null; } || \
		echo "prometheus-node-exporter could not be installed: the node_exporter comparison is skipped"; \
	else echo "prometheus-node-exporter missing (apt-get install prometheus-node-exporter): its comparison is skipped"; fi
	@# bench/remediation.py drains nodes of a private Slurm (munge, slurmctld): installed when missing, as root
	@command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing munge slurmctld slurmd slurm-client (for the remediation benchmark)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge slurmctld slurmd slurm-client >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge slurmctld slurmd slurm-client >/dev/null; } || \
		echo "Slurm could not be installed: the remediation benchmark is skipped"; \
	else echo "Slurm missing (apt-get install munge slurmctld slurmd slurm-client): the remediation benchmark is skipped"; fi
	@# bench/peer_prometheus.py runs Debian's prometheus side by side with the collector: installed when missing, as root
	@command -v prometheus >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing prometheus (for the side-by-side comparison)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; } || \
		echo "prometheus could not be installed: the Prometheus comparison is skipped"; \
	else echo "prometheus missing (apt-get install prometheus): its comparison is skipped"; fi
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
