"""Capture-statistics memory of three real denoisers, from their published configs (no download, no allocation).

Each denoiser is built on the meta device (shapes only), its compressible groups and hooked input
sites enumerated exactly as ``slimdiff.statistics.recording.capture`` does, and the bytes of the statistics it
would accumulate computed with ``slimdiff.statistics.sums.statistics_bytes`` (tests/test_memory.py checks that
formula against the tensors a real recorder allocates). Writes benchmarks/results/memory.json (with the command, the
machine and the code version), renders its section of docs/memory.md from it and prints the table.

    .venv/bin/python benchmarks/memory_table.py [--buckets 4] [--capacity-gb 80]
    .venv/bin/python benchmarks/memory_table.py --render-only      # re-render the section from memory.json

Configs (hard-coded below; the keys not named keep diffusers' defaults, which equal the published values):
- SD 1.5: the ``unet/config.json`` of stable-diffusion-v1-5 (`tests.helpers.SD15_UNET_CONFIG`, shared by every benchmark).
- SDXL base 1.0: the ``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0.
- PixArt-Sigma XL-2 1024-MS: the ``transformer/config.json`` of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, i.e.
  diffusers' scripts/convert_pixart_sigma_to_diffusers.py at image size 1024 (interpolation_scale 2,
  sample_size 1024 // 8, no micro-conditions).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import provenance, read_results, run_record, write_results, write_sections  # noqa: E402
from slimdiff.arch.sites import sites_for
from slimdiff.statistics.sums import statistics_bytes
from slimdiff.arch import compressible_groups, find_groups
from tests.helpers import SD15_UNET_CONFIG

GIB = 2**30
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
DOC = ROOT / "docs" / "memory.md"
HEADING = "## The capture's statistics at real scale (benchmarks/memory_table.py)"


SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)

PIXART_SIGMA_XL_1024 = dict(
    num_layers=28, num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
    in_channels=4, out_channels=8, patch_size=2, sample_size=128, norm_type="ada_norm_single",
    use_additional_conditions=False, interpolation_scale=2, attention_type="default",
)

MODELS = {
    "SD 1.5 UNet": ("UNet2DConditionModel", SD15_UNET_CONFIG),
    "SDXL base UNet": ("UNet2DConditionModel", SDXL_UNET),
    "PixArt-Sigma XL 1024": ("PixArtTransformer2DModel", PIXART_SIGMA_XL_1024),
}


def build_on_meta(class_name: str, config: dict) -> torch.nn.Module:
    """The denoiser with real shapes and no storage."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    assert next(model.parameters()).is_meta
    return model


def gib(nbytes: int) -> float:
    return round(nbytes / GIB, 2)


def measure(name: str, class_name: str, config: dict, num_buckets: int, capacity_bytes: int) -> dict:
    from diffusers.models.attention import BasicTransformerBlock

    model = build_on_meta(class_name, config)
    params = sum(p.numel() for p in model.parameters())
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in model.modules())
    all_groups = find_groups(model)
    groups = compressible_groups(model)
    sites = sites_for(groups)
    dims = [model.get_submodule(site).in_features for site in sites]

    counts = 8 * num_buckets * len(dims)  # int64 token counts, one per bucket and site, kept on the host
    pooled = statistics_bytes(dims, 1) - 8 * len(dims)  # float64 sum x x^T and sum x
    total = statistics_bytes(dims, num_buckets)
    per_bucket = total - pooled - counts  # float32 per-bucket sums (absent with one bucket)
    # the same split written out, so the formula cannot drift from what this page says it stores
    assert pooled == sum(8 * (d * d + 2 * d) for d in dims)
    assert per_bucket == (0 if num_buckets == 1 else sum(4 * num_buckets * (d * d + d) for d in dims))

    largest_site = max(sites, key=lambda s: model.get_submodule(s).in_features)
    largest_d = model.get_submodule(largest_site).in_features
    weights_fp16 = 2 * params
    need = total + weights_fp16
    return {
        "model": name,
        "class": class_name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": params,
        "weights_fp16_bytes": weights_fp16,
        "transformer_blocks": blocks,
        "groups": len(all_groups),
        "compressible_groups": len(groups),
        "sites": len(sites),
        "site_widths": {str(d): n for d, n in sorted(Counter(dims).items())},
        "statistics_1_bucket_bytes": statistics_bytes(dims, 1),
        "num_buckets": num_buckets,
        "statistics_bytes": total,
        "pooled_float64_bytes": pooled,
        "per_bucket_float32_bytes": per_bucket,
        "count_int64_bytes": counts,
        "largest_site": largest_site,
        "largest_site_d": largest_d,
        "largest_site_bytes": statistics_bytes([largest_d], num_buckets),
        "statistics_plus_weights_bytes": need,
        "capacity_bytes": capacity_bytes,
        "fits": need <= capacity_bytes,
        "margin_bytes": capacity_bytes - need,
    }


def table(rows: list[dict], capacity_gb: float) -> str:
    b = rows[0]["num_buckets"]
    head = ["quantity", *(r["model"] for r in rows)]

    def sizes(key: str) -> list[str]:
        return [f"{gib(r[key]):.2f} GiB" for r in rows]

    lines = [
        ("denoiser parameters", [f"{r['parameters'] / 1e6:,.1f} M" for r in rows]),
        ("fp16 weights", sizes("weights_fp16_bytes")),
        ("transformer blocks", [str(r["transformer_blocks"]) for r in rows]),
        ("hooked sites (compressible groups)", [f"{r['sites']} ({r['compressible_groups']})" for r in rows]),
        ("site input widths d (count)", [", ".join(f"{d} ({n})" for d, n in r["site_widths"].items()) for r in rows]),
        ("statistics, 1 bucket (pooled float64)", sizes("statistics_1_bucket_bytes")),
        (f"statistics, {b} buckets: pooled float64", sizes("pooled_float64_bytes")),
        (f"statistics, {b} buckets: per-bucket float32", sizes("per_bucket_float32_bytes")),
        (f"statistics, {b} buckets: total", [f"**{gib(r['statistics_bytes']):.2f} GiB**" for r in rows]),
        (f"largest site (d, bytes at {b} buckets)",
         [f"{r['largest_site_d']}, {gib(r['largest_site_bytes']):.2f} GiB" for r in rows]),
        (f"statistics ({b} buckets) + fp16 weights", sizes("statistics_plus_weights_bytes")),
        (f"fits in {capacity_gb:g} GB ({gib(rows[0]['capacity_bytes']):.2f} GiB)? margin",
         [f"{'yes' if r['fits'] else 'NO'}, {gib(r['margin_bytes']):+.2f} GiB" for r in rows]),
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join([label, *cells]) + " |" for label, cells in lines]
    return "\n".join(out)


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(results: dict) -> list[tuple[Path, str, str]]:
    rows = results["models"]
    capacity_gb = rows[0]["capacity_bytes"] / 1e9
    b = rows[0]["num_buckets"]
    run = "\n".join(provenance(results))
    one_bucket = sum(r["statistics_1_bucket_bytes"] for r in rows) / sum(r["statistics_bytes"] for r in rows)
    text = f"""{HEADING}

How much memory the statistics of a capture (method.md §2) take for three real denoisers, with
{b} timestep buckets{' (the default)' if b == 4 else ''} and with 1. Computed, not measured: each denoiser is built from its
published config on PyTorch's meta device (real shapes, no storage, no download), its compressible
groups and hooked sites enumerated exactly as `slimdiff.statistics.recording.capture` does, and the bytes summed with
`slimdiff.statistics.sums.statistics_bytes`; `tests/test_memory.py` checks that this formula equals the bytes
of the tensors a real `ActivationRecorder` allocates (seconds, CPU only).

{run}

Configs, hard-coded in the script; the keys not given keep diffusers' defaults:
SD 1.5 from the `unet/config.json` of stable-diffusion-v1-5 (`tests.helpers.SD15_UNET_CONFIG`, shared by every benchmark);
SDXL base 1.0 from the `unet/config.json` of stabilityai/stable-diffusion-xl-base-1.0; PixArt-Sigma
XL-2 1024-MS from the `transformer/config.json` of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, which is
what diffusers' `scripts/convert_pixart_sigma_to_diffusers.py` builds at image size 1024. The
parameter counts reproduce the published ones (SD 1.5 859.5 M, SDXL 2.57 B, PixArt 0.61 B).

### What is stored per site

A *site* is one hooked `nn.Linear` input of width d: per transformer block the self-attention query
input (`attn1.to_q`, shared by QK and VO self), the cross-attention query input (`attn2.to_q`), the text
input (`attn2.to_k`, shared by QK and VO cross) and the feed-forward hidden input (`ff.net.2`, width
4 x block width). For each site:

| part | shape | precision | where | read by |
|---|---|---|---|---|
| pooled sums of x x^T, of x and of abs(x) | (d, d), (d), (d) | float64 | model's device | the decompositions (every group); abs(x): ASVD |
| per-bucket sums of x x^T and of x | ({b}, d, d), ({b}, d) | float32 (float64 for a float64 model) | model's device | only the influence score; absent with 1 bucket |
| token counts | ({b}) | int64 | host | normalisation |

Bytes per site: 8 (d^2 + 2d) + 4 B (d^2 + d) + 8 B for B > 1 buckets, 8 (d^2 + 2d) + 8 for one.

### Table

Byte sizes in GiB (2^30 bytes). Capacity: {capacity_gb:g} GB = {capacity_gb:g} x 10^9 bytes
({gib(rows[0]['capacity_bytes']):.2f} GiB), the conservative reading of an "80 GB" card.

{table(rows, capacity_gb)}

"Statistics + fp16 weights" is only the resident floor of a capture: the activations of a denoiser
call, the per-call float32 Gram matrix being added, the text encoder and VAE, and the sampler's working
memory come on top. The whole-job peak is measured on GPU separately in
[benchmarks-gpu.md](benchmarks-gpu.md). One bucket (`--buckets 1`) keeps only the pooled float64 sums
and cuts the statistics to {one_bucket:.0%} of the {b}-bucket size, at the price of an influence
score that sees the pooled statistics only and cannot weight timestep buckets.

Raw figures: `{results.get('_source', 'benchmarks/results/memory.json')}`; re-render:
`.venv/bin/python benchmarks/memory_table.py --render-only`.
"""
    return [(DOC, HEADING, text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buckets", type=int, default=4, help="timestep buckets (default 4, the capture default)")
    parser.add_argument("--capacity-gb", type=float, default=80.0, help="device memory in GB (10^9 bytes)")
    parser.add_argument("--render-only", action="store_true", help="only re-render the section from the results file")
    args = parser.parse_args(argv)
    if args.render_only:
        results = load(RESULTS)
        if results is None:
            raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
        write_sections(render(results))
        return 0
    capacity = int(args.capacity_gb * 1e9)
    rows = [measure(name, cls, cfg, args.buckets, capacity) for name, (cls, cfg) in MODELS.items()]
    write_results(RESULTS, {**run_record(__file__, argv), "gib": GIB, "models": rows})
    write_sections(render(read_results(RESULTS)))
    print(table(rows, args.capacity_gb))
    print(f"\nwrote {RESULTS} and {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
