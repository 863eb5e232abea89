"""The registered model is servable (issue 15, item 2; issue 24): ``mlflow models serve`` from the registry alias
``@champion`` on a loopback port, in an environment where the checkout's ``slimdiff`` cannot be imported (the code must
travel with the model), answers a real HTTP request with two prompts; the images equal the pipeline's own. Concurrent
clients get the images a lone request gets; hostile requests (a huge size, a billion steps, 100 prompts, an unknown
param, malformed JSON, more memory than the server allows, more time than its limit) get a 4xx/504 naming the param
and the valid range, and the server answers after each of them.

The model is logged with the job's own function (``flows.model_logging.log_pipeline_model``) from a tiny compressed
pipeline built in-process, registered and aliased ``champion``: the flow end to end is ``tests/test_flows.py``. One
server start for the module; about two minutes on a loaded 2-core machine (most of it the compression and the
server's start-up). The pure limits, the memory predictor and the queue are ``tests/test_serving_limits.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a real server: see the module docstring
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow") if (BIN / "mlflow").exists() else "mlflow"
NAME = "slimdiff-serve-test"
SAMPLER = {"steps": 3, "guidance": 4.0, "height": None, "width": None, "seed": 0}
HELD_OUT = [{"name": "10 steps", "steps": 10}, {"name": "Euler", "scheduler": "EulerDiscreteScheduler"}]
SERVE = {"max_steps": 900}  # params.yaml: serve overrides; 900 steps let one valid request outlast the time limit
TIME_LIMIT = 4  # SLIMDIFF_SERVE_TIME_LIMIT of the test server, seconds
PROMPTS = ["a small red circle at the top left", "a large blue square at the bottom right"]

# Imported by every Python process of the server (PYTHONPATH): drops the checkout and its editable-install finder,
# as on a machine that has only the registry alias and the model's pinned requirements.
HIDE_CHECKOUT = """
import sys
_repo = {repo!r}
sys.path[:] = [p for p in sys.path if p not in ("", ".", _repo, _repo + "/")]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny compressed pipeline logged by the job's function, registered as NAME and aliased champion."""
    import mlflow
    from mlflow import MlflowClient

    import slimdiff
    from flows.model_logging import log_pipeline_model
    from slimdiff.compress import SlimDiffConfig, compress_pipeline
    from slimdiff.runtime.sampling import SamplerSettings
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("serve")
    pipe = tiny_sd_pipeline()
    sampler = SamplerSettings(SAMPLER["steps"], SAMPLER["guidance"], seed=SAMPLER["seed"])
    result = compress_pipeline(pipe, TINY_PROMPTS[:8], SlimDiffConfig(budget=0.4, batch_size=4), sampler, progress=False)
    folder = root / "pipeline"
    slimdiff.save(pipe, folder, result.info("tiny"), full_widths={m.name: m.full_width for m in result.plan.modules})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pipeline_model(folder, {"sampler": SAMPLER, "serve": SERVE, "model": {"dtype": "float32"},
                                               "evaluate": {"samplers": HELD_OUT}}, REPO)
        version = mlflow.register_model(info.model_uri, NAME).version
        MlflowClient().set_registered_model_alias(NAME, "champion", version)
    finally:
        mlflow.set_tracking_uri(previous)
    return root, uri, folder, info


def test_logged_model_has_signature_params_schema_code_and_pinned_requirements(registered):
    from mlflow.models import Model

    root, uri, folder, info = registered
    signature = info.signature
    assert [c.name for c in signature.inputs.inputs] == ["prompt"]
    output = signature.outputs.inputs[0]
    assert output.type == np.dtype("uint8") and output.shape == (-1, -1, -1, 3)
    defaults = {p.name: p.default for p in signature.params.params}
    assert defaults == {"steps": 3, "guidance": 4.0, "seed": 0, "height": None, "width": None}

    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(root / "downloaded")))
    finally:
        mlflow.set_tracking_uri(previous)
    requirements = [line.strip() for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    assert all("==" in line for line in requirements), requirements  # every requirement pinned
    assert not any(line.split("==")[0].lower() == "slimdiff" for line in requirements), requirements  # no unpublished package
    assert {"mlflow", "torch", "diffusers", "safetensors"} <= {line.split("==")[0].lower() for line in requirements}
    code = local / "code" / "slimdiff"
    assert (code / "runtime" / "folder.py").is_file() and (code / "__init__.py").is_file()
    assert not list(code.rglob("__pycache__"))
    # the runtime only (issue 22): none of the compressor travels; the server below loads and runs with this alone
    shipped = {p.relative_to(code).parts[0] for p in code.iterdir()}
    assert shipped == {"__init__.py", "device.py", "files.py", "failpoints.py", "environment.py", "arch", "runtime"}, shipped
    assert Model.load(local / "MLmodel").flavors["python_function"]["code"] == "code"
    # the served defaults and limits travel as serving.json (not as model_config, which MLflow copies into run params)
    serving = json.loads((local / "artifacts" / "serving.json").read_text())
    # how the guidance is passed and the text length are the model's: the defaults when params.yaml leaves them out
    served = {**SAMPLER, "guidance_argument": "guidance_scale", "max_sequence_length": None}
    assert serving["sampler"] == served and serving["dtype"] == "float32" and serving["device"] == "auto"
    assert serving["limits"]["max_steps"] == 900 and serving["limits"]["size_multiple"] == 8
    assert (serving["limits"]["min_side"], serving["limits"]["max_side"]) == (8, 32)  # tiny pipeline: native 16 px
    # the settings it was measured under: the calibration sampler, then the held-out ones (issue 23)
    assert serving["validated_samplers"] == [{"name": "calibration", **served,
                                              "scheduler": "the pipeline's own"}, *HELD_OUT]
    assert "model_config" not in Model.load(local / "MLmodel").flavors["python_function"]
    run = mlflow.MlflowClient(uri).get_run(info.run_id)
    assert not [k for k in run.data.params if k.startswith("sampler/")], run.data.params


def test_serve_champion_from_the_registry_without_the_checkout(registered, tmp_path):
    """One documented command, ``mlflow models serve -m models:/<name>@champion --env-manager local``, from a folder
    outside the checkout and with the checkout hidden; a request of two prompts with params returns their images."""
    import slimdiff
    from slimdiff.runtime.sampling import SamplerSettings

    root, uri, folder, _ = registered
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_CHECKOUT.format(repo=str(REPO)))
    from slimdiff.runtime.requests import model_shape, request_memory

    shape = model_shape(folder)
    memory = request_memory(shape, 16, 16, 16, SAMPLER["guidance"])  # a full coalesced batch at the native size fits
    assert request_memory(shape, 8, 32, 32, SAMPLER["guidance"]) > memory  # 8 prompts at the largest size do not
    # the server execs `uvicorn`: the environment's bin folder on PATH, as after `source .venv/bin/activate`
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(hide), MLFLOW_TRACKING_URI=uri,
               SLIMDIFF_THREADS="1", SLIMDIFF_SERVE_TIME_LIMIT=str(TIME_LIMIT), SLIMDIFF_SERVE_MAX_MEMORY=str(memory),
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", HF_HUB_OFFLINE="1")
    # the check is real: in this environment the checkout's packages are not importable
    probe = subprocess.run([sys.executable, "-c", "import slimdiff"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'slimdiff'" in probe.stderr, probe.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        server = subprocess.Popen([MLFLOW, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        ready = time.monotonic() - start

        def post(body: bytes) -> tuple[int, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        def invoke(params: dict, prompts=PROMPTS) -> tuple[int, bytes]:
            return post(json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]},
                                    "params": params}).encode())

        def images_of(status: int, answer: bytes) -> np.ndarray:
            assert status == 200, answer[:2000]
            return np.asarray(json.loads(answer)["predictions"], dtype=np.uint8)

        def alive() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as response:
                return response.status == 200

        begin = time.monotonic()
        images = images_of(*invoke({"steps": 2, "seed": 1}))
        first = time.monotonic() - begin
        other_seed = images_of(*invoke({"steps": 2, "seed": 2}))

        # concurrent clients: each answer is the image a lone request gets (two prompts x two seeds, 8 clients at once)
        cases = [([PROMPTS[i % 2]], {"steps": 2, "seed": 1 + i // 2 % 2}) for i in range(8)]  # 4 distinct, each twice
        lone = {i: images_of(*invoke(params, prompts)) for i, (prompts, params) in enumerate(cases[:4])}
        answers: list = [None] * len(cases)

        def client(index: int) -> None:
            answers[index] = invoke(cases[index][1], cases[index][0])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        for index, answer in enumerate(answers):
            got, want = images_of(*answer), lone[index % 4]
            # requests that arrive together run as one batch: batched float sums may differ in the last bit
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1, index

        # hostile requests: refused before any work (or stopped at the time limit), naming the param and the range;
        # the server answers after each
        hostile = [
            (invoke({"height": 100000, "width": 100000}), 400, b"param height must be a whole number in 8..32, got 100000"),
            (invoke({"steps": 1_000_000_000}), 400, b"param steps must be a whole number in 1..900, got 1000000000"),
            (invoke({"steps": 0}), 400, b"param steps must be a whole number in 1..900, got 0"),
            (invoke({"steps": 2}, ["a prompt"] * 100), 400, b"a request holds 1..8 prompts, got 100"),
            (invoke({"stpes": 2}), 400, b"unknown param(s) ['stpes']; valid: steps, guidance, seed, height, width"),
            (invoke({"seed": -3}), 400, b"param seed must be a whole number in 0..9223372036854775807, got -3"),
            (invoke({"guidance": 1e9}), 400, b"param guidance must be a number in 0..20, got 1000000000.0"),
            (invoke({"height": 20}), 400, b"param height must be a multiple of 8 (the model's latent factor) in 8..32"),
            (post(b'{"dataframe_split": {"columns": ["prompt"], "data": [["a"'), 400, b""),
            (invoke({"steps": 2, "height": 32, "width": 32}, ["a prompt"] * 8), 400, b"over this server's limit of"),
            (invoke({"steps": 900}), 504, f"request exceeded the time limit of {TIME_LIMIT} s".encode()),
        ]
        for index, ((status, answer), expected_status, expected) in enumerate(hostile):
            assert status == expected_status and expected in answer, (index, status, answer[-600:])
            assert alive(), index
        assert b"of 900; its compute has ended" in hostile[-1][0][1], hostile[-1][0][1][-400:]
        again = images_of(*invoke({"steps": 2, "seed": 1}))  # the worker is free again, and still right
        assert np.array_equal(again, images)
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=60)
    print(f"\nserver ready (model loaded) {ready:.1f} s after start; first request of {len(PROMPTS)} prompts {first:.2f} s")

    # two prompts in, two uint8 RGB images out, equal to the pipeline's own images for the same sampler and seed
    pipe = slimdiff.load(folder)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerSettings(2, SAMPLER["guidance"], seed=1)
    expected = (np.clip(pipe(**sampler.pipe_kwargs(pipe, PROMPTS), output_type="np").images, 0, 1) * 255).round().astype(np.uint8)
    assert images.shape == expected.shape and images.shape[0] == 2 and images.shape[-1] == 3, images.shape
    assert images.min() >= 0 and images.max() <= 255
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # thread counts may differ in the last bit
    assert not np.array_equal(images[0], images[1])  # the two prompts give two images
    assert not np.array_equal(images, other_seed)  # the seed param is honoured, not ignored
    log_text = log.read_text()
    assert "Traceback" not in log_text, log_text[-3000:]  # every refusal is an answer, not a crash
