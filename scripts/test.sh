#!/usr/bin/env bash
# The test suite: install if needed, then pytest (unit, component and the micro `dvc repro` pipeline).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest --durations=10 "$@"  # the ten slowest tests are listed at the end
