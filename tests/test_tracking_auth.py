"""A team's tracking server with authentication (issue 24, item 5): a real ``mlflow server --app-name basic-auth`` on a
loopback port (one start for the module, ~30-60 s on the 2-core machine; needs Flask-WTF, the ``mlflow[auth]`` extra,
in the dev extras). Missing or wrong credentials fail the job's preflight with one line and exit 2, before any stage,
leaving the workspace's outputs as they were; the right ones (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
of a non-admin user) log the run and register the model.

The workspace holds what a finished job leaves (stand-ins: the committed reference run's metrics and ``dvc.lock``, a
tiny pipeline saved with ``slimdiff.save``), so the tracking runs without the stages: the job end to end is
``tests/test_flows.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a real server: see the module docstring
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow") if (BIN / "mlflow").exists() else "mlflow"
ADMIN = ("admin", "admin-Passw0rd-for-tests")
USER = ("alice", "alice-Passw0rd-for-tests")
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(uri: str, path: str, body: dict | None = None, user: tuple[str, str] | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    request = urllib.request.Request(uri + path, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` with its own user store; a non-admin user ``alice``."""
    root = tmp_path_factory.mktemp("auth")
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'users.db'}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n")  # PBKDF2 once per user, not once per request: logging is dozens of requests
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS and k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
               MLFLOW_FLASK_SERVER_SECRET_KEY="slimdiff-test-key", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = root / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([MLFLOW, "server", "--app-name", "basic-auth", "--backend-store-uri",
                                   f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server --app-name basic-auth did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        call(uri, "/api/2.0/mlflow/users/create", {"username": USER[0], "password": USER[1]}, ADMIN)
        yield uri
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def finished_workspace(tmp_path_factory):
    """A workspace as a finished job leaves it: outputs, dvc.lock; tracking is the only step left."""
    from PIL import Image

    import slimdiff
    from tests import helpers as testing

    workspace = testing.make_workspace(tmp_path_factory.mktemp("auth-ws") / "ws")
    outputs = workspace / "outputs"
    for folder in ("plan", "slimset", "report"):
        (outputs / folder).mkdir(parents=True)
    reference = REPO / "docs" / "reference-run"
    (outputs / "metrics.json").write_text((reference / "metrics.json").read_text())
    (workspace / "dvc.lock").write_text((reference / "dvc.lock").read_text())
    (outputs / "plan" / "width_plan.json").write_text(json.dumps({
        "allocator": "slimdiff", "settings": {"budget": 0.4, "budget_kind": "params"},
        "params": {"compressible_before": 3173376, "compressible_after": 1903856}}))
    Image.new("RGB", (8, 8)).save(outputs / "plan" / "width_plan.png")
    (outputs / "slimset" / "slimset.jsonl").write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    (outputs / "slimset" / "slimset_stats.json").write_text(json.dumps({"digest": hashlib.sha256(b"slimset").hexdigest()}))
    (outputs / "report" / "report.md").write_text("# report\n")
    slimdiff.save(testing.tiny_sd_pipeline(), outputs / "model")
    return workspace


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_missing_credentials_fail_the_job_in_preflight_with_one_line_and_exit_2(auth_server, finished_workspace):
    before = tree_digest(finished_workspace / "outputs"), (finished_workspace / "dvc.lock").read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    result = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", str(finished_workspace)], cwd=REPO,
                            capture_output=True, text=True, env={**env, "MLFLOW_TRACKING_URI": auth_server})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [f"compress: error: tracking server {auth_server} requires credentials (HTTP 401) and none are set: set "
                     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"], result.stderr
    assert (tree_digest(finished_workspace / "outputs"), (finished_workspace / "dvc.lock").read_bytes()) == before  # kept


@pytest.mark.parametrize("credentials,message", [
    ({"MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": "wrong-password"},
     "refused the credentials of user 'alice' (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD) (HTTP 401)"),
    ({"MLFLOW_TRACKING_USERNAME": USER[0]}, "MLFLOW_TRACKING_USERNAME is set but MLFLOW_TRACKING_PASSWORD is not: set both"),
])
def test_wrong_credentials_fail_the_preflight_with_one_line(auth_server, finished_workspace, monkeypatch, capsys,
                                                            credentials, message):
    from flows.compress import main

    before = tree_digest(finished_workspace / "outputs")
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**credentials, "MLFLOW_TRACKING_URI": auth_server}.items():
        monkeypatch.setenv(name, value)
    assert main(["--workspace", str(finished_workspace)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compress: error: ") and message in lines[0], lines
    assert tree_digest(finished_workspace / "outputs") == before


def test_right_credentials_log_and_register(auth_server, finished_workspace, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from flows.tracking import log_compression
    from flows.tracking_server import TrackingError, check_tracking_uri

    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    params = yaml.safe_load((finished_workspace / "params.yaml").read_text())
    previous = mlflow.get_tracking_uri()
    try:
        check_tracking_uri(auth_server)  # the preflight passes
        result = log_compression(finished_workspace, params, "checkpoint-hash", {"curate": True})
        client = MlflowClient(auth_server)
        version = client.get_model_version_by_alias(result["name"], "candidate")
        assert version.version == result["version"] == "1" and version.tags["registration"] == "complete"
        assert client.get_model_version_by_alias(result["name"], "champion").version == "1"  # the test gate passes
        run = client.get_run(result["run_id"])
        assert run.data.params["allocate.budget"] == "0.4" and "dvc.lock.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert result["run_url"].startswith(f"{auth_server}/#/experiments/")
        # the password changed after the preflight: the tracking step fails with one line, the outputs stay
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "changed-meanwhile")
        with pytest.raises(TrackingError) as error:
            log_compression(finished_workspace, params, "another-hash", {"curate": True})
        assert len(str(error.value).splitlines()) == 1 and "the outputs are kept" in str(error.value), error.value
        assert "the server refused the credentials of user 'alice'" in str(error.value), error.value
        assert (finished_workspace / "outputs" / "metrics.json").is_file()
    finally:
        mlflow.set_tracking_uri(previous)
