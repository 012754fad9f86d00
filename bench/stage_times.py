"""Benchmark: wall time of every stage of the pipeline, forced, in pipeline order, and the total.
Target for the tiny profile on 2 CPU cores: the whole pipeline under 15 minutes.

    python bench/stage_times.py            # the profile in params.yaml, in this repository (forces reruns)
    python bench/stage_times.py --dry      # only list the stages
    python bench/stage_times.py --from-mlflow   # no rerun: durations of the latest MLflow run of each stage
                                                # (stage body only; each stage also pays ~5 s of imports)
"""
import argparse
import json
import subprocess
from pathlib import Path
import sys
import time


def stages() -> list[str]:
    # `dvc stage list` prints stages in dvc.yaml order, which is a topological order for this pipeline
    lst = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], capture_output=True,
                         text=True, check=True)
    return [s.strip() for s in lst.stdout.splitlines() if s.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--json", help="also write the timings to this JSON file")
    ap.add_argument("--from-mlflow", action="store_true", help="read the latest run of each stage, run nothing")
    args = ap.parse_args()
    if args.from_mlflow:
        return from_mlflow()
    names = stages()
    if args.dry:
        print("\n".join(names))
        return
    times = {}
    for name in names:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", name], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times[name] = time.perf_counter() - t0
        print(f"{name:28s} {times[name]:8.1f} s", flush=True)
    total = sum(times.values())
    print(f"{'TOTAL':28s} {total:8.1f} s  ({total / 60:.1f} min; target for tiny on 2 cores: < 15 min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": times, "total_s": total}, f, indent=2)


def from_mlflow() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlflow

    from deme.config import load_config
    from deme.tracking import tracking_uri

    profile = load_config().profile
    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name(profile)
    if exp is None:
        sys.exit(f"no MLflow experiment {profile!r} at {tracking_uri()}: run the pipeline first")
    latest = {}
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=5000):
        latest.setdefault(run.info.run_name, run)
    total = 0.0
    for name, run in sorted(latest.items(), key=lambda kv: kv[1].info.start_time):
        secs = (run.info.end_time - run.info.start_time) / 1000
        total += secs
        print(f"{name:28s} {secs:8.1f} s")
    print(f"{'TOTAL (stage bodies)':28s} {total:8.1f} s  ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
