"""Stage `validate`: check all of params.yaml before any other stage runs (deme/validation.py).

Every other stage depends on its output, metrics/params.ok, so `dvc repro` and `dvc exp run -S` stop here,
with one line naming the bad key, before DVC removes any stage's outputs; under `dvc exp run` the rejected
params.yaml is put back to the experiment's baseline. Logs no MLflow run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.validation import main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="stages/validate.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    raise SystemExit(main(ap.parse_args().params))
