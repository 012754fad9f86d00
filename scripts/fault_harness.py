"""Fault harness: SIGKILL long stages at a random point, rerun them, and check nothing was lost.

Run it in a DVC repository whose pipeline is already reproduced (the uninterrupted run: its dvc.lock holds
the hashes every rerun must give again). For each stage named on the command line:

  1. Deletes the stage's outputs (as before a first run) and runs `dvc repro -f -s STAGE` (forced: with its
     dependencies unchanged, DVC would restore the outputs from its cache instead) in its own process group, with
     DEME_RESUME_LOG (one line per saved checkpoint or finished piece, deme/resume.py) and
     DEME_RESUME_THROTTLE_S (a pause after each save, so a stage of a few seconds can be caught mid-way).
     After k saved pieces (k drawn from 1..K, K given per stage as STAGE:K) and a random delay, the whole
     group (dvc and the stage process) gets SIGKILL.
  2. Checks the wreck: every output file is absent or complete (equal to the uninterrupted run's: stages
     write by atomic rename), and MLflow shows the killed run as RUNNING (nobody could close it).
  3. Reruns the same command: the stage must say "[resume]", its outputs' hashes in dvc.lock must equal
     the uninterrupted run's bit for bit, except that in JSON/CSV outputs the wall-clock fields (keys or
     columns named `..._s` or `..._s_...`: wall_s, images_per_s_merged_5, ...) may differ, as they do between any two runs; no
     temporary file of the killed run may be left beside the outputs, and
     MLflow must show the killed run KILLED, linked (tags deme.resumed_by / deme.resumed_from) to the
     resumed run, which is FINISHED.

  With --changes (e.g. settings,code,threads,input), before step 3 the killed state is tried with each kind
  of change to what shapes the stage's result, one at a time, and must not be resumed: the stage must print
  why it starts over ("[resume] ... made with other settings or inputs | other code | N CPU threads ...;
  starting over") and is stopped once it has. Each try runs on a copy of the killed run's .ckpt/ (put back
  afterwards, with the change undone) and logs to a scratch MLflow store, so step 3 still resumes the killed
  run. The kinds: `settings` (seed + 1, or --settings STAGE=KEY=VALUE for a stage that reads no seed),
  `code` (a comment appended to deme/resume.py, which every resumable stage imports), `threads`
  (runtime.num_threads 1 -> 2) and `input` (the last byte of the first .safetensors or .npy file among the
  stage's data and model deps, or --inputs STAGE=PATH, flipped: a valid file with other contents).

Prints one JSON object per stage and a summary; exits 1 if any stage fails a check.

    python scripts/fault_harness.py evaluate@ensemble:3 merge:2 analyze@landscape:5 --seed 0
    python scripts/fault_harness.py sweeps/dvc.yaml:sweep@n2_p000:2
    python scripts/fault_harness.py finetune@1 fid_ref:8 --changes settings,code,threads,input \
        --settings fid_ref=fid.reference_samples=200
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml


def lock_entry(stage: str) -> tuple[dict, Path]:
    """A stage's dvc.lock entry (``file.yaml:name`` or a root dvc.yaml name) and the folder its paths are
    relative to (the stage's wdir)."""
    dvcfile, name = stage.rsplit(":", 1) if ":" in stage else ("dvc.yaml", stage)
    lock = Path(dvcfile).with_name("dvc.lock")
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(name)
    if entry is None:
        raise SystemExit(f"{lock}: no entry for stage {name!r}; reproduce it once before the fault test")
    spec = (yaml.safe_load(Path(dvcfile).read_text()) or {}).get("stages", {}).get(name.split("@")[0], {})
    return entry, Path(dvcfile).parent / (spec.get("do") or spec).get("wdir", ".")


def lock_outs(stage: str) -> dict[str, str]:
    """{path: md5} of a stage's outputs in its dvc.lock."""
    entry, base = lock_entry(stage)
    return {os.path.normpath(base / o["path"]): o.get("md5", "") for o in entry.get("outs", [])}


CODE_CHANGE = Path("deme/resume.py")  # imported by every resumable stage (its records' code digest)
DECIDED = re.compile(r"\[resume\] (.*(starting over|training again).*)")
RESUMED = re.compile(r"\[resume\] .*(resuming at step|reused from)")


def _set_param(doc: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        doc = doc.setdefault(k, {})
    doc[keys[-1]] = value


def apply_change(kind: str, stage: str, settings: dict[str, str],
                 inputs: dict[str, str] | None = None) -> tuple[str, Callable[[], None]]:
    """Make one kind of change for ``stage``; (what was changed, a function that undoes it)."""
    entry, base = lock_entry(stage)
    params = Path("params.yaml")
    text = params.read_text()
    t2i = "t2i." if stage.split("@")[0].startswith("t2i_") else ""
    if kind in ("settings", "threads"):
        doc = yaml.safe_load(text)
        if kind == "threads":
            key, value = f"{t2i}runtime.num_threads", 2
        elif stage in settings:
            key, value = settings[stage].split("=", 1)
            value = yaml.safe_load(value)
        else:
            read = {k for f in (entry.get("params") or {}).values() for k in f}
            key = f"{t2i}seed"
            if not read - {k for k in read if k.startswith(f"{t2i}runtime.")}:
                return "", lambda: None  # no setting shapes its result (e.g. t2i_latents)
            if key not in read:
                raise SystemExit(f"{stage} reads no {key}: give --settings {stage}=KEY=VALUE")
            flat = doc.get("t2i", {}) if t2i else doc
            value = int(flat.get("seed", 0)) + 1
        _set_param(doc, key, value)
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        return f"{key}={value}", lambda: params.write_text(text)
    if kind == "code":
        old = CODE_CHANGE.read_text()
        CODE_CHANGE.write_text(old + "\n# fault harness: a code change\n")
        return f"{CODE_CHANGE} edited", lambda: CODE_CHANGE.write_text(old)
    if kind == "input":
        code = ("deme/", "stages/", "metrics/params.ok", "checkpoints")
        deps = [os.path.normpath(base / d["path"]) for d in entry.get("deps", [])]
        for path in [inputs[stage]] if inputs and stage in inputs else deps:
            if path.startswith(code):
                continue
            files = [Path(path)] if Path(path).is_file() else sorted(Path(path).rglob("*"),
                                                                    key=lambda f: (f.stem != "train", str(f)))
            target = next((f for f in files if f.suffix in (".safetensors", ".npy") and f.is_file()), None)
            if target is None:
                continue
            old = target.read_bytes()
            tmp = target.with_name(f".{target.name}.harness")  # a new file: never write through a cache link
            tmp.write_bytes(old[:-1] + bytes([old[-1] ^ 1]))
            tmp.replace(target)

            def undo(target=target, old=old):
                tmp.write_bytes(old)
                tmp.replace(target)
            return f"last byte of {target} flipped", undo
        raise SystemExit(f"{stage}: no .safetensors or .npy file among its data and model deps")
    raise SystemExit(f"unknown change {kind!r}; allowed: settings, code, threads, input")


def try_change(stage: str, kind: str, settings: dict[str, str], inputs: dict[str, str], env: dict,
               timeout: float) -> dict:
    """Run the stage with one change on a copy of the killed state; it must say why it starts over."""
    what, undo = apply_change(kind, stage, settings, inputs)
    if not what:
        return {"change": kind, "ok": True, "skipped": "no setting but runtime.* shapes this stage's result"}
    ckpt, saved = Path(".ckpt"), Path(".dvc/tmp/fault_harness/ckpt-saved")
    shutil.rmtree(saved, ignore_errors=True)
    if ckpt.exists():
        shutil.copytree(ckpt, saved, symlinks=True)
    scratch = Path(".dvc/tmp/fault_harness/changes.db").resolve()
    cenv = {**env, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}"}
    cenv.pop("DEME_RESUME_THROTTLE_S", None)
    res = {"change": kind, "what": what, "started_over": False, "resumed": False, "why": ""}
    t0 = time.time()
    entry, base = lock_entry(stage)  # the stage's command itself: DVC's bookkeeping would only add seconds
    proc = subprocess.Popen(entry["cmd"], shell=True, cwd=base, env=cenv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail = []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            if RESUMED.search(line) and "MLflow" not in line:
                res["resumed"] = True
                break
            m = DECIDED.search(line)
            if m:
                res["started_over"], res["why"] = True, m.group(1).strip()[:300]
                break
            if time.time() - t0 > timeout:
                break
    finally:
        kill_group(proc)
        undo()
        shutil.rmtree(ckpt, ignore_errors=True)
        if saved.exists():
            shutil.copytree(saved, ckpt, symlinks=True)
            shutil.rmtree(saved, ignore_errors=True)
    res["ok"] = res["started_over"] and not res["resumed"]
    if not res["ok"]:
        res["tail"] = "".join(tail)[-1500:]
    res["s"] = round(time.time() - t0, 1)
    return res


def mlflow_runs(workdir: str) -> list:
    import mlflow

    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=5000) if exps else []
    return [r for r in runs if r.data.tags.get("workdir") == workdir]


def temp_leftovers(paths: list[str]) -> list[str]:
    """Temporary siblings of the outputs (atomic writes that never finished), outside .ckpt/."""
    found = []
    for p in paths:
        parent = Path(p).parent
        if parent.exists():
            found += [str(f) for f in parent.iterdir() if f.name.startswith(f".{Path(p).name}.")]
    return found


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def fault_test(stage: str, pieces: int, rng: random.Random, throttle: float, timeout: float,
               log_dir: Path, changes: list[str] = (), settings: dict[str, str] | None = None,
               inputs: dict[str, str] | None = None) -> dict:
    expected = lock_outs(stage)
    workdir = str(Path.cwd().resolve())
    before = {r.info.run_id for r in mlflow_runs(workdir)}
    log = log_dir / f"{stage.replace('/', '_').replace(':', '_')}.events"
    log.unlink(missing_ok=True)
    k = rng.randint(1, max(1, pieces))
    delay = rng.uniform(0, throttle)
    env = {**os.environ, "DEME_RESUME_LOG": str(log), "DEME_RESUME_THROTTLE_S": str(throttle)}
    result = {"stage": stage, "kill_after_pieces": k, "kill_delay_s": round(delay, 3), "ok": False}
    for out in expected:  # the state before a first run: no outputs
        shutil.rmtree(out) if Path(out).is_dir() else Path(out).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dvc", "repro", "-f", "-s", stage]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while time.time() - t0 < timeout and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= k:
            time.sleep(delay)
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        out = proc.stdout.read()
        result["error"] = (f"the stage ended (rc {proc.returncode}) before {k} saved pieces; lower K or raise "
                           f"the throttle. Output tail: {out[-1500:]}")
        return result
    kill_group(proc)
    result["killed_at_s"] = round(time.time() - t0, 2)
    result["pieces_saved_before_kill"] = len(log.read_text().splitlines())
    half = [p for p in expected if Path(p).is_file() and not _complete(p, expected[p])]
    result["half_written_outputs"] = half
    result["temp_after_kill"] = len(temp_leftovers(list(expected)))
    running = [r for r in mlflow_runs(workdir) if r.info.run_id not in before and r.info.status == "RUNNING"]
    result["killed_runs_running"] = len(running)

    env.pop("DEME_RESUME_THROTTLE_S")
    result["changes"] = [try_change(stage, kind, settings or {}, inputs or {}, env, timeout) for kind in changes]
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    result["temp_leftovers"] = temp_leftovers(list(expected))
    result["rerun_rc"] = rerun.returncode
    text = rerun.stdout + rerun.stderr
    result["resumed"] = "[resume]" in text
    got = lock_outs(stage)
    result["outputs"] = len(expected)
    differs = sorted(p for p in set(got) | set(expected) if got.get(p) != expected.get(p))
    result["outputs_bitwise_equal"] = len(expected) - len(differs)
    result["equal_but_timing"] = [p for p in differs if _equal_but_timing(p, expected.get(p, ""))]
    result["differs"] = [p for p in differs if p not in result["equal_but_timing"]]
    result["outputs_equal"] = not result["differs"]
    import mlflow

    client = mlflow.MlflowClient()
    links = []
    for r in running:
        old = client.get_run(r.info.run_id)
        new_id = old.data.tags.get("deme.resumed_by", "")
        new = client.get_run(new_id) if new_id else None
        links.append({"killed_run": old.info.run_id, "status": old.info.status, "run_name": old.info.run_name,
                      "resumed_by": new_id, "resumed_status": new.info.status if new else None,
                      "back_link": bool(new and r.info.run_id in new.data.tags.get("deme.resumed_from", ""))})
    result["mlflow"] = links
    result["ok"] = (rerun.returncode == 0 and result["resumed"] and result["outputs_equal"] and not half
                    and all(c["ok"] for c in result["changes"])
                    and not result["temp_leftovers"] and len(running) == 1
                    and all(x["status"] == "KILLED" and x["resumed_status"] == "FINISHED" and x["back_link"]
                            for x in links))
    if not result["ok"] and rerun.returncode != 0:
        result["rerun_tail"] = text[-2000:]
    result["wall_s"] = round(time.time() - t0, 1)
    return result


TIMING = re.compile(r"_s($|_)")  # wall-clock fields: wall_s, images_per_s, wall_s_per_seed, images_per_s_merged_5


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not TIMING.search(str(k))}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _equal_but_timing(path: str, md5: str) -> bool:
    """A JSON or CSV output equal to the uninterrupted run's (read from the DVC cache) once its wall-clock
    fields are dropped; every other value must be identical."""
    import csv
    import io

    cached = Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]
    if not cached.exists() or not Path(path).exists() or Path(path).suffix not in (".json", ".csv"):
        return False
    old, new = cached.read_text(), Path(path).read_text()
    if Path(path).suffix == ".json":
        return _without_timing(json.loads(old)) == _without_timing(json.loads(new))
    return (_without_timing(list(csv.DictReader(io.StringIO(old))))
            == _without_timing(list(csv.DictReader(io.StringIO(new)))))


def _complete(path: str, md5: str) -> bool:
    """A file output left by the killed run is complete if it has the uninterrupted run's hash."""
    import hashlib

    if not md5 or md5.endswith(".dir"):
        return True
    return hashlib.md5(Path(path).read_bytes()).hexdigest() == md5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", help="STAGE or STAGE:K (kill after 1..K saved pieces; default K=1); "
                                              "sweeps/dvc.yaml:NAME for the sweep pipeline's stages")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill points")
    ap.add_argument("--throttle", type=float, default=0.5, help="seconds of pause after each saved piece")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per stage run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--changes", default="", help="comma-separated kinds of change the killed state must not be "
                                                  "resumed under: settings, code, threads, input")
    ap.add_argument("--settings", nargs="*", default=[], metavar="STAGE=KEY=VALUE",
                    help="the settings change for a stage that reads no seed")
    ap.add_argument("--inputs", nargs="*", default=[], metavar="STAGE=PATH",
                    help="the input file or folder whose first .safetensors/.npy file to change (default: the "
                         "first data or model dep that has one; train.npy first in a data folder)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    log_dir = Path(".dvc/tmp/fault_harness")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.stages:
        stage, _, k = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
        res = fault_test(stage, int(k), rng, args.throttle, args.timeout, log_dir,
                         [c for c in args.changes.split(",") if c], dict(x.split("=", 1) for x in args.settings),
                         dict(x.split("=", 1) for x in args.inputs))
        print(json.dumps(res), flush=True)
        results.append(res)
    summary = {"stages": len(results), "killed_and_resumed": sum(r["ok"] for r in results),
               "failed": [r["stage"] for r in results if not r["ok"]]}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
