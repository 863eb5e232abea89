"""The whole job at FLUX.1-dev width on this CPU, against the memory formula (issue 21).

A ``FluxPipeline`` whose transformer has FLUX.1-dev's widths (hidden 3072 = 24 heads x 128, MLP 12288, guidance
embedding, RoPE axes 16/56/56) at reduced depth (1 double and 1 single block by default), seeded random weights in
bfloat16, tiny text encoders and VAE (tests/helpers.py), goes through the real job: ``python -m flows.compress`` over
the DVC stages into MLflow and the registry, once per budget kind (params, then macs, then latency: DVC re-runs only
what a new budget changes), on the CPU in bfloat16 at 32 px. Each stage's wall time and peak host RSS (the stage
process's own high-water mark, ``VmHWM``) are put beside ``slimdiff.pipeline.memory``'s prediction. Then:

- loading the compressed bfloat16 model: peak host RSS above the process before the load, against the folder's size;
- the score stage's peak RSS as the number of sites grows (the same widths / 4 at 1+1, 2+2 and 4+4 blocks);
- the formula for full FLUX.1-dev and SDXL on one 80 GB GPU with 64 GiB of host RAM: per stage and per worker, with the
  fewest ``capture.site_groups`` that fit.

Measuring writes benchmarks/results/realscale.json (with the command, the machine and the code version); rendering
writes its sections of docs/memory.md from it alone.

    .venv/bin/python benchmarks/realscale.py [--depth 1 1] [--kinds params macs latency] [--workspace /tmp/realscale]
    .venv/bin/python benchmarks/realscale.py --render-only      # re-render the sections from the results file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402
from slimdiff.pipeline.memory import GIB, MemorySettings, fits, footprint, predict

RESULTS = ROOT / "benchmarks" / "results" / "realscale.json"
DOC = ROOT / "docs" / "memory.md"
HEADING = "## The job at FLUX.1-dev width on this CPU, measured against the formula"
HEADING_FULL = "## Predicted: full FLUX.1-dev and SDXL on one 80 GB GPU and 64 GiB of host RAM"
STAGES = ("curate", "capture", "gains", "latency", "score", "allocate", "decompose", "evaluate", "report")
BUDGETS = {"params": 0.3, "macs": 0.8, "latency": 0.9}
HOST_LIMIT = 64 * GIB
DEVICE_LIMIT = 80 * 10**9  # an "80 GB" card


# ---- the model ---------------------------------------------------------------------------------------------------

def realscale_pipeline(depth: tuple[int, int], heads: int = 24, head_dim: int = 128, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16):
    """A FluxPipeline with a transformer at FLUX.1-dev's widths (``heads`` x ``head_dim``, MLP 4x) and ``depth`` =
    (double blocks, single blocks), seeded random weights in ``dtype``; tiny text encoders, VAE and scheduler."""
    from diffusers import FluxTransformer2DModel

    from tests import helpers as testing

    pipe = testing.tiny_flux_pipeline(seed)
    torch.manual_seed(seed + 10)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * testing.TINY_DIT_LATENT_CHANNELS, num_layers=depth[0], num_single_layers=depth[1],
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=testing.TINY_T5_DIM,
        pooled_projection_dim=testing.TINY_CLIP_L_DIM, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if head_dim == 128 else (head_dim // 8, 3 * head_dim // 8, 4 * head_dim // 8),
    ).eval()
    pipe.register_modules(transformer=pipe.transformer)
    return pipe.to(dtype)


def workspace(root: Path, depth: tuple[int, int], heads: int = 24, overrides: dict | None = None) -> Path:
    """A job workspace (tests.helpers.make_workspace) with the real-width pipeline, settings for a CPU rehearsal."""
    from tests import helpers as testing

    if root.exists():
        shutil.rmtree(root)
    settings = {
        "model": {"dtype": "bfloat16", "device": "cpu", "id": "realscale-flux"},
        "curate": {"n": 6},
        "sampler": {"steps": 2, "guidance": 3.5, "height": 32, "width": 32},
        "capture": {"batch_size": 3, "num_buckets": 2},
        "score": {"gain_prompts": 2, "gain_calls": 2, "max_ffn_points": 4},
        "latency": {"points": 4, "repeats": 2},
        "evaluate": {"n": 2, "latency_repeats": 2},
        "report": {"samples": 2},
        **(overrides or {}),
    }
    return testing.make_workspace(root, settings, family="flux", pipeline=realscale_pipeline(depth, heads))


# ---- measuring ---------------------------------------------------------------------------------------------------

def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in (ROOT / "scripts" / "offline-env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            if "${" in value:
                value = value.split(":-", 1)[1].rstrip("}") if ":-" in value else ""
            env.setdefault(key, value)
    env["PREFECT_HOME"] = str(root / ".prefect")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def predicted(root: Path) -> dict[str, dict]:
    """The formula for this workspace's params (as the flow prints it in preflight)."""
    from slimdiff.pipeline.stages import load_params, predict_memory

    previous = os.getcwd()
    os.chdir(root)
    try:
        _, _, stages = predict_memory(load_params("params.yaml"))
    finally:
        os.chdir(previous)
    return {name: memory.to_dict() for name, memory in stages.items()}


def run_job(root: Path, kind: str) -> dict:
    """One flow run with ``allocate.budget_kind = kind``: exit code, wall time, each stage's record and prediction."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["allocate"].update(budget_kind=kind, budget=BUDGETS[kind])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(root / "outputs" / ".resources", ignore_errors=True)
    log = root / f"job-{kind}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", str(root)], cwd=ROOT,
                              env=environment(root), stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    # the next kind's job clears the records: keep this job's, so a later run can collect every job (--finished-job)
    shutil.rmtree(resources(root, kind), ignore_errors=True)
    if (root / "outputs" / ".resources").is_dir():
        shutil.copytree(root / "outputs" / ".resources", resources(root, kind))
    return job_record(root, kind, code, seconds)


def resources(root: Path, kind: str) -> Path:
    """Where the stages' resource records of the ``kind`` job are kept after it ran."""
    return root / f"resources-{kind}"


def job_record(root: Path, kind: str, code: int, seconds: float | None) -> dict:
    """A finished job's record from its workspace: the stages' resource records, the log and the prediction."""
    log = root / f"job-{kind}.log"
    records = {p.stem: json.loads(p.read_text()) for p in sorted(resources(root, kind).glob("*.json"))}
    prediction = predicted(root)
    text = log.read_text(errors="replace")
    ran = next((line for line in text.splitlines() if line.startswith("stages run:")), "")
    registered = next((line for line in text.splitlines() if line.startswith("registered ")), "")
    stages = {}
    for stage in STAGES:
        if stage not in records:
            continue
        host = prediction.get(stage, {}).get("host_bytes")
        stages[stage] = {"seconds": records[stage]["seconds"], "measured_host_bytes": records[stage]["peak_host_bytes"],
                         "predicted_host_bytes": host,
                         "ratio": records[stage]["peak_host_bytes"] / host if host else None,
                         "predicted_terms": prediction.get(stage, {}).get("host_terms")}
    print(f"{kind}: exit {code} in {seconds or 0:.0f} s; {ran}; {registered}", flush=True)
    for stage, row in stages.items():  # a stage the formula does not cover (latency: no model) has no prediction
        print(f"  {stage:<10} {row['seconds']:7.1f} s  measured {row['measured_host_bytes'] / GIB:6.2f} GiB  "
              f"predicted {gib(row['predicted_host_bytes']):>6} GiB  ratio "
              f"{'-' if row['ratio'] is None else format(row['ratio'], '.2f')}", flush=True)
    return {"kind": kind, "budget": BUDGETS[kind], "exit_code": code, "seconds": seconds, "stages_run": ran,
            "registered": registered, "stages": stages, "log_tail": text[-3000:] if code else ""}


MEASURE_LOAD = """
import json, sys, torch
import slimdiff
from slimdiff.pipeline.memory import peak_host_rss

before = peak_host_rss()
pipe = slimdiff.load(sys.argv[1])
# read every tensor once: memory-mapped weights are only counted in RSS when their pages are touched
for module in pipe.components.values():
    if isinstance(module, torch.nn.Module):
        for tensor in [*module.parameters(), *module.buffers()]:
            for chunk in tensor.detach().reshape(-1).split(2**20):
                chunk.float().sum()
peak = peak_host_rss()
print(json.dumps({"before": before, "peak": peak, "dtype": str(pipe.transformer.dtype)}))
"""


def load_peak(folder: Path, env: dict) -> dict:
    """Peak host RSS of ``slimdiff.load`` in a fresh process, above the process before the load."""
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(folder)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    record = json.loads(out)
    files = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    transformer = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
    record.update(files_bytes=files, transformer_bytes=transformer, increase=record["peak"] - record["before"],
                  ratio_to_files=(record["peak"] - record["before"]) / files)
    return record


def sites_scaling(root: Path, depths: list[tuple[int, int]], env: dict) -> list[dict]:
    """The score stage's peak RSS at growing depth (widths / 4, so that the capture of each fits here)."""
    rows = []
    for depth in depths:
        ws = workspace(root / f"sites-{depth[0]}x{depth[1]}", depth, heads=6,
                       overrides={"capture": {"batch_size": 3, "num_buckets": 2}})
        for stage in ("curate", "capture", "gains", "score"):
            subprocess.run([sys.executable, "-m", "slimdiff.pipeline.stages", stage], cwd=ws, env=env, check=True,
                           capture_output=True)
        record = json.loads((ws / "outputs" / ".resources" / "score.json").read_text())
        prediction = predicted(ws)["score"]
        from slimdiff.statistics.sums import open_capture

        capture = open_capture(ws / "outputs" / "capture.safetensors")
        statistics = (ws / "outputs" / "capture.safetensors").stat().st_size
        rows.append({"depth": list(depth), "sites": len(capture.sites), "statistics_bytes": statistics,
                     "score_peak_host_bytes": record["peak_host_bytes"], "predicted_host_bytes": prediction["host_bytes"]})
        print(f"sites: depth {depth}: {len(capture.sites)} sites, statistics {statistics / GIB:.2f} GiB, score peak "
              f"{record['peak_host_bytes'] / GIB:.2f} GiB (predicted {prediction['host_bytes'] / GIB:.2f})", flush=True)
        shutil.rmtree(ws, ignore_errors=True)
    return rows


# ---- full models, from their published configs -------------------------------------------------------------------

def _config_folder(root: Path, index: dict, parts: dict) -> Path:
    """A diffusers folder of configs only: ``parts`` maps a component to an object with ``save_config`` or
    ``save_pretrained`` (configs, tokenizers, schedulers)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name, part in parts.items():
        (root / name).mkdir(exist_ok=True)
        (part.save_config if hasattr(part, "save_config") else part.save_pretrained)(root / name)
    return root


def flux_dev_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    from benchmarks.cost_dit import FLUX_DEV, FLUX_SCHEDULER
    from tests import helpers as testing

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False, sample_size=1024)
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    t5.architectures = ["T5EncoderModel"]
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    return _config_folder(root, index, {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5,
                                        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                                        "tokenizer": testing.char_tokenizer(77), "tokenizer_2": testing.t5_char_tokenizer(512)})


def sdxl_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from benchmarks.memory_table import SDXL_UNET
    from tests import helpers as testing

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=0.13025, sample_size=1024)
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
    index = {"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)
    return _config_folder(root, index, {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
                                        "scheduler": scheduler, "tokenizer": testing.char_tokenizer(77),
                                        "tokenizer_2": testing.char_tokenizer(77)})


def full_model_predictions(root: Path) -> list[dict]:
    """The formula for FLUX.1-dev (bfloat16) and SDXL (float16) on one GPU with usable float64, per worker: the fewest
    site groups with which every stage fits 64 GiB of host RAM and an 80 GB GPU, at 4 buckets and at 1."""
    from slimdiff.runtime.sampling import SamplerSettings

    cases = [("FLUX.1-dev", flux_dev_folder(root / "flux-dev"), SamplerSettings(28, 3.5, 1024, 1024), 2, "bfloat16",
              torch.bfloat16),
             ("SDXL base", sdxl_folder(root / "sdxl"), SamplerSettings(30, 5.0, 1024, 1024), 4, "float16", torch.float16)]
    rows = []
    for name, folder, sampler, batch, stored, dtype in cases:
        fp = footprint(folder, sampler, batch, stored_dtype=stored)
        for buckets in (4, 1):
            for groups in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
                settings = MemorySettings(dtype=dtype, device="cuda", linalg_on_device=True, num_buckets=buckets,
                                          shards=1, site_groups=groups, workers=1)
                stages = predict(fp, settings)
                if not fits(stages, HOST_LIMIT, DEVICE_LIMIT):
                    break
            rows.append({"model": name, "dtype": stored, "sampler": sampler.to_dict(), "capture_batch": batch,
                         "num_buckets": buckets, "site_groups": groups, "fits": not fits(stages, HOST_LIMIT, DEVICE_LIMIT),
                         "parameters": {k: v["params"] for k, v in fp.components.items()},
                         "statistics_sites": len(fp.sites),
                         "stages": {k: v.to_dict() for k, v in stages.items()}})
            print(f"{name}, {buckets} bucket(s): {groups} site group(s); peaks "
                  + ", ".join(f"{k} host {v.host / GIB:.1f} / GPU {v.device / GIB:.1f}" for k, v in stages.items()), flush=True)
    return rows


# ---- the page ----------------------------------------------------------------------------------------------------

def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(result: dict) -> list[tuple[Path, str, str]]:
    """Its sections of docs/memory.md: the measured job (when the run had one) and the full-model prediction."""
    sections = [(DOC, HEADING, section(result))] if result.get("jobs") else []
    return sections + [(DOC, HEADING_FULL, section_full(result))]


def section(result: dict) -> str:
    jobs = result["jobs"]
    rows = []
    for job in jobs:
        for stage, row in job["stages"].items():
            rows.append([job["kind"], stage, f"{row['seconds']:.0f}", gib(row["measured_host_bytes"]),
                         gib(row["predicted_host_bytes"]), f"{row['ratio']:.2f}" if row["ratio"] else "-"])
    worst = max((r["ratio"] for j in jobs for r in j["stages"].values() if r["ratio"]), default=None)
    load = result["load"]
    sites = result["sites"]
    lines = [
        HEADING, "",
        *provenance(result, result.get("machine")), "",
        "A `FluxPipeline` whose transformer has "
        f"FLUX.1-dev's widths (hidden 3072 = 24 heads x 128, MLP 12288, guidance embedding) and {result['depth'][0]} double "
        f"+ {result['depth'][1]} single block(s): {result['transformer_parameters'] / 1e6:,.0f} M parameters, seeded random "
        "bfloat16 weights; tiny text encoders and VAE. The job is the real one (`python -m flows.compress`: preflight with "
        "the printed prediction, the DVC stages, MLflow, the registry) on the CPU in bfloat16 at 32 px, 2 sampler steps, "
        "2 timestep buckets, with the budget kind(s) "
        + ", ".join(f"`{j['kind']}` {j['budget']}" for j in jobs) + " (one job each, DVC re-running only what a new "
        "budget changes; the wall time of each job: " + ", ".join(
            f"{j['kind']} {j['seconds'] / 60:.0f} min" if j["seconds"] else f"{j['kind']} not recorded" for j in jobs)
        + "). *Measured* is the stage "
        "process's own peak RSS (`VmHWM`, not `ru_maxrss`, which Linux carries over from the process that started it; written to `outputs/.resources/<stage>.json`); *predicted* is "
        "`slimdiff.pipeline.memory.predict` for the same params, the figure the flow prints before the capture.", "",
        *([f"Job(s) {', '.join(j['kind'] for j in jobs if j.get('collected'))} ran in an earlier run of this script in "
           "the same workspace (`--finished-job`: the stage records and log are that job's own; its exit code and wall time "
           "as that run printed them).", ""] if any(j.get("collected") for j in jobs) else []),
        "Exit codes: " + ", ".join(f"{j['kind']} {j['exit_code']}" for j in jobs) + ". "
        + ("Every stage's measured peak is at most "
           f"{worst:.2f}x its prediction (goal: at most 1.2x)." if worst else ""), "",
        markdown_table(["budget", "stage", "seconds", "measured peak host RSS (GiB)", "predicted (GiB)", "measured / predicted"],
                       rows), "",
        f"**Loading the compressed model** (`slimdiff.load`, bfloat16, in a fresh process, then every tensor read once so "
        "that memory-mapped pages count): the peak host RSS rose by "
        f"{gib(load['increase'])} GiB for {gib(load['files_bytes'])} GiB of safetensors files "
        f"({load['ratio_to_files']:.2f}x; goal at most 1.2x: no float32 or random copy).", "",
    ]
    if sites:
        first, last = sites[0], sites[-1]
        over = [r for r in sites if r["score_peak_host_bytes"] > r["predicted_host_bytes"]]
        lines += [
            "**The score stage does not grow with the statistics.** The same job at a quarter of the widths (hidden "
            "768, MLP 3072), deeper and deeper:", "",
            markdown_table(["blocks (double + single)", "statistics sites", "capture file (GiB)", "score peak host RSS (GiB)",
                            "predicted (GiB)"],
                           [[f"{r['depth'][0]} + {r['depth'][1]}", r["sites"], gib(r["statistics_bytes"]),
                             gib(r["score_peak_host_bytes"]), gib(r["predicted_host_bytes"])] for r in sites]), "",
            f"From {first['sites']} to {last['sites']} sites the statistics grow "
            f"{last['statistics_bytes'] / first['statistics_bytes']:.1f}x ({gib(first['statistics_bytes'])} -> "
            f"{gib(last['statistics_bytes'])} GiB) and the score stage's peak by "
            f"{gib(last['score_peak_host_bytes'] - first['score_peak_host_bytes'])} GiB; the prediction, which counts the "
            f"model (deeper with the sites) and one site group's statistics at a time, grows by "
            f"{gib(last['predicted_host_bytes'] - first['predicted_host_bytes'])} GiB. "
            + ("Every peak is under its prediction." if not over else
               f"Over its prediction: {', '.join(str(r['sites']) + ' sites' for r in over)}."), "",
        ]
    else:
        lines += ["The score stage at growing depth was not measured in this run (`--sites-depths` empty).", ""]
    return "\n".join(lines)


def section_full(result: dict) -> str:
    rows = []
    for case in result["full_models"]:
        stages = case["stages"]
        peak_host = max(stages.values(), key=lambda s: s["host_bytes"])
        peak_device = max(stages.values(), key=lambda s: s["device_bytes"])
        host_stage = next(k for k, v in stages.items() if v is peak_host)
        device_stage = next(k for k, v in stages.items() if v is peak_device)
        rows.append([case["model"], case["dtype"], case["num_buckets"], case["site_groups"] if case["fits"] else "none fits",
                     f"{gib(peak_host['host_bytes'])} ({host_stage})", f"{gib(peak_device['device_bytes'])} ({device_stage})",
                     gib(stages["capture"]["device_terms"].get("statistics")),
                     gib(stages["score"]["device_terms"].get("decomposition working set"))])
    return "\n".join([
        HEADING_FULL, "",
        *provenance(result, result.get("machine")), "",
        "The same formula, for the published configs (built on the meta device, no "
        "download): FLUX.1-dev in bfloat16 at 1024 px (28 steps, capture batch 2, T5 at 512 tokens), SDXL base in float16 "
        "at 1024 px (30 steps, capture batch 4 with classifier-free guidance). One worker = one GPU with usable float64 "
        "(H100/H200: the decompositions run there) and its host share; a worker holds every pipeline component on the "
        "GPU. The fewest `capture.site_groups` with which every stage fits 64 GiB of host RAM and an 80 GB GPU:", "",
        markdown_table(["model", "dtype", "buckets", "site groups per worker", "peak host RSS, GiB (stage)",
                        "peak GPU memory, GiB (stage)", "capture statistics per worker (GiB)", "score working set (GiB)"],
                       rows), "",
        "The host figures of a GPU job assume the CUDA process base `BASE_HOST['cuda']` (2.5 GiB, not yet measured on a "
        "GPU: `bash benchmarks/gpu/run.sh` records it when a device is lent).", "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs=2, default=(1, 1), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--kinds", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/slimdiff-realscale"))
    parser.add_argument("--sites-depths", type=int, nargs="*", default=[1, 2, 4], help="none: skip the sites scaling")
    parser.add_argument("--finished-job", action="append", default=[], metavar="KIND:EXIT:SECONDS",
                        help="take this budget kind's job from the workspace as a finished run left it (its resource "
                             "records and log; exit code and wall time as that run printed them) instead of running it")
    parser.add_argument("--skip-job", action="store_true", help="only the predictions for full models (seconds)")
    parser.add_argument("--render-only", action="store_true", help="only re-render the sections from the results file")
    args = parser.parse_args(argv)
    if args.render_only:
        result = load(RESULTS)
        if result is None:
            raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
        write_sections(render(result))
        return result
    root = args.workspace
    root.mkdir(parents=True, exist_ok=True)
    result = {**run_record(__file__, argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "depth": list(args.depth)}
    result["full_models"] = full_model_predictions(root / "configs")
    if not args.skip_job:
        finished = {}
        for entry in args.finished_job:
            kind, code, seconds = (entry.split(":") + ["", ""])[:3]
            if not (code.lstrip("-").isdigit() and seconds.replace(".", "", 1).isdigit()):
                parser.error(f"--finished-job {entry}: expected KIND:EXIT:SECONDS, e.g. params:0:3576")
            if kind not in BUDGETS:
                parser.error(f"--finished-job {entry}: kind {kind!r} is not one of {', '.join(BUDGETS)}")
            finished[kind] = (int(code), float(seconds))
        ws = root / "job"
        if not finished:
            ws = workspace(ws, tuple(args.depth))
        for kind in finished:
            if not resources(ws, kind).is_dir():
                parser.error(f"--finished-job {kind}: {resources(ws, kind)} holds no finished job's records")
        result["transformer_parameters"] = sum(p.numel() for p in realscale_pipeline(tuple(args.depth)).transformer.parameters())
        result["jobs"] = [{**job_record(ws, kind, *finished[kind]), "collected": True} if kind in finished
                          else run_job(ws, kind) for kind in args.kinds]
        result["load"] = load_peak(ws / "outputs" / "model", environment(ws))
        print(f"load: +{result['load']['increase'] / GIB:.2f} GiB for {result['load']['files_bytes'] / GIB:.2f} GiB of files",
              flush=True)
        result["sites"] = sites_scaling(root, [(d, d) for d in args.sites_depths], environment(ws)) if args.sites_depths else []
    write_results(RESULTS, result, indent=1)
    write_sections(render(read_results(RESULTS)))
    return result


if __name__ == "__main__":
    main()
