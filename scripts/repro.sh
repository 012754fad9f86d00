#!/usr/bin/env bash
# The main job: install if needed, then run the whole pipeline of the profile in params.yaml (default
# `tiny`) with DVC. Extra arguments go to `dvc repro` (e.g. `bash scripts/repro.sh report`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
dvc repro "$@"
echo
echo "Report: reports/$(python -c 'from deme.config import load_config; print(load_config().profile)')/report.md"
echo "MLflow: mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
