#!/usr/bin/env bash
# Install what the tests need on a fresh Debian machine (idempotently), then run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-host.sh  # first: it installs python3's pip and venv where they are missing
# a test host's own python3 (Debian's refuses pip outside a venv, PEP 668): the tests need these in it
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
python3 -m ruff check remowt tests benchmarks
python3 -m mypy
python3 -m pytest "$@"
