#!/usr/bin/env bash
# Create .venv and install rainsweep with its test extras. The CPU build of torch goes in first: with no torch
# installed, the bare requirement would resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
