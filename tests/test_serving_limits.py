"""The served model's request limits, memory prediction and concurrency (issue 24), in-process and fast.

Pure functions (validation, limits, the memory predictor) as unit tests; the generation queue with a fake generator
(coalescing, the queue bound, the time limit between steps, a failing batch); and the pyfunc on a tiny DPM-Solver
pipeline: concurrent requests give the images a lone request gives (bitwise without coalescing, within one uint8 level
with it; the scheduler that two requests shared used to raise ``IndexError`` inside ``scheduler.step``). The real server is
``tests/test_serve.py``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from flows import pyfunc_model as serving
from slimdiff.runtime.generation import GenerationQueue
from slimdiff.runtime.requests import (
    Limits,
    RequestError,
    RequestSettings,
    ServingError,
    TimeLimit,
    TooLarge,
    check_request_memory,
    default_limits,
    limits_from,
    model_shape,
    parse_bytes,
    prompts_of,
    request_memory,
    serving_document,
    validate_params,
    validate_prompts,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "data" / "reference" / "model"
SAMPLER = {"steps": 25, "guidance": 4.0, "seed": 0, "height": None, "width": None}
PROMPTS = ["a small red circle at the top left", "a large blue square at the bottom right", "a green triangle",
           "a yellow circle at the bottom left"]


@pytest.fixture(scope="module")
def reference():
    shape = model_shape(REFERENCE)
    return shape, default_limits(shape, SAMPLER)


# ---- limits derived from the model ---------------------------------------------------------------------------------


def test_limits_derived_from_the_reference_model(reference):
    shape, limits = reference
    assert shape.vae_scale_factor == 4 and shape.native_size == (32, 32) and shape.size_multiple == 8
    assert shape.denoiser_class == "UNet2DConditionModel" and shape.num_train_timesteps == 1000
    assert shape.max_scheduler_steps == 999  # steps_offset 1
    assert (limits.min_side, limits.max_side) == (8, 64)  # a quarter to twice the native 32 px
    assert limits.max_steps == 100 and limits.max_prompts == 8 and limits.max_batch == 16
    assert limits.coalesce is False  # by default an answer is bitwise the image its request gets alone
    assert limits_from(asdict(limits)) == limits  # what serving.json holds reads back


def test_limits_follow_the_deployment_sampler_and_the_scheduler(reference):
    shape, _ = reference
    assert default_limits(shape, {**SAMPLER, "steps": 50}).max_steps == 200  # 4x the deployment steps
    assert default_limits(replace(shape, max_scheduler_steps=150), {**SAMPLER, "steps": 50}).max_steps == 150
    assert default_limits(shape, {**SAMPLER, "height": 48, "width": 40}).max_side == 96  # twice the deployment size


@pytest.mark.parametrize("change,message", [
    ({"max_steps": 0}, "serving limit max_steps must be a whole number >= 1, got 0"),
    ({"min_side": 12}, "must be multiples of size_multiple 8"),
    ({"max_batch": 4}, "max_batch (4) must be >= max_prompts (8)"),
    ({"max_stepz": 3}, "unknown setting(s) ['max_stepz']"),
    ({"max_steps": 1000}, "serving limit max_steps must be in 1..999 (the scheduler's training timesteps less its offset)"),
])
def test_bad_limit_overrides_fail_at_log_time(reference, change, message):
    shape, _ = reference
    with pytest.raises(ServingError) as error:
        serving_document(shape, SAMPLER, "float32", "auto", change)
    assert message in str(error.value)


# ---- request validation -------------------------------------------------------------------------------------------


def test_valid_params_merge_over_the_deployment_sampler(reference):
    _, limits = reference
    settings = validate_params({"steps": 10, "seed": 7, "height": None}, SAMPLER, limits, (32, 32))
    assert settings == RequestSettings(10, 4.0, 7, 32, 32)  # height/width default to the native size
    assert validate_params(None, SAMPLER, limits, (32, 32)) == RequestSettings(25, 4.0, 0, 32, 32)
    assert validate_params({"steps": 3.0, "guidance": 0, "width": 64}, SAMPLER, limits, (32, 32)).width == 64


@pytest.mark.parametrize("params,message", [
    ({"steps": 0}, "param steps must be a whole number in 1..100, got 0"),
    ({"steps": 1_000_000_000}, "param steps must be a whole number in 1..100, got 1000000000"),
    ({"steps": 2.5}, "param steps must be a whole number in 1..100, got 2.5"),
    ({"steps": True}, "param steps must be a whole number in 1..100, got True"),
    ({"guidance": -1.0}, "param guidance must be a number in 0..20, got -1.0"),
    ({"guidance": float("nan")}, "param guidance must be a number in 0..20, got nan"),
    ({"seed": -1}, f"param seed must be a whole number in 0..{2**63 - 1}, got -1"),
    ({"height": 100000, "width": 100000}, "param height must be a whole number in 8..64, got 100000"),
    ({"width": 4}, "param width must be a whole number in 8..64, got 4"),
    ({"height": 36}, "param height must be a multiple of 8 (the model's latent factor) in 8..64, got 36"),
    ({"steps": 2, "stpes": 4}, "unknown param(s) ['stpes']; valid: steps, guidance, seed, height, width"),
])
def test_bad_params_name_themselves_and_the_valid_range(reference, params, message):
    _, limits = reference
    with pytest.raises(RequestError) as error:
        validate_params(params, SAMPLER, limits, (32, 32))
    assert str(error.value) == message


@pytest.mark.parametrize("prompts,message", [
    ([], "no prompts in the input"),
    (["a"] * 9, "a request holds 1..8 prompts, got 9"),
    (["a", 3], "prompts must be strings, got int '3'"),
    (["x" * 2001], "a prompt holds at most 2000 characters, got 2001"),
])
def test_bad_prompts(reference, prompts, message):
    _, limits = reference
    with pytest.raises(RequestError) as error:
        validate_prompts(prompts, limits)
    assert str(error.value) == message


def test_prompts_of_every_input_form():
    import pandas as pd

    assert prompts_of(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert prompts_of(pd.DataFrame({"prompt": [["a", "b"]]})) == ["a", "b"]  # MLflow's {"prompt": [a, b]}: one row
    assert prompts_of({"prompt": ["a"]}) == ["a"] and prompts_of(["a", "b"]) == ["a", "b"]
    with pytest.raises(RequestError, match=r"input needs a 'prompt' column, got \['text'\]"):
        prompts_of(pd.DataFrame({"text": ["a"]}))


# ---- memory -------------------------------------------------------------------------------------------------------

# Peak RSS above the loaded model during one request, the compressed reference model in a fresh process per row on the
# 2-core CPU box (benchmarks/serve_load.py, docs/serving.md "Memory prediction"): (prompts, side, guidance) -> MiB.
MEASURED_MIB = {(1, 32, 4.0): 1.8, (8, 32, 4.0): 10.5, (16, 32, 4.0): 21.7, (1, 64, 4.0): 6.7, (8, 64, 4.0): 41.1,
                (1, 128, 4.0): 28.0, (4, 128, 4.0): 126.8, (1, 256, 1.0): 154.1, (1, 256, 4.0): 154.2,
                (4, 256, 4.0): 402.0, (1, 512, 4.0): 405.3}


def test_predicted_memory_covers_every_measurement_on_the_reference_model(reference):
    shape, _ = reference
    for (prompts, side, guidance), mib in MEASURED_MIB.items():
        predicted = request_memory(shape, prompts, side, side, guidance) / 2**20
        assert predicted >= mib, (prompts, side, guidance, predicted, mib)
        if mib > 64:  # where the working memory dominates the fixed overhead, the prediction stays useful
            assert predicted <= 3 * mib, (prompts, side, guidance, predicted, mib)


def test_predicted_memory_grows_with_prompts_size_and_guidance(reference):
    shape, _ = reference
    one = request_memory(shape, 1, 256, 256, 4.0)
    assert request_memory(shape, 4, 256, 256, 4.0) > one > request_memory(shape, 1, 128, 128, 4.0)
    assert request_memory(shape, 1, 256, 256, 1.0) <= one  # no classifier-free guidance: half the denoiser batch
    assert request_memory(shape, 1, 100000, 100000, 4.0) > 10 * 2**40  # the request: terabytes, refused


def test_a_request_over_the_memory_limit_is_refused_naming_what_fits(reference):
    shape, limits = reference
    budget = request_memory(shape, 2, 64, 64, 4.0)
    settings = RequestSettings(25, 4.0, 0, 64, 64)
    assert check_request_memory(shape, limits, settings, 2, budget, 4, "test") <= budget
    with pytest.raises(TooLarge) as error:
        check_request_memory(shape, limits, settings, 8, budget, 4, "SLIMDIFF_SERVE_MAX_MEMORY")
    message = str(error.value)
    assert message.startswith("params height=64, width=64 with 8 prompt(s) need about ") and "MiB of working memory" in message
    assert "over this server's limit of" in message and "(SLIMDIFF_SERVE_MAX_MEMORY); at 64x64 at most 2 prompt(s) fit" in message
    tiny = request_memory(shape, 1, 16, 16, 4.0)
    with pytest.raises(TooLarge, match=r"one prompt fits up to 16x16"):
        check_request_memory(shape, limits, settings, 1, tiny, 4, "test")


@pytest.mark.parametrize("text,expected", [("2000000000", 2_000_000_000), ("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30),
                                           ("2G", 2 * 2**30), ("1.5 GB", int(1.5 * 2**30))])
def test_memory_sizes(text, expected):
    assert parse_bytes(text) == expected


def test_bad_memory_size_names_the_setting():
    with pytest.raises(ServingError, match=r"SLIMDIFF_SERVE_MAX_MEMORY must be a size such as 4GiB, 512MiB or a number of bytes, got 'lots'"):
        parse_bytes("lots")


# ---- the generation queue ----------------------------------------------------------------------------------------

LIMITS = Limits(max_prompts=8, max_batch=6, max_prompt_chars=100, max_steps=100, max_guidance=20.0, size_multiple=8,
                min_side=8, max_side=64, max_queue=4, coalesce=True)  # the queue tests: coalescing on (off by default)
S1, S2 = RequestSettings(2, 4.0, 0, 16, 16), RequestSettings(3, 4.0, 0, 16, 16)


class FakeGenerator:
    """Images whose pixel values name (prompt index in the batch, seed); optionally blocks until released."""

    def __init__(self, steps_delay: float = 0.0):
        self.release = threading.Event()
        self.release.set()
        self.steps_delay, self.calls, self.last_step = steps_delay, [], 0

    def __call__(self, jobs, on_step):
        self.release.wait()
        self.calls.append([len(j.prompts) for j in jobs])
        for step in range(1, jobs[0].settings.steps + 1):
            time.sleep(self.steps_delay)
            self.last_step = step
            on_step(step)
        return np.stack([np.full((2, 2, 3), j.settings.seed, np.uint8) for j in jobs for _ in j.prompts])


def run_concurrently(queue, requests):
    results, threads = [None] * len(requests), []

    def one(index, prompts, settings):
        try:
            results[index] = queue.wait(queue.submit(prompts, settings))
        except Exception as error:  # noqa: BLE001
            results[index] = error

    for index, (prompts, settings) in enumerate(requests):
        threads.append(threading.Thread(target=one, args=(index, prompts, settings)))
        threads[-1].start()
    for thread in threads:
        thread.join(60)
    return results


def test_queued_requests_with_equal_settings_run_as_one_batch():
    fake = FakeGenerator()
    fake.release.clear()  # the worker takes the first request and waits: the rest queue up behind it
    queue = GenerationQueue(fake, LIMITS, time_limit=60)
    first = queue.submit(["a"], replace(S1, seed=9))
    while queue.pending:
        time.sleep(0.01)
    requests = [(["b", "c"], replace(S1, seed=1)), (["d"], S2), (["e"], replace(S1, seed=2)), (["f", "g", "h", "i"], S1)]
    jobs = [queue.submit(p, s) for p, s in requests]
    fake.release.set()
    results = [queue.wait(first)] + [queue.wait(job) for job in jobs]
    # first alone (it was running); then the oldest S1 request with every S1 request that fits max_batch 6; S2 apart
    assert fake.calls == [[1], [2, 1], [1], [4]], fake.calls
    assert [r.shape[0] for r in results] == [1, 2, 1, 1, 4]
    assert [int(r[0, 0, 0, 0]) for r in results] == [9, 1, 0, 2, 0]  # each request gets its own images (its seed)


def test_a_batch_waits_briefly_for_requests_sent_back_to_back():
    """Two clients that send their next request as soon as they get an answer would otherwise alternate, one request
    per batch; the batch window (at most batch_wait_s and 5 % of the previous batch's time) lets them meet."""
    fake = FakeGenerator()
    queue = GenerationQueue(fake, replace(LIMITS, batch_wait_s=1.0), time_limit=60)
    queue.last_run_s = 100.0  # window: min(1 s, 5 s)
    first = queue.submit(["a"], S1)
    time.sleep(0.1)  # the worker has taken the first and waits for company
    second = queue.submit(["b"], replace(S1, seed=5))
    assert queue.wait(first).shape[0] == 1 and int(queue.wait(second)[0, 0, 0, 0]) == 5
    assert fake.calls == [[1, 1]]
    queue.last_run_s = 0.0  # no previous batch time: no wait
    queue.wait(queue.submit(["c"], S1))
    assert fake.calls[-1] == [1]


def test_without_coalescing_every_request_is_its_own_batch():
    fake = FakeGenerator()
    fake.release.clear()
    queue = GenerationQueue(fake, replace(LIMITS, coalesce=False), time_limit=60)
    jobs = [queue.submit([p], S1) for p in "abc"]
    fake.release.set()
    for job in jobs:
        queue.wait(job)
    assert fake.calls == [[1], [1], [1]]


def test_a_full_queue_refuses_with_busy():
    fake = FakeGenerator()
    fake.release.clear()
    queue = GenerationQueue(fake, LIMITS, time_limit=60)
    running = queue.submit(["a"], S1)
    while queue.pending:
        time.sleep(0.01)
    waiting = [queue.submit(["b"], S2) for _ in range(LIMITS.max_queue)]
    with pytest.raises(serving.Busy, match=r"server busy: 4 requests are waiting \(limit max_queue 4\); retry later"):
        queue.submit(["c"], S2)
    fake.release.set()
    for job in [running, *waiting]:
        queue.wait(job)


def test_the_time_limit_stops_the_compute_between_steps():
    fake = FakeGenerator(steps_delay=0.02)
    queue = GenerationQueue(fake, LIMITS, time_limit=0.3)
    with pytest.raises(TimeLimit) as error:
        queue.wait(queue.submit(["a"], RequestSettings(100, 4.0, 0, 16, 16)))
    assert str(error.value).startswith("request exceeded the time limit of 0.3 s (SLIMDIFF_SERVE_TIME_LIMIT): waited ")
    assert "stopped after step" in str(error.value) and "of 100; its compute has ended" in str(error.value)
    stopped_at = fake.last_step
    time.sleep(0.3)
    assert stopped_at < 100 and fake.last_step <= stopped_at + 1  # the worker stopped (at most the step under way)
    assert queue.wait(queue.submit(["b"], S1)).shape[0] == 1  # and serves the next request


def test_a_request_that_expires_while_queued_never_runs():
    fake = FakeGenerator()
    fake.release.clear()
    queue = GenerationQueue(fake, LIMITS, time_limit=0.2)
    running = queue.submit(["a"], S1)
    with pytest.raises(TimeLimit, match="it never started"):
        queue.wait(queue.submit(["b"], S2))
    fake.release.set()
    with pytest.raises(TimeLimit):
        queue.wait(running)
    queue.time_limit = 60
    queue.wait(queue.submit(["c"], S1))
    assert fake.calls == [[1], [1]]  # a (stopped at its first step) and c; b was dropped unrun


def test_an_idle_worker_ends_and_the_next_request_starts_one(monkeypatch):
    monkeypatch.setattr(GenerationQueue, "IDLE_EXIT_S", 0.1)
    queue = GenerationQueue(FakeGenerator(), LIMITS, time_limit=60)
    queue.wait(queue.submit(["a"], S1))
    first = queue.worker
    first.join(5)
    assert not first.is_alive() and queue.worker is None
    assert queue.wait(queue.submit(["b"], S1)).shape[0] == 1 and queue.worker is not first


def test_a_failing_batch_fails_its_requests_and_the_worker_lives_on():
    calls = []

    def generate(jobs, on_step):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise IndexError("index 11 is out of bounds for dimension 0 with size 11")
        return np.zeros((sum(len(j.prompts) for j in jobs), 2, 2, 3), np.uint8)

    queue = GenerationQueue(generate, LIMITS, time_limit=60)
    with pytest.raises(RuntimeError, match=r"^generation failed: IndexError: index 11 is out of bounds"):
        queue.wait(queue.submit(["a"], S1))
    assert queue.wait(queue.submit(["b"], S1)).shape == (1, 2, 2, 3)


# ---- the pyfunc on a real (tiny, DPM-Solver) pipeline ------------------------------------------------------------


class TinyModel:
    """A tiny DPM-Solver pipeline saved with slimdiff.save (full widths: what is tested here is serving, not the
    compression); serving.json files for it with given limit overrides, and the pyfunc loaded from them."""

    SAMPLER = {"steps": 3, "guidance": 4.0, "seed": 0, "height": None, "width": None}

    def __init__(self, root: Path):
        from diffusers import DPMSolverMultistepScheduler

        import slimdiff
        from tests.helpers import tiny_sd_pipeline

        self.root = root
        pipe = tiny_sd_pipeline()
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # the scheduler of the issue
        self.folder = slimdiff.save(pipe, root / "pipeline")

    def context(self, sampler: dict | None = None, **overrides):
        document = serving_document(model_shape(self.folder), self.SAMPLER, "float32", "cpu", overrides)
        if sampler is not None:
            document["sampler"] = sampler
        path = self.root / f"serving-{len(list(self.root.glob('serving-*')))}.json"
        path.write_text(json.dumps(document))
        return type("Context", (), {"artifacts": {"pipeline": str(self.folder), "serving": str(path)}, "model_config": {}})()

    def load(self, **overrides) -> serving.SlimDiffPyfunc:
        model = serving.SlimDiffPyfunc()
        model.load_context(self.context(**overrides))
        return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyModel(tmp_path_factory.mktemp("serving"))


def lone(model, prompts, steps=2, seed=1):
    """Images of one request (through the model's queue, like any request)."""
    return model.predict(None, {"prompt": prompts}, params={"steps": steps, "seed": seed})


@pytest.mark.parametrize("coalesce", [True, False])
def test_concurrent_requests_give_the_images_a_lone_request_gives(tiny, monkeypatch, coalesce):
    monkeypatch.setenv("SLIMDIFF_THREADS", "1")
    model = tiny.load(coalesce=coalesce)
    requests = [[PROMPTS[i % 4]] for i in range(8)] + [PROMPTS[:2], PROMPTS[2:]]
    expected = [lone(model, prompts) for prompts in requests]  # one at a time
    results, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def one(index):
        barrier.wait()
        try:
            results[index] = lone(model, requests[index])
        except Exception as error:  # noqa: BLE001
            results[index] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for got, want in zip(results, expected):
        assert isinstance(got, np.ndarray), got
        assert got.shape == want.shape
        if coalesce:  # a batch's float sums differ from a lone request's in the last bit: at most one uint8 level
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        else:  # one request per batch, each its own scheduler run: bitwise the lone image
            assert np.array_equal(got, want)
    batches = model.queue.batches[len(requests):]
    assert sum(batches) == sum(len(r) for r in requests)
    if coalesce:
        assert len(batches) < len(requests), batches  # requests that arrived together ran in shared batches
    else:
        assert sorted(batches) == sorted(len(r) for r in requests), batches  # one batch per request


def test_served_time_limit_and_memory_limit_on_the_real_pipeline(tiny, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("SLIMDIFF_THREADS", "1")
    monkeypatch.setenv("SLIMDIFF_SERVE_TIME_LIMIT", "0.5")
    model = tiny.load(max_steps=900)
    with pytest.raises(MlflowException) as error:
        model.predict(None, {"prompt": PROMPTS}, params={"steps": 900, "height": 32, "width": 32})
    assert error.value.get_http_status_code() == 504 and "of 900; its compute has ended" in error.value.message
    assert lone(model, PROMPTS[:1]).shape == (1, 16, 16, 3)  # the worker serves on

    monkeypatch.delenv("SLIMDIFF_SERVE_TIME_LIMIT")
    budget = request_memory(model_shape(tiny.folder), 2, 16, 16, 4.0)
    monkeypatch.setenv("SLIMDIFF_SERVE_MAX_MEMORY", str(budget))
    model = tiny.load()
    with pytest.raises(MlflowException) as error:
        model.predict(None, {"prompt": PROMPTS}, params={"steps": 2, "height": 32, "width": 32})
    assert error.value.get_http_status_code() == 400 and "over this server's limit of" in error.value.message
    assert "(SLIMDIFF_SERVE_MAX_MEMORY)" in error.value.message
    assert lone(model, PROMPTS[:2]).shape == (2, 16, 16, 3)


def test_the_serving_device_setting(tiny, monkeypatch):
    monkeypatch.setenv("SLIMDIFF_SERVE_DEVICE", "cpu")
    assert str(tiny.load().device) == "cpu"
    monkeypatch.setenv("SLIMDIFF_SERVE_DEVICE", "tpu")
    with pytest.raises(ServingError) as error:
        tiny.load()
    assert str(error.value) == "slimdiff model: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"


def test_a_model_without_its_sampler_fails_to_load_with_one_line(tiny, monkeypatch, capsys):
    context = tiny.context(sampler={"height": None})
    with pytest.raises(ServingError) as error:
        serving.SlimDiffPyfunc().load_context(context)
    assert str(error.value).startswith("slimdiff model: serving.json has no deployment sampler ['steps', 'guidance', 'seed']")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # one line, no chain
    # inside `mlflow models serve` the server exits with that line (a server without its model answers nothing)
    monkeypatch.setenv("__pyfunc_model_path__", str(tiny.folder))
    with pytest.raises(SystemExit) as exited:
        serving.SlimDiffPyfunc().load_context(context)
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimdiff model: serving.json has no deployment sampler"), lines


def test_a_served_flux_model_samples_with_its_true_cfg_and_text_length(tmp_path, monkeypatch):
    """A model captured with true classifier-free guidance and a T5 length (issue 26: the Flux-style reference) is
    served with them: its answer is the pipeline's own image under ``SamplerSettings`` with the same settings (the
    request's ``guidance`` as ``true_cfg_scale``), not an unguided one at FluxPipeline's 512 tokens."""
    import slimdiff
    from slimdiff.runtime.sampling import SamplerSettings
    from tests.helpers import tiny_flux_pipeline

    monkeypatch.setenv("SLIMDIFF_THREADS", "1")
    folder = slimdiff.save(tiny_flux_pipeline(), tmp_path / "pipeline")
    sampler = {"steps": 2, "guidance": 4.0, "seed": 0, "height": 64, "width": 64, "guidance_argument": "true_cfg_scale",
               "max_sequence_length": 12}
    document = serving_document(model_shape(folder), sampler, "float32", "cpu", {})
    (tmp_path / "serving.json").write_text(json.dumps(document))
    context = type("Context", (), {"artifacts": {"pipeline": str(folder), "serving": str(tmp_path / "serving.json")},
                                   "model_config": {}})()
    model = serving.SlimDiffPyfunc()
    model.load_context(context)
    images = model.predict(None, {"prompt": PROMPTS[:2]}, params={"seed": 1})
    pipe = slimdiff.load(folder)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplerSettings(2, 4.0, 64, 64, 1, "true_cfg_scale", 12)
    expected = (np.clip(pipe(**settings.pipe_kwargs(pipe, PROMPTS[:2]), output_type="np").images, 0, 1) * 255).round()
    assert images.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    unguided = replace(settings, guidance_argument="guidance_scale", max_sequence_length=None)
    other = (np.clip(pipe(**unguided.pipe_kwargs(pipe, PROMPTS[:2]), output_type="np").images, 0, 1) * 255).round()
    assert np.abs(images.astype(int) - other.astype(int)).max() > 1  # the settings change the image: they were used
