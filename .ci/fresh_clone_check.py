"""Lineage check (issue 15, item 4): the main job run in fresh clones changes no tracked file and tags the clean commit.

    .venv/bin/python .ci/fresh_clone_check.py [--worktree] [--clones 2] [--out results.json]

Each clone runs ``python -m flows.compress`` (what ``scripts/run.sh`` runs after setting up ``.venv``; this check reuses
the checkout's ``.venv``, it does not install one per clone), then reports: the tracked files the job changed (must be
none), the untracked files it left (``dvc.lock``: DVC refuses a git-ignored lock file, so it is untracked rather than
ignored), the ``git.commit`` tag of the MLflow run (must be the clone's HEAD, not ``-dirty``), the run's comparison with
the committed reference run (``reference.check``), and, across clones, which stages' outputs have equal hashes in
``dvc.lock``. Outputs that hold measured times (latency table and what derives from it) differ between any two runs,
so ``dvc.lock`` is not expected to be identical; that is why it is not committed.

``--worktree`` checks the working tree as it is (committed into a scratch repository first), e.g. before a commit;
by default the checkout's HEAD is cloned. The full main job per clone: about 4 minutes on an idle 2-core machine.
Exit status 1 when a clone's job failed, changed a tracked file, or tagged a dirty commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tracked at HEAD before issue 15 and rewritten by every run; a scratch copy of the work tree leaves them out
JOB_WRITTEN = {"dvc.lock", "outputs/metrics.json", "outputs/plan/plan_metrics.json"}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def worktree_snapshot(target: Path) -> Path:
    """The checkout's tracked and untracked-not-ignored files as one commit of a scratch repository."""
    files = [f for f in git("ls-files", "-co", "--exclude-standard", "-z", cwd=REPO).split("\0") if f]
    for name in files:
        if name in JOB_WRITTEN or not (REPO / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    git("init", "-q", cwd=target)
    git("add", "-A", cwd=target)
    git("-c", "user.name=check", "-c", "user.email=check@localhost", "commit", "-q", "-m", "work tree snapshot", cwd=target)
    return target


def job_env(clone: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="true",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_HOME=str(clone / ".prefect"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def run_clone(source: Path, clone: Path) -> dict:
    git("clone", "-q", str(source), str(clone), cwd=clone.parent)
    head = git("rev-parse", "HEAD", cwd=clone).strip()
    start = time.monotonic()
    job = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", "."], cwd=clone, env=job_env(clone),
                         capture_output=True, text=True)
    result = {"clone": str(clone), "head": head, "exit": job.returncode, "seconds": round(time.monotonic() - start, 1),
              "last_lines": job.stdout.strip().splitlines()[-3:] + job.stderr.strip().splitlines()[-2:]}
    status = git("status", "--porcelain", "--untracked-files=all", cwd=clone).splitlines()
    result["tracked_changes"] = [line for line in status if not line.startswith("??")]
    result["untracked"] = sorted({line[3:].split("/")[0] for line in status if line.startswith("??")})
    if job.returncode == 0:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("slimdiff").experiment_id])[0]
        result["git_commit_tag"] = run.data.tags.get("git.commit")
        result["reference_check"] = run.data.tags.get("reference.check")
        result["clean_commit"] = result["git_commit_tag"] == head
    return result


def lock_outs(clone: Path) -> dict[str, dict[str, str]]:
    import yaml

    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    return {stage: {o["path"]: o.get("md5", "") for o in entry.get("outs", [])} for stage, entry in lock["stages"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worktree", action="store_true", help="check the working tree (committed into a scratch repository)")
    parser.add_argument("--clones", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="slimdiff-fresh-clone-"))
    source = worktree_snapshot(scratch / "source") if args.worktree else REPO
    results = []
    for index in range(args.clones):
        clone = scratch / f"clone{index + 1}"
        print(f"clone {index + 1}: running the main job in {clone} ...", flush=True)
        results.append(run_clone(source, clone))
        print(json.dumps(results[-1], indent=1), flush=True)
    report: dict = {"source": "work tree snapshot" if args.worktree else f"{REPO} HEAD", "clones": results}
    done = [scratch / f"clone{i + 1}" for i, r in enumerate(results) if r["exit"] == 0]
    if len(done) >= 2:
        first, second = lock_outs(done[0]), lock_outs(done[1])
        report["dvc_lock_outs"] = {stage: "equal" if first[stage] == second.get(stage) else "differ" for stage in first}
    print(json.dumps({k: v for k, v in report.items() if k != "clones"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    ok = all(r["exit"] == 0 and not r["tracked_changes"] and r.get("clean_commit") for r in results)
    print("fresh-clone check:", "passed" if ok else "FAILED", f"(scratch folder {scratch})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
