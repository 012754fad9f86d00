"""Benchmark: wall time of every stage of the pipeline, forced, in pipeline order, and the total.
Target for the tiny profile on 2 CPU cores: the whole pipeline under 15 minutes.

    python bench/stage_times.py            # the profile in params.yaml, in this repository (forces reruns)
    python bench/stage_times.py --dry      # only list the stages
"""
import argparse
import json
import subprocess
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
