#!/usr/bin/env python
"""Localhost scale-out check (issue 8): MLflow server + DVC experiment queue + DVC remote and a fresh clone.

Given a git repository whose pipeline is already reproduced (e.g. `dvc repro report` of the micro profile, the
outputs in the DVC cache), this script, on localhost only and with ports picked free at runtime:

 1. starts `mlflow server` (SQLite backend store, artifacts proxied by the server into a local directory),
    waits for its /health endpoint and exports MLFLOW_TRACKING_URI=http://127.0.0.1:<port> for every command
    after that (the queue workers inherit it from `dvc queue start`);
 2. adds a DVC remote (a local directory here; s3:// or gs:// for users) and a bare git remote, BEFORE
    queueing: an experiment commit carries its baseline's .dvc/config and `dvc exp push` reads the remote
    from there. Commits the reproduced state, queues one experiment per value of --param
    (`dvc exp run --queue -S <param>=<value> <target>`), runs them with `dvc queue start -j <jobs>`, polls
    `dvc queue status` until the queue is empty, and checks: every task succeeded; each experiment reran
    exactly --expect-stages (from `dvc queue logs`); the server holds exactly len(values) x len(--expect-runs)
    new MLflow runs, all FINISHED, each tagged dvc_exp with its experiment's name (the stages read
    DVC_EXP_NAME, which DVC sets for every queued run), one dvc_exp value per experiment, the --metric-stage
    runs have --metric, a run that logged --param logged the experiment's value, the --artifact-stage runs'
    artifacts reached the server's artifact directory; and that the experiments really ran --jobs at a time
    (overlapping first-start..last-end spans of their MLflow runs);
 3. `git push`, `dvc push --run-cache`, `dvc exp push` (the experiments' refs and data) and the outputs the
    run-cache entries name (see push_run_cache_outputs: DVC does not push their `cache: false` metrics),
    then clones the git remote into a fresh directory and there: `dvc pull --run-cache <target> --with-deps`;
    the dvc.lock outputs present (and their files) must equal the original's; `dvc repro <target>` must run
    no stage command and `dvc status` must be clean; finally `dvc exp run --pull -S <param>=<lowest value>`
    must restore --clone-cached from the run cache with the queued experiment's outputs (same md5s in
    dvc.lock) and rerun only --clone-reruns (stages DVC keeps no run cache for), one MLflow run each;
 4. stops the server, prints a JSON summary on stdout and exits 1 with a one-line reason on the first
    failed check (0 when all pass).

By default it works on a copy of the repository (under --tmp), so the original is left as it was; pass
--in-place to use the repository itself (it then gets a commit, experiments, a remote and a git remote).

Example (micro profile, whose `baselines.p2.gamma` reruns validate, finetune_baseline@p2, evaluate@p2 and report):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/scaleout_check.py /path/to/reproduced/repo
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

T0 = time.monotonic()


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[scaleout {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def require(cond: bool, reason: str) -> None:
    if not cond:
        raise CheckFailed(reason)


class Shell:
    """Runs commands with one environment, logging each to stderr and to <tmp>/commands.log."""

    def __init__(self, env: dict, logfile: Path):
        self.env, self.logfile = env, logfile

    def __call__(self, cmd: list[str], cwd: Path, *, check: bool = True, timeout: float = 900,
                 quiet: bool = False) -> subprocess.CompletedProcess:
        t = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        dt = time.monotonic() - t
        if not quiet:
            log(f"$ {' '.join(cmd)}  ({cwd.name}, {dt:.1f}s, rc={proc.returncode})")
        with self.logfile.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}   [cwd={cwd}, {dt:.1f}s, rc={proc.returncode}]\n{proc.stdout}{proc.stderr}")
        if check and proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise CheckFailed(f"`{' '.join(cmd)}` failed ({proc.returncode}): {' | '.join(tail)}")
        return proc

    def detached(self, cmd: list[str], cwd: Path, timeout: float = 300) -> None:
        """A command that spawns daemons (`dvc queue start`): output to the log file, not to pipes, which
        the daemons would inherit and hold open, so waiting for EOF would wait for the daemons to exit."""
        t = time.monotonic()
        with self.logfile.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}   [cwd={cwd}]\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=timeout).returncode
        log(f"$ {' '.join(cmd)}  ({cwd.name}, {time.monotonic() - t:.1f}s, rc={rc})")
        if rc != 0:
            raise CheckFailed(f"`{' '.join(cmd)}` failed ({rc}); see {self.logfile}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- MLflow server
class MlflowServer:
    def __init__(self, tmp: Path, env: dict, workers: int):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "server.db"
        self.artifacts = tmp / "artifacts"
        self.logpath = tmp / "mlflow_server.log"
        exe = shutil.which("mlflow", path=env["PATH"]) or "mlflow"
        # --artifacts-destination (with the default --serve-artifacts): new experiments get the artifact root
        # mlflow-artifacts:/ and clients upload through the server, which writes into the directory (or
        # s3://, gs://); clients need no storage credentials. --default-artifact-root <dir> instead makes each
        # client write straight into that location (fine on one machine, needs shared storage otherwise).
        self.cmd = [exe, "server", "--backend-store-uri", f"sqlite:///{self.db}",
                    "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", str(workers)]
        self.env, self.proc = env, None

    def start(self, timeout: float = 180) -> float:
        t = time.monotonic()
        log(f"$ {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logpath.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise CheckFailed(f"mlflow server exited ({self.proc.returncode}): "
                                  f"{self.logpath.read_text()[-300:]!r}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        dt = time.monotonic() - t
                        log(f"mlflow server answers on {self.uri}/health after {dt:.1f}s")
                        return dt
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise CheckFailed(f"mlflow server did not answer {self.uri}/health within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            log("mlflow server stopped")

    def _api(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def runs(self, experiment: str) -> list[dict]:
        """All runs of an experiment (REST API), flattened: name, status, start/end (ms), tags, metrics."""
        try:
            exp = self._api(f"experiments/get-by-name?experiment_name={experiment}")["experiment"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        out, token = [], None
        while True:
            body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self._api("runs/search", body)
            for r in page.get("runs", []):
                info, data = r["info"], r.get("data", {})
                out.append({"id": info["run_id"], "name": info.get("run_name", ""), "status": info["status"],
                            "start": int(info.get("start_time", 0)), "end": int(info.get("end_time", 0) or 0),
                            "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
                            "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
                            "params": {p["key"]: p["value"] for p in data.get("params", [])},
                            "experiment_id": exp["experiment_id"]})
            token = page.get("next_page_token")
            if not token:
                return out


# ---------------------------------------------------------------------------------------------- helpers
def overlap_stats(intervals: list[tuple[float, float]]) -> tuple[int, float]:
    """Max number of intervals active at once, and the seconds during which at least two were active."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    active = peak = 0
    both, last = 0.0, None
    for t, d in events:
        if last is not None and active >= 2:
            both += t - last
        active += d
        peak = max(peak, active)
        last = t
    return peak, both


def lock_outs(repo: Path) -> dict[str, dict]:
    """Every out of dvc.lock: path -> its lock entry (md5, size, nfiles) with the stage that writes it."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
    outs = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            outs[out["path"]] = {**out, "stage": stage}
    return outs


def count_outs(repo: Path, outs: dict[str, dict]) -> dict:
    present = files = 0
    for path in outs:
        p = repo / path
        if p.is_dir():
            present += 1
            files += sum(1 for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            present += 1
            files += 1
    return {"outs": len(outs), "present": present, "files": files}


def stage_outs_md5(lock: dict, stages: list[str]) -> dict[str, str]:
    out = {}
    for s in stages:
        for o in (lock.get("stages", {}).get(s, {}) or {}).get("outs") or []:
            out[o["path"]] = o.get("md5")
    return out


RUNNING = re.compile(r"^Running stage '([^']+)'", re.M)
CACHED = re.compile(r"Stage '([^']+)' is cached - skipping run", re.M)
UNCHANGED = re.compile(r"Stage '([^']+)' didn't change, skipping", re.M)


def queue_status(sh: Shell, repo: Path) -> tuple[dict[str, str], str]:
    """`dvc queue status`: {task: status} (the status is the last column) and the worker line."""
    out = sh(["dvc", "queue", "status"], repo, quiet=True).stdout
    tasks, workers = {}, ""
    for line in out.splitlines():
        if line.startswith("Worker status"):
            workers = line.strip()
        elif line.strip() and not line.startswith("Task") and not line.startswith("No experiment"):
            parts = line.split()
            tasks[parts[0]] = parts[-1]
    return tasks, workers


def experiments_of(show: list, baseline: str) -> dict[str, dict]:
    """`dvc exp show --json` (DVC 3): the experiments of one baseline commit: name -> {rev, params}."""
    exps = {}
    for base in show:
        if base.get("rev") != baseline:
            continue
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                exps[rev.get("name") or exp.get("name")] = {"rev": rev.get("rev"), "params": params,
                                                           "executor": rev.get("executor")}
    return exps


def dig(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def same_value(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


# ---------------------------------------------------------------------------------------------- the check
def run_check(args, summary: dict) -> None:
    tmp = Path(args.tmp).resolve() if args.tmp else Path(tempfile.mkdtemp(prefix="deme-scaleout-"))
    tmp.mkdir(parents=True, exist_ok=True)
    summary["tmp"] = str(tmp)
    src = Path(args.repo).resolve()
    require((src / ".git").exists() and (src / "dvc.yaml").exists(), f"{src} is not a git + DVC repository")
    if args.in_place:
        repo = src
    else:
        repo = tmp / "work"
        require(not repo.exists(), f"{repo} exists; give an empty --tmp")
        t = time.monotonic()
        # no .dvc/tmp: the queue's broker, locks and executors belong to the original's own runs
        shutil.copytree(src, repo, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d) == src / ".dvc" else [])
        log(f"copied {src} -> {repo} ({time.monotonic() - t:.1f}s)")
    summary["repo"] = str(repo)

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.pop("DVC_EXP_NAME", None)
    sh = Shell(env, tmp / "commands.log")

    # preconditions: a reproduced pipeline, a git identity
    status = sh(["dvc", "status", "--json", args.target, "--with-deps"], repo)
    require(json.loads(status.stdout or "{}") == {},
            f"{args.target} is not reproduced in {repo} (dvc status not clean)")
    if not sh(["git", "config", "user.email"], repo, check=False, quiet=True).stdout.strip():
        sh(["git", "config", "user.email", "scaleout@example.com"], repo)
        sh(["git", "config", "user.name", "scaleout check"], repo)
    profile = (yaml.safe_load((repo / "params.yaml").read_text()) or {}).get("profile")
    experiment = args.experiment or profile
    require(bool(experiment), "no MLflow experiment name (params.yaml has no `profile`; pass --experiment)")

    # 1. the MLflow server
    server = MlflowServer(tmp, env, args.server_workers)
    summary["mlflow_server"] = {"uri": server.uri, "backend": f"sqlite:///{server.db}",
                                "artifacts_destination": str(server.artifacts)}
    try:
        summary["mlflow_server"]["startup_s"] = round(server.start(), 1)
        env["MLFLOW_TRACKING_URI"] = server.uri
        _queue_and_remote(args, summary, sh, repo, tmp, server, experiment)
    finally:
        server.stop()


def _queue_and_remote(args, summary, sh, repo, tmp, server, experiment) -> None:
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    stages = [s.strip() for s in args.expect_stages.split(",") if s.strip()]
    run_names = [s.strip() for s in args.expect_runs.split(",") if s.strip()]
    require(len(set(values)) == len(values) >= 2, "--values needs at least two distinct values")
    before = {r["id"] for r in server.runs(experiment)}  # a fresh server: none

    # 2. the DVC remote and a git remote first: an experiment commit carries the .dvc/config of its baseline,
    # and `dvc exp push` reads the remote from there (a remote added after queueing is not seen: it pushes
    # the git refs and no data). Then commit, queue, run -j N.
    remote, origin = tmp / "dvc-remote", tmp / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp)
    sh(["dvc", "remote", "add", "-d", "-f", "local", str(remote)], repo)
    if "scaleout" not in sh(["git", "remote"], repo, quiet=True).stdout.split():
        sh(["git", "remote", "add", "scaleout", str(origin)], repo)
    if sh(["git", "status", "--porcelain"], repo, quiet=True).stdout.strip():
        sh(["git", "add", "-A"], repo)
        sh(["git", "commit", "-qm", "reproduced pipeline + DVC remote (scale-out check)"], repo)
    baseline = sh(["git", "rev-parse", "HEAD"], repo, quiet=True).stdout.strip()
    t_queue = time.monotonic()
    for v in values:
        out = sh(["dvc", "exp", "run", "--queue", "-S", f"{args.param}={v}", args.target], repo).stdout
        log("  " + out.strip().splitlines()[-1] if out.strip() else "  (no output)")
    tasks, _ = queue_status(sh, repo)
    summary["queued"] = len(tasks)
    require(len(tasks) == len(values), f"{len(tasks)} tasks in the queue after queueing {len(values)}")
    sh.detached(["dvc", "queue", "start", "-j", str(args.jobs)], repo)
    deadline = time.monotonic() + args.timeout
    peak_running, workers = 0, ""
    while True:
        time.sleep(args.poll)
        tasks, workers = queue_status(sh, repo)
        running = sum(s == "Running" for s in tasks.values())
        peak_running = max(peak_running, running)
        pending = [t for t, s in tasks.items() if s in ("Queued", "Running")]
        log(f"  queue: {dict(sorted(tasks.items()))}  {workers}")
        if not pending:
            break
        if time.monotonic() > deadline:
            sh(["dvc", "queue", "kill", *pending], repo, check=False)
            sh(["dvc", "queue", "stop"], repo, check=False)
            raise CheckFailed(f"the queue did not finish within {args.timeout:.0f}s: {tasks}")
    queue_wall = time.monotonic() - t_queue
    succeeded = [t for t, s in tasks.items() if s == "Success"]
    failed = [t for t, s in tasks.items() if s != "Success"]
    summary.update(succeeded=len(succeeded), failed=len(failed), queue_wall_s=round(queue_wall, 1),
                   peak_running_tasks_seen=peak_running)
    require(not failed, f"queued experiments did not succeed: {[(t, tasks[t]) for t in failed]}")
    require(len(succeeded) == len(values), f"{len(succeeded)} of {len(values)} experiments succeeded")
    # let the idle workers exit (they wait up to ~10 s on an empty queue); `dvc queue stop` if they linger
    for _ in range(6):
        if re.search(r"\b0 active", workers):
            break
        time.sleep(5)
        _, workers = queue_status(sh, repo)
    else:
        sh(["dvc", "queue", "stop"], repo, check=False)

    show = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = experiments_of(show, baseline)
    summary["experiments"] = {name: dig(e["params"], args.param) for name, e in exps.items()}
    require(len(exps) == len(values), f"dvc exp show lists {len(exps)} experiments of {baseline[:7]}, "
                                      f"expected {len(values)}")
    require(sorted(float(dig(e["params"], args.param)) for e in exps.values()) == sorted(map(float, values)),
            f"the experiments' {args.param} values are {summary['experiments']}, expected {values}")
    reran = {}
    for name in exps:
        logs = sh(["dvc", "queue", "logs", name], repo, quiet=True).stdout
        reran[name] = sorted(set(RUNNING.findall(logs)))
    summary["stages_rerun_per_experiment"] = sorted({tuple(v) for v in reran.values()})
    for name, ran in reran.items():
        require(ran == sorted(stages), f"experiment {name} ran stages {ran}, expected {sorted(stages)}")

    # MLflow: one FINISHED run per rerun stage per experiment, tagged with the experiment's name
    runs = server.runs(experiment)
    new = [r for r in runs if r["id"] not in before]
    by_exp: dict[str, list] = {}
    for r in new:
        by_exp.setdefault(r["tags"].get("dvc_exp", ""), []).append(r)
    summary.update(mlflow_runs=len(new), mlflow_runs_expected=len(values) * len(run_names),
                   distinct_dvc_exp=len(by_exp), dvc_exp_values=sorted(by_exp))
    require(len(new) == len(values) * len(run_names),
            f"{len(new)} MLflow runs on the server, expected {len(values)} x {len(run_names)}")
    not_finished = [(r["name"], r["status"]) for r in new if r["status"] != "FINISHED"]
    require(not not_finished, f"MLflow runs not FINISHED: {not_finished}")
    require("" not in by_exp, f"{len(by_exp.get('', []))} MLflow runs without a dvc_exp tag "
                              "(DVC_EXP_NAME did not reach the stage)")
    require(set(by_exp) == set(exps), f"dvc_exp tags {sorted(by_exp)} != experiments {sorted(exps)}")
    param_checked = 0
    for name, rs in by_exp.items():
        require(sorted(r["name"] for r in rs) == sorted(run_names),
                f"experiment {name}: MLflow runs {sorted(r['name'] for r in rs)}, expected {sorted(run_names)}")
        m = [r for r in rs if r["name"] == args.metric_stage]
        require(len(m) == 1 and args.metric in m[0]["metrics"],
                f"experiment {name}: no {args.metric} metric on its {args.metric_stage} run")
        for r in rs:  # the stages that log the parameter logged the experiment's value
            logged = r["params"].get(args.param)
            if logged is not None:
                param_checked += 1
                require(same_value(logged, summary["experiments"][name]),
                        f"{name}/{r['name']}: {args.param}={logged} in MLflow, {summary['experiments'][name]} in DVC")
    summary["mlflow_runs_with_param_matching_dvc"] = param_checked
    summary["metric"] = {name: next(r["metrics"][args.metric] for r in rs if r["name"] == args.metric_stage)
                         for name, rs in sorted(by_exp.items())}
    artifacts = sum(1 for f in server.artifacts.rglob("*") if f.is_file()) if server.artifacts.exists() else 0
    summary["mlflow_artifact_files"] = artifacts
    if args.artifact_stage:
        art_runs = {r["id"] for r in new if r["name"] == args.artifact_stage}
        with_files = {rid for rid in art_runs
                      if any(f.is_file() for f in (server.artifacts / new[0]["experiment_id"] / rid).rglob("*"))}
        require(with_files == art_runs, f"{len(art_runs) - len(with_files)} {args.artifact_stage} runs have no "
                                        f"artifacts in {server.artifacts}")

    # parallelism: experiment spans (first stage start .. last stage end) and single stage runs
    spans = [(min(r["start"] for r in rs) / 1e3, max(r["end"] for r in rs) / 1e3) for rs in by_exp.values()]
    peak_exp, overlap_exp = overlap_stats(spans)
    peak_run, overlap_run = overlap_stats([(r["start"] / 1e3, r["end"] / 1e3) for r in new])
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    summary["parallel"] = {"max_concurrent_experiments": peak_exp, "overlap_s": round(overlap_exp, 1),
                           "max_concurrent_stage_runs": peak_run, "stage_run_overlap_s": round(overlap_run, 1),
                           "first_start_to_last_end_s": round(last - first, 1),
                           "sum_of_experiment_spans_s": round(sum(e - s for s, e in spans), 1)}
    require(peak_exp == args.jobs and overlap_exp > 0,
            f"experiments were not run {args.jobs} at a time (peak {peak_exp}, overlap {overlap_exp:.1f}s)")
    require(peak_exp <= args.jobs, f"{peak_exp} experiments ran at once with -j {args.jobs}")

    # 3. push (git, DVC data + run cache, experiments), fresh clone, pull, repro
    clone = tmp / "clone"
    branch = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo, quiet=True).stdout.strip()
    sh(["git", "push", "-q", "scaleout", f"HEAD:refs/heads/{branch}"], repo)
    t = time.monotonic()
    push = sh(["dvc", "push", "--run-cache"], repo).stdout
    exp_push = sh(["dvc", "exp", "push", "scaleout", *sorted(exps)], repo).stdout
    pushed_extra = (0, 0)
    if not args.no_run_cache_outputs:
        pushed_extra = push_run_cache_outputs(repo)
        log(f"pushed the run-cache entries' outputs: {pushed_extra[0]} objects ({pushed_extra[1]} failed)")
    push_s = time.monotonic() - t
    runs_on_remote = sum(1 for f in (remote / "runs").rglob("*") if f.is_file()) if (remote / "runs").exists() else 0
    summary["remote"] = {"push": (push.strip().splitlines() or [""])[-1],
                         "exp_push": (exp_push.strip().splitlines() or [""])[-1][:200],
                         "run_cache_entries": runs_on_remote, "run_cache_outputs_pushed": pushed_extra[0],
                         "push_s": round(push_s, 1)}
    require(runs_on_remote > 0, "dvc push --run-cache put no run-cache entry on the remote")
    missing, checked = [], 0  # every experiment's DVC-cached outputs of the rerun stages are on the remote
    for name, e in sorted(exps.items()):
        lock = yaml.safe_load(sh(["git", "show", f"{e['rev']}:dvc.lock"], repo, quiet=True).stdout)
        in_git = sh(["git", "ls-tree", "-r", "--name-only", e["rev"]], repo, quiet=True).stdout.splitlines()
        for path, md5 in stage_outs_md5(lock, stages).items():
            if any(f == path or f.startswith(path + "/") for f in in_git):
                continue  # a `cache: false` out (metrics, plots, the report): versioned by git, not DVC
            checked += 1
            if not md5 or not (remote / "files" / "md5" / md5[:2] / md5[2:]).exists():
                missing.append(f"{name}:{path}")
    summary["remote"]["experiment_outs_checked"] = checked
    summary["remote"]["data_files"] = sum(1 for f in (remote / "files").rglob("*") if f.is_file())
    summary["remote"]["experiment_outs_missing"] = len(missing)
    require(checked > 0 and not missing, f"experiment outputs not on the DVC remote: {missing[:4]}")

    sh(["git", "clone", "-q", "-b", branch, str(origin), str(clone)], tmp)
    outs = lock_outs(repo)
    summary["outputs_original"] = count_outs(repo, outs)
    summary["outputs_clone_before_pull"] = count_outs(clone, lock_outs(clone))  # the git-tracked metrics only
    t = time.monotonic()
    # with the target: a bare `dvc pull` also tries the stages never run here (the t2i pipeline, sweeps/),
    # warns "No file hash info found" for each and exits 1
    pull = sh(["dvc", "pull", "--run-cache", args.target, "--with-deps"], clone).stdout
    summary["clone_pull"] = {"summary": (pull.strip().splitlines() or [""])[-1], "s": round(time.monotonic() - t, 1)}
    summary["outputs_clone"] = count_outs(clone, lock_outs(clone))
    require(summary["outputs_clone"] == summary["outputs_original"],
            f"outputs in the clone {summary['outputs_clone']} != original {summary['outputs_original']}")
    t = time.monotonic()
    repro = sh(["dvc", "repro", args.target], clone)
    text = repro.stdout + repro.stderr
    ran = RUNNING.findall(text)
    status = json.loads(sh(["dvc", "status", "--json", args.target, "--with-deps"], clone).stdout or "{}")
    summary["clone_repro"] = {"recomputed_stages": len(ran), "unchanged_stages": len(UNCHANGED.findall(text)),
                              "restored_from_run_cache": len(CACHED.findall(text)), "dvc_status_clean": status == {},
                              "s": round(time.monotonic() - t, 1)}
    require(not ran, f"`dvc repro {args.target}` in the clone ran stages {ran}")
    require(status == {}, f"dvc status in the clone is not clean: {sorted(status)[:5]}")

    # one queued experiment's parameters in the clone: its stages come back from the pulled run cache.
    # Not `report`: DVC saves no run-cache entry for a stage with a `cache: false` out that is neither a
    # metric nor a plot (reports/<profile>), so it reruns (a few seconds, one MLflow run tagged dvc_exp); nor
    # `validate` (its marker is a persistent output), which logs no MLflow run.
    cached_want = [s.strip() for s in args.clone_cached.split(",") if s.strip()]
    rerun_want = [s.strip() for s in args.clone_reruns.split(",") if s.strip()]
    name, value = min(summary["experiments"].items(), key=lambda kv: float(kv[1]))
    n_runs = len(server.runs(experiment))
    t = time.monotonic()
    exp_run = sh(["dvc", "exp", "run", "--pull", "-S", f"{args.param}={value}", args.target], clone)
    text = exp_run.stdout + exp_run.stderr
    ran, cached = RUNNING.findall(text), CACHED.findall(text)
    want = stage_outs_md5(yaml.safe_load(sh(["git", "show", f"{exps[name]['rev']}:dvc.lock"], repo,
                                            quiet=True).stdout), cached_want)
    got = stage_outs_md5(yaml.safe_load((clone / "dvc.lock").read_text()), cached_want)
    clone_runs = [r for r in server.runs(experiment) if r["id"] not in {x["id"] for x in new}]
    summary["clone_exp_run"] = {"param": f"{args.param}={value}", "same_as_queued_experiment": name,
                                "restored_from_run_cache": sorted(cached), "rerun": sorted(ran),
                                "outs_identical_to_queued_experiment": want == got and bool(want),
                                "mlflow_runs": sorted(f"{r['name']} (dvc_exp={r['tags'].get('dvc_exp')})"
                                                      for r in clone_runs),
                                "s": round(time.monotonic() - t, 1)}
    summary["recomputed_stages_in_clone"] = summary["clone_repro"]["recomputed_stages"]
    require(sorted(cached) == sorted(cached_want),
            f"`dvc exp run -S {args.param}={value}` in the clone restored {sorted(cached)} from the run cache, "
            f"expected {sorted(cached_want)} (ran {ran})")
    require(sorted(ran) == sorted(rerun_want), f"`dvc exp run -S {args.param}={value}` in the clone ran {ran}, "
                                               f"expected {rerun_want}")
    require(want == got and bool(want), "the outputs restored in the clone differ from the queued experiment's")
    logged_want = [s for s in rerun_want if s != "validate"]
    require(len(clone_runs) == len(logged_want) == len(server.runs(experiment)) - n_runs
            and all(r["tags"].get("dvc_exp") and r["status"] == "FINISHED" for r in clone_runs),
            f"MLflow runs from the clone: {summary['clone_exp_run']['mlflow_runs']}, expected one per {logged_want}")


def push_run_cache_outputs(repo: Path, remote: str | None = None) -> tuple[int, int]:
    """Push the outputs that the run-cache entries name to the DVC remote, `cache: false` ones included.

    DVC 3.67 `dvc push --run-cache` (and `dvc exp push`) transfers the entries under .dvc/cache/runs but only
    the objects of cached outputs in a dvc.lock; a `cache: false` metric or plot is kept in the local cache
    for the run cache and never pushed, so in another clone the restore finds the entry, misses the object
    and runs the stage. Returns (objects transferred, failed)."""
    import contextlib

    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(str(repo)) as dvc:  # run-cache stages resolve their wdir from the cwd
        runs = Path(dvc.stage_cache.cache_dir)
        entries = [(p.parent.name, p.name) for p in runs.glob("*/*/*") if p.is_file()]
        used = dvc.stage_cache.get_used_objs(entries)
        objs = set().union(*used.values()) if used else set()
        result = dvc.cloud.push(objs, remote=remote)
        return len(result.transferred), len(result.failed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="git repository with the pipeline reproduced (outputs in its DVC cache)")
    ap.add_argument("--tmp", help="work directory for the copy, server DB, artifacts, DVC remote, git remote and "
                                  "clone (must be empty or new; default: a new /tmp/deme-scaleout-*)")
    ap.add_argument("--in-place", action="store_true",
                    help="use REPO itself instead of a copy (it gets a commit, 4 experiments, a remote)")
    ap.add_argument("--target", default="report", help="dvc repro / exp run target (default: report)")
    ap.add_argument("--param", default="baselines.p2.gamma", help="parameter each experiment sets with -S")
    ap.add_argument("--values", default="0.5,1.5,2.0,3.0", help="comma-separated values, one experiment each")
    ap.add_argument("--expect-stages", default="validate,finetune_baseline@p2,evaluate@p2,report",
                    help="the stages each experiment must rerun (validate: params.yaml changed; it logs no "
                         "MLflow run, the others one each)")
    ap.add_argument("--expect-runs", default="finetune@p2,evaluate@p2,report",
                    help="the MLflow run names each experiment must log, one per rerun stage (the suite names a "
                         "run <script>@<item>: finetune_baseline@p2 logs finetune@p2)")
    ap.add_argument("--metric-stage", default="evaluate@p2", help="MLflow run name whose metric is checked")
    ap.add_argument("--metric", default="fid", help="metric the --metric-stage runs must have")
    ap.add_argument("--artifact-stage", default="report",
                    help="MLflow run name whose runs must have artifacts on the server ('' to skip)")
    ap.add_argument("--experiment", help="MLflow experiment name (default: `profile` from params.yaml)")
    ap.add_argument("--clone-cached", default="finetune_baseline@p2,evaluate@p2",
                    help="stages that `dvc exp run` of a queued experiment's value in the clone must restore "
                         "from the run cache")
    ap.add_argument("--clone-reruns", default="validate,report",
                    help="stages it reruns: those with a `cache: false` out that is not a metric or plot get no "
                         "run-cache entry (DVC 3.67)")
    ap.add_argument("--no-run-cache-outputs", action="store_true",
                    help="skip pushing the run-cache entries' `cache: false` outputs (shows the DVC limitation: "
                         "the clone then recomputes every stage)")
    ap.add_argument("--push-run-cache-outputs", action="store_true",
                    help="only push the outputs named by REPO's run cache to its default DVC remote, then exit "
                         "(run after `dvc push --run-cache`)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="dvc queue start -j (default 2)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the queue (default 1200)")
    ap.add_argument("--poll", type=float, default=15, help="seconds between `dvc queue status` polls")
    ap.add_argument("--server-workers", type=int, default=1, help="mlflow server --workers (default 1)")
    ap.add_argument("--summary", help="also write the JSON summary to this file")
    args = ap.parse_args(argv)

    if args.push_run_cache_outputs:
        done, failed = push_run_cache_outputs(Path(args.repo).resolve())
        print(f"{done} objects pushed, {failed} failed")
        return 1 if failed else 0
    summary: dict = {"ok": False}
    code = 0
    try:
        run_check(args, summary)
        summary["ok"] = True
    except CheckFailed as e:
        summary["reason"] = str(e)
        code = 1
    except subprocess.TimeoutExpired as e:
        summary["reason"] = f"timed out: {e}"
        code = 1
    except Exception as e:  # noqa: BLE001 - an unexpected error is a failed check too, with the summary so far
        summary["reason"] = f"{type(e).__name__}: {e}"
        code = 1
    summary["wall_s"] = round(time.monotonic() - T0, 1)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.summary:
        Path(args.summary).write_text(text + "\n")
    if code:
        print(f"FAILED: {summary['reason']}", file=sys.stderr)
    else:
        log(f"all checks passed in {summary['wall_s']}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
