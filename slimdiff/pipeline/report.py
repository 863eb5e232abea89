"""The report stage: a Markdown summary and a sample grid (original vs compressed, same prompts and seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from slimdiff.files import atomic_path
from slimdiff.pipeline.evaluation import flatten


def _generate(pipe, prompts: Sequence[str], sampler, bar) -> torch.Tensor:
    """The pipeline's images for ``prompts``, one tick of ``bar`` per denoising step (where the pipeline takes a
    step callback)."""
    import inspect

    kwargs = sampler.pipe_kwargs(pipe, prompts)
    if bar is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def tick(_pipe, _step, _timestep, callback_kwargs):
            bar.update(1)
            return callback_kwargs

        kwargs["callback_on_step_end"] = tick
    return pipe(**kwargs, output_type="pt").images


def sample_grid(original, compressed, prompts: Sequence[str], sampler, path: str | Path, scale: int = 4,
                progress: bool = False) -> Path:
    """PNG with two rows, original on top and compressed below, one column per prompt (same seeds). ``progress``:
    a bar over the denoising steps of both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    with torch.inference_mode(), tqdm(total=2 * sampler.num_inference_steps, desc=f"report samples ({len(prompts)} prompts)",
                                      unit="step", disable=not progress) as bar:
        top = _generate(original, prompts, sampler, bar if progress else None)
        bottom = _generate(compressed, prompts, sampler, bar if progress else None)
    cols = len(prompts)
    titles = [_wrap(p) for p in prompts]
    title_lines = max(t.count("\n") + 1 for t in titles)
    # room for every caption in full: 0.1 inch per title line above the two rows of images
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.4 + 0.1 * title_lines), squeeze=False)
    for col, prompt in enumerate(prompts):
        for row, images in enumerate((top, bottom)):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).float().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][col].set_title(titles[col], fontsize=5)
    axes[0][0].set_ylabel("original", fontsize=7)
    axes[1][0].set_ylabel("compressed", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100 * scale // 2)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 24) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)  # whole captions: a cut one would hide what the image was asked to show


def budget_text(plan: dict[str, Any]) -> str:
    """The plan's budget in words ('remove 0.4 of the compressible parameters')."""
    settings = plan["settings"]
    kind, value = settings.get("budget_kind", "params"), settings["budget"]
    if kind == "params":
        return f"remove {value} of the compressible parameters"
    tied = ", QK and VO tied" if settings.get("tie_qk_vo") else ""
    return f"keep {value:.1%} of the {'compressible MACs' if kind == 'macs' else 'measured denoiser latency'}{tied}"


def _latency_lines(plan: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Predicted (latency table) against measured (evaluate stage) denoiser latency."""
    table = plan.get("latency") or {}
    predicted = table.get("predicted_fraction")
    measured = (metrics.get("latency") or {}).get("measured_fraction")
    if predicted is None and measured is None:
        return []
    bound = " at most" if table.get("upper_bound") else ""
    lines = [f"- denoiser latency (fraction of the original) on {table.get('device', 'this machine')}: predicted{bound} "
             + (f"{predicted:.3f}" if predicted is not None else "- (no latency table)")
             + (f", measured {measured:.3f} (x{1 / measured:.2f})" if measured else ", not measured")]
    if table.get("upper_bound"):
        lines.append("  (QK and VO widths differ in some attention: it runs zero-padded to the wider width, which the table "
                     "times, so the prediction is an upper bound)")
    return lines


def markdown(params: dict[str, Any], plan: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The report text: what was compressed, by how much, and how it measures."""
    lines = [
        f"# slimdiff report: {params['model'].get('id', params['model']['path'])}",
        "",
        f"- model: `{params['model']['path']}`",
        f"- budget: {budget_text(plan)}, allocator `{plan['allocator']}`, min kept per module {plan['settings']['min_keep']}",
        f"- compressible parameters: {plan['params']['compressible_before']:,} -> {plan['params']['compressible_after']:,} "
        f"(removed {plan['params']['removed_fraction']:.1%}); predicted error {plan['predicted_error']:.4g}",
        *_latency_lines(plan, metrics),
        "",
        "## Kept width by group",
        "",
        "| group | modules | kept fraction (mean) | params removed |",
        "|---|---|---|---|",
    ]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for module in plan["modules"]:
        kinds.setdefault(module["kind"], []).append(module)
    for kind, modules in kinds.items():
        kept = sum(m["width"] / m["full_width"] for m in modules) / len(modules)
        removed = sum(m["params_before"] - m["params_after"] for m in modules)
        lines.append(f"| {kind} | {len(modules)} | {kept:.2f} | {removed:,} |")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for key, value in flatten(metrics).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        if isinstance(value, (list, tuple)):
            continue
        lines.append(f"| {key} | {value} |")
    lines += ["", "![width plan](width_plan.png)", "", "![samples: original (top) vs compressed (bottom)](samples.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, params: dict[str, Any], plan: dict[str, Any], metrics: dict[str, Any], plan_plot: Path,
                 original, compressed, prompts: Sequence[str], sampler, progress: bool = False) -> Path:
    """Write ``report.md``, ``samples.png`` and a copy of the plan plot into ``out_dir``."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_grid(original, compressed, prompts, sampler, out_dir / "samples.png", progress=progress)
    with atomic_path(out_dir / "width_plan.png") as tmp:
        shutil.copyfile(plan_plot, tmp)
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(markdown(params, plan, metrics))
    return report
