#!/usr/bin/env bash
# The GPU check of the engine, in one go (about 3-4 minutes on one GPU):
#   benchmarks/gpu_check.sh            # on a GPU machine
#   benchmarks/gpu_check.sh --smoke    # tiny, on the CPU: does the script still run?
# Prints the device, teach / predict / normalize rates beside the bare model rates and the
# fraction of the bf16 peak each reaches, then runs tests/test_gpu.py. Extra arguments go to
# benchmarks/gpu_check.py (see its --help). Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" benchmarks/gpu_check.py "$@"

echo
echo "tests/test_gpu.py:"
# Without CUDA every test there skips itself; that is the expected outcome of --smoke.
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
