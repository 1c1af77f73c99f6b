#!/usr/bin/env bash
# The README's test command: sets up .venv, then runs every test; extra
# arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Two workers (pytest-xdist), a test file at a time on one of them (its module
# fixtures built once): much of the suite waits on processes starting, so
# this takes ~21 minutes on 2 cores instead of ~25.
# schemathesis gives every operation's test the same id, which xdist collapses
# into one: that file runs on its own, in this process.
schema=tests/server/test_schema.py
status=0
.venv/bin/python -m pytest -n 2 --dist loadfile --ignore "$schema" "$@" || status=$?
.venv/bin/python -m pytest "$schema" "$@" || status=$((status ? status : $?))
exit "$status"
