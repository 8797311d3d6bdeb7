#!/bin/sh
# Flame graph of rtserve's conductor under workload A (keep-alive hello world):
# py-spy attaches to the running server (root/ptrace needed), writes
# docs/flamegraph-conductor.svg and prints per-thread and conductor self/inclusive time,
# first for all active samples, then for samples holding the GIL.
# Usage: bench/profile.sh [--duration SECONDS]
cd "$(dirname "$0")/.." || exit 1
exec .venv/bin/python bench/run.py --profile "$@"
