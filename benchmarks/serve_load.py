"""Load on the served model (issue 24): a real ``mlflow models serve`` of the compressed reference model on a loopback
port, 1, 2, 4 and 8 concurrent clients for a bounded time each, hostile requests mixed in; coalescing of requests on
and off side by side (one server each); and the working memory a request needs against ``request_memory``.

For each server and client count: valid images answered per second, p50/p95 latency, peak RSS of the server, failed
valid requests, wrong answers (an image that differs from the one a lone request gets: bitwise, and the largest
difference in uint8 levels) and hostile requests answered (each must get its 4xx and leave the server alive).

Measuring writes benchmarks/results/serve_load.json (each part with the command, the machine and the code version
that measured it: a part skipped by --skip-memory / --skip-load keeps the previous file's); rendering writes two
sections of docs/serving.md from it alone (the rest of the page is written by hand):

    .venv/bin/python benchmarks/serve_load.py [--model outputs/model] [--seconds 20] [--clients 1 2 4 8] [--threads 1]
                                              [--skip-memory] [--skip-load]
    .venv/bin/python benchmarks/serve_load.py --render-only

Without ``--model`` (or when it does not exist) the reference model is compressed first (budget 0.4, 64 calibration
prompts from the caption pool, the deployment sampler of params.yaml): a stand-in for ``outputs/model`` that takes a
minute instead of the main job's twenty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402

PAGE = ROOT / "docs" / "serving.md"
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
MEMORY_HEADING = "## Memory prediction (benchmarks/serve_load.py)"
LOAD_HEADING = "## Load (benchmarks/serve_load.py)"
NAME = "slimdiff-reference"
BIN = Path(sys.executable).parent
# (prompts, side, guidance) of the memory measurement: the served range of the reference model (8..64 px) and beyond
MEMORY_GRID = [(1, 32, 4.0), (8, 32, 4.0), (16, 32, 4.0), (1, 64, 4.0), (8, 64, 4.0), (1, 128, 4.0), (4, 128, 4.0),
               (1, 256, 1.0), (1, 256, 4.0), (4, 256, 4.0), (1, 512, 4.0)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- the model --------------------------------------------------------------------------------------------------------


def params_yaml() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def compressed_reference(work: Path, prompts: int) -> Path:
    """The reference model compressed like the main job does (budget 0.4), on ``prompts`` calibration prompts."""
    import slimdiff
    from slimdiff.compress import SlimDiffConfig, compress_pipeline
    from slimdiff.runtime.sampling import SamplerSettings

    params = params_yaml()
    captions = [json.loads(line)["caption"] for line in (ROOT / "data" / "reference" / "captions.jsonl").read_text().splitlines()]
    sampler = SamplerSettings(int(params["sampler"]["steps"]), float(params["sampler"]["guidance"]), seed=0)
    pipe = slimdiff.load_pipeline(str(ROOT / "data" / "reference" / "model"), device="cpu", dtype="float32")
    start = time.perf_counter()
    result = compress_pipeline(pipe, captions[:prompts], SlimDiffConfig(budget=float(params["allocate"]["budget"]),
                                                                        batch_size=16), sampler, progress=False)
    folder = slimdiff.save(pipe, work / "model", result.info("reference"),
                           full_widths={m.name: m.full_width for m in result.plan.modules})
    print(f"compressed the reference model on {prompts} prompts in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def register(folder: Path, work: Path) -> str:
    """Log ``folder`` with the job's own function, register it and alias it champion; returns the tracking URI."""
    import mlflow
    from mlflow import MlflowClient

    from flows.model_logging import log_pipeline_model

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve-load", artifact_location=(work / "artifacts").as_uri())
    params = params_yaml()
    with mlflow.start_run(experiment_id=experiment):
        info = log_pipeline_model(folder, {"sampler": params["sampler"], "model": params["model"]}, ROOT)
    version = mlflow.register_model(info.model_uri, NAME).version
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return uri


# ---- the server -------------------------------------------------------------------------------------------------------


class Server:
    """``mlflow models serve -m models:/slimdiff-reference@champion --env-manager local`` on a loopback port."""

    def __init__(self, uri: str, work: Path, env: dict[str, str], label: str):
        self.port = free_port()
        self.log = work / f"serve-{label}.log"
        full = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MLFLOW_TRACKING_URI=uri,
                    MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", **env)
        start = time.monotonic()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(self.port)], cwd=work, env=full, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not self.alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.ready_s = time.monotonic() - start

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=10) as response:
                return response.status == 200
        except OSError:
            return False

    def post(self, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError as error:
            return 0, str(error).encode()

    def invoke(self, prompts: list[str], params: dict) -> tuple[int, bytes]:
        return self.post(json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]},
                                     "params": params}).encode())

    def model_rss(self) -> int:
        """Resident bytes of the process that holds the model (uvicorn, the largest in the server's tree)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return max(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)


def images(answer: bytes) -> np.ndarray:
    return np.asarray(json.loads(answer)["predictions"], dtype=np.uint8)


def hostile_requests(budget_case: tuple[int, int]) -> list[tuple[str, bytes, int]]:
    """(what, body, expected status) of requests a server must refuse before any work."""
    def body(prompts, params):
        return json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]}, "params": params}).encode()

    prompts, side = budget_case
    return [
        ("100000 x 100000 px", body(["a red circle"], {"height": 100000, "width": 100000}), 400),
        ("a billion steps", body(["a red circle"], {"steps": 1_000_000_000}), 400),
        ("100 prompts", body(["a red circle"] * 100, {}), 400),
        ("unknown param", body(["a red circle"], {"stpes": 5}), 400),
        ("negative seed", body(["a red circle"], {"seed": -1}), 400),
        ("guidance 1e9", body(["a red circle"], {"guidance": 1e9}), 400),
        ("a 1 MB prompt", body(["x" * 1_000_000], {}), 400),
        ("malformed JSON", b'{"dataframe_split": {"columns": ["prompt"], "data": [["a', 400),
        (f"{prompts} prompts at {side} px (over the memory limit)", body(["a red circle"] * prompts, {"height": side, "width": side}), 400),
    ]


def run_level(server: Server, clients: int, seconds: float, pool: list, lone: dict, hostile: list) -> dict:
    """``clients`` threads sending valid requests from ``pool`` for ``seconds`` (at most 200 each), one thread cycling
    through ``hostile`` requests; each answer checked against ``lone``; the server's RSS sampled throughout."""
    stop_at = time.monotonic() + seconds
    records, hostile_log, peak = [], [], [server.model_rss()]
    lock = threading.Lock()
    done = threading.Event()

    def client(index: int) -> None:
        for n in range(200):
            if time.monotonic() >= stop_at:
                return
            key = pool[(index * 7 + n) % len(pool)]
            begin = time.monotonic()
            status, answer = server.invoke([key[0]], {"seed": key[1]})
            latency = time.monotonic() - begin
            with lock:
                records.append((key, status, latency, answer))

    def attacker() -> None:
        for n in range(1000):
            if time.monotonic() >= stop_at:
                return
            what, body, expected = hostile[n % len(hostile)]
            status, answer = server.post(body)
            hostile_log.append((what, status, expected, server.alive(), answer[-300:]))
            time.sleep(0.5)

    def sampler() -> None:
        while not done.is_set():
            peak.append(server.model_rss())
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=attacker)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - begin
    done.set()
    watcher.join()
    ok = [(key, latency, answer) for key, status, latency, answer in records if status == 200]
    failed = [(status, answer[-300:]) for _, status, _, answer in records if status != 200]
    differ, wrong, worst = 0, 0, 0
    for key, _, answer in ok:
        got, want = images(answer), lone[key]
        gap = int(np.abs(got.astype(int) - want.astype(int)).max()) if got.shape == want.shape else 255
        differ += gap > 0
        wrong += gap > 1
        worst = max(worst, gap)
    latencies = sorted(latency for _, latency, _ in ok)
    refused = [h for h in hostile_log if h[1] == h[2] and h[3]]
    return {"clients": clients, "wall_s": wall, "valid": len(records), "ok": len(ok), "failed": len(failed),
            "failures": failed[:3], "differ": differ, "wrong": wrong, "max_diff": worst,
            "images_per_s": len(ok) / wall if wall else 0.0,
            "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))] if latencies else float("nan"),
            "peak_rss_mib": max(peak) / 2**20, "hostile": len(hostile_log), "hostile_refused": len(refused),
            "hostile_unexpected": [h for h in hostile_log if not (h[1] == h[2] and h[3])][:3]}


def load_benchmark(model: Path, work: Path, seconds: float, levels: list[int], threads: int) -> dict:
    from slimdiff.runtime.requests import model_shape, request_memory

    uri = register(model, work)
    params = params_yaml()["sampler"]
    shape = model_shape(model)
    native = shape.native_size[0]
    memory = request_memory(shape, 16, native, native, float(params["guidance"]))  # a full coalesced batch fits
    over = (8, 2 * native)  # 8 prompts at twice the native size (the largest valid size): over it
    assert request_memory(shape, over[0], over[1], over[1], float(params["guidance"])) > memory
    captions = [json.loads(line)["caption"] for line in (ROOT / "data" / "reference" / "eval_prompts.jsonl").read_text().splitlines()]
    pool = [(captions[i], 1 + i % 3) for i in range(8)]  # 8 distinct (prompt, seed)
    results = {}
    for coalesce in ("on", "off"):
        server = Server(uri, work, {"SLIMDIFF_THREADS": str(threads), "SLIMDIFF_SERVE_COALESCE": coalesce,
                                    "SLIMDIFF_SERVE_MAX_MEMORY": str(memory)}, coalesce)
        try:
            lone = {}
            for key in pool:  # the image each (prompt, seed) gets alone
                status, answer = server.invoke([key[0]], {"seed": key[1]})
                assert status == 200, answer[-500:]
                lone[key] = images(answer)
            rows = []
            for clients in levels:
                row = run_level(server, clients, seconds, pool, lone, hostile_requests(over))
                rows.append(row)
                print(f"coalesce {coalesce}, {clients} client(s): {row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                      f"p95 {row['p95_s']:.2f} s, {row['ok']}/{row['valid']} ok, {row['differ']} not bitwise the lone image, "
                      f"{row['wrong']} off by more than one level (max diff {row['max_diff']}), "
                      f"hostile {row['hostile_refused']}/{row['hostile']} refused with the server alive, "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB" + (f"; failures {row['failures']}" if row["failures"] else "")
                      + (f"; unexpected hostile answers {row['hostile_unexpected']}" if row["hostile_unexpected"] else ""))
            results[coalesce] = {"ready_s": server.ready_s, "rows": rows, "alive": server.alive()}
        finally:
            server.stop()
    return {"servers": results, "seconds": seconds, "threads": threads, "memory_limit": memory, "over": list(over),
            "pool": len(pool), "loadavg_end": list(os.getloadavg())}


def render_load(part: dict) -> str:
    results, seconds, threads, memory, over = part["servers"], part["seconds"], part["threads"], part["memory_limit"], part["over"]
    header = ["coalescing", "clients", "images/s", "p50 latency", "p95 latency", "valid requests ok", "failed",
              "not bitwise the lone image", "wrong (> 1 level)", "hostile refused, server alive", "peak RSS"]
    rows = []
    for coalesce, result in results.items():
        for row in result["rows"]:
            rows.append([coalesce, row["clients"], f"{row['images_per_s']:.2f}", f"{row['p50_s']:.2f} s", f"{row['p95_s']:.2f} s",
                         f"{row['ok']}/{row['valid']}", row["failed"], f"{row['differ']} (max {row['max_diff']} level)",
                         row["wrong"],
                         f"{row['hostile_refused']}/{row['hostile']}", f"{row['peak_rss_mib']:.0f} MiB"])
    one = {c: r["rows"][0]["images_per_s"] for c, r in results.items() if r["rows"]}
    eight = {c: r["rows"][-1]["images_per_s"] for c, r in results.items() if r["rows"]}
    lines = [LOAD_HEADING, "", *provenance(part, part.get("machine")), "",
             f"A real `mlflow models serve -m models:/{NAME}@champion --env-manager local` "
             f"of the compressed reference model on a loopback port, `SLIMDIFF_THREADS={threads}`, "
             f"`SLIMDIFF_SERVE_MAX_MEMORY={memory}` (a full coalesced batch of 16 prompts at the native size fits; "
             f"{over[0]} prompts at {over[1]} px do not), one server with coalescing on and one with it off. Each row: "
             f"that many clients sending one-prompt requests at the deployment sampler back to back for {seconds:g} s "
             f"({part['pool']} distinct prompt/seed pairs), plus one client sending a hostile request every 0.5 s (a "
             "100000 px side, a billion steps, 100 prompts, an unknown param, a negative seed, guidance 1e9, a 1 MB "
             "prompt, malformed JSON, a request over the memory limit). Every answer is compared with the image the same "
             "request gets alone: \"not bitwise\" counts answers that differ at all (a coalesced batch's float sums "
             "differ from a lone request's in the last bit: the UNet alone differs by ~1e-6 between batch 1 and 4), with "
             "the largest difference in uint8 levels; \"wrong\" counts answers off by more than one level. The machine "
             "was shared with other jobs while measuring (load average below), so the times are noisy; the counts are not.",
             "", markdown_table(header, rows), ""]
    for coalesce in results:
        if coalesce in one and one[coalesce]:
            lines.append(f"- coalescing {coalesce}: 8 clients {eight[coalesce]:.2f} images/s vs 1 client {one[coalesce]:.2f} "
                         f"(x{eight[coalesce] / one[coalesce]:.2f}); server ready {results[coalesce]['ready_s']:.0f} s after "
                         f"start; alive at the end: {results[coalesce]['alive']}")
    lines.append("- fewer hostile requests at 8 clients: MLflow's server runs each `predict` in asyncio's default thread "
                 "pool (6 threads on 2 cores) and a request waiting for the worker holds its thread, so a hostile request "
                 "waits for a free thread before it is refused (`/ping` answers throughout)")
    lines.append(f"- load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in part['loadavg_end'])}")
    return "\n".join(lines) + "\n"


# ---- memory -----------------------------------------------------------------------------------------------------------


def measure_one(model: str, prompts: int, side: int, guidance: float) -> None:
    """(subprocess) Peak RSS above the loaded model of one pipeline call: prints JSON."""
    import torch

    import slimdiff
    from slimdiff.runtime.sampling import SamplerSettings

    torch.set_num_threads(1)
    pipe = slimdiff.load(model)
    pipe.set_progress_bar_config(disable=True)
    pipe(**SamplerSettings(1, guidance, 8, 8, 0).pipe_kwargs(pipe, ["warm-up"]), output_type="np")  # lazy initialisation

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    # the peak RSS so far is the load's (slimdiff.load verifies and assigns every file): reset it to the current RSS
    # (Linux >= 4.0), so that VmHWM after the call is the call's own peak
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    pipe(**SamplerSettings(2, guidance, side, side, 0).pipe_kwargs(pipe, ["a red circle at the top left"] * prompts),
         output_type="np")
    print(json.dumps({"delta": status("VmHWM") - before}))


def memory_benchmark(model: Path) -> dict:
    from slimdiff.runtime.requests import (
        MEMORY_FACTOR,
        MEMORY_OVERHEAD,
        model_shape,
        request_memory,
    )

    shape = model_shape(model)
    rows = []
    for prompts, side, guidance in MEMORY_GRID:
        out = subprocess.run([sys.executable, __file__, "--measure-one", str(model), str(prompts), str(side), str(guidance)],
                             capture_output=True, text=True, check=True, env=dict(os.environ, SLIMDIFF_THREADS="1"))
        measured = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
        predicted = request_memory(shape, prompts, side, side, guidance)
        counted = (predicted - MEMORY_OVERHEAD) / MEMORY_FACTOR
        rows.append({"prompts": prompts, "side": side, "guidance": guidance, "measured_bytes": measured,
                     "counted_bytes": counted, "predicted_bytes": predicted})
        print(f"memory: {prompts} prompt(s) {side} px guidance {guidance:g}: measured {measured / 2**20:.1f} MiB, "
              f"predicted {predicted / 2**20:.0f} MiB")
    return {"rows": rows, "factor": MEMORY_FACTOR, "overhead_bytes": MEMORY_OVERHEAD}


def render_memory(part: dict) -> str:
    rows = [[r["prompts"], f"{r['side']}x{r['side']}", f"{r['guidance']:g}", f"{r['measured_bytes'] / 2**20:.1f} MiB",
             f"{r['counted_bytes'] / 2**20:.1f} MiB", f"{r['measured_bytes'] / r['counted_bytes']:.2f}",
             f"{r['predicted_bytes'] / 2**20:.0f} MiB", "yes" if r["predicted_bytes"] >= r["measured_bytes"] else "**no**"]
            for r in part["rows"]]
    header = ["prompts", "size", "guidance", "measured peak RSS above the model", "counted activations", "measured / counted",
              f"predicted (x{part['factor']:g} + {part['overhead_bytes'] // 2**20} MiB)", "covered"]
    return "\n".join([
        MEMORY_HEADING, "", *provenance(part, part.get("machine")), "",
        "Each row is a "
        "fresh process: the served model loaded, one warm-up call at 8 px, the peak RSS reset (`/proc/self/clear_refs`), "
        "then one call of 2 steps; \"measured\" is the process's peak RSS during the call (`VmHWM`) minus its RSS before "
        "it (what the OOM killer counts; the number of steps does not change it). \"counted\" is what "
        "`slimdiff.runtime.requests.request_memory` counts from the component configs before its factor.",
        "", markdown_table(header, rows), ""]) + "\n"


def machine() -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"the project's {cores}-core CPU box ({platform.processor() or platform.machine()}, {memory:.0f} GiB RAM, no GPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "outputs" / "model", help="compressed model folder")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="SLIMDIFF_THREADS of the server")
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--measure-one", nargs=4, metavar=("MODEL", "PROMPTS", "SIDE", "GUIDANCE"), help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="only re-render the two sections from the results file")
    args = parser.parse_args(argv)
    if args.measure_one:
        model, prompts, side, guidance = args.measure_one
        measure_one(model, int(prompts), int(side), float(guidance))
        return 0
    if args.render_only:
        results = load(RESULTS)
        if results is None:
            raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
        write_sections(render(results))
        return 0
    from slimdiff.device import apply_threads

    apply_threads(args.threads)
    record = {**run_record(__file__, argv), "machine": machine()}
    previous = load(RESULTS) or {}
    results = {**record, "memory": previous.get("memory"), "load": previous.get("load")}  # a skipped part stays as it was
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        work = Path(scratch)
        model = args.model if (args.model / "model_index.json").is_file() else compressed_reference(work, args.calibration_prompts)
        if not args.skip_memory:
            results["memory"] = {**record, **memory_benchmark(model)}
        if not args.skip_load:
            results["load"] = {**record, **load_benchmark(model, work, args.seconds, args.clients, args.threads)}
    write_results(RESULTS, {k: v for k, v in results.items() if v is not None})
    write_sections(render(read_results(RESULTS)))
    print(f"wrote {RESULTS} and {PAGE}")
    return 0


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(results: dict) -> list[tuple[Path, str, str]]:
    """Its two sections of docs/serving.md, each with the command that measured it."""
    sections = []
    if results.get("memory"):
        sections.append((PAGE, MEMORY_HEADING, render_memory(results["memory"])))
    if results.get("load"):
        sections.append((PAGE, LOAD_HEADING, render_load(results["load"])))
    return sections


if __name__ == "__main__":
    raise SystemExit(main())
