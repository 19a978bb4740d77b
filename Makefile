# Two commands do all the set-up on a fresh Debian machine:
#   make demo   - the whole enrollment chain on the embedded lab
#   make test   - the test suite (what CI runs through .ci/run)
# Both install missing system packages (apt) and the virtualenv first.

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
APT_PKGS  := swtpm swtpm-tools scep libtss2-dev tpm2-tools pkg-config gcc python3-dev python3-venv
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench lint typecheck sysdeps venv clean

demo: $(STAMP)
	$(VENV)/bin/dmagent lab demo

test: $(STAMP)
	DMAGENT_REQUIRE_PARTS=1 $(PY) -m pytest -q -m "not bench" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q -s -m bench tests/bench $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

typecheck: lint

# System packages: only what is missing, only through apt, sudo when not root.
sysdeps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; }; \
	fi

$(STAMP): pyproject.toml | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tpm,lab,test,dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

venv: $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
