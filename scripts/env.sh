# Sourced by scripts/repro.sh and scripts/test.sh: create the virtualenv and install the suite if needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${DEME_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (Python: $(python3 --version 2>&1))"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.deme-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing the suite and its pinned dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export MLFLOW_DISABLE_TELEMETRY=true
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
