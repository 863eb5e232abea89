"""One page writer for every benchmark.

A benchmark measures and writes its results file (``write_results``: the numbers plus ``run_record``: the exact
command, the machine, the code version and the date); its ``render(results)`` turns that file alone into
``(page, heading, markdown)`` sections, and ``write_sections`` puts them into ``docs/`` (``update_section``: only
that section of the page changes). Re-render every page from the committed results files without measuring:

    .venv/bin/python -m benchmarks.pages                 # every benchmark with a results file
    .venv/bin/python -m benchmarks.pages speed_sd15 quality
    .venv/bin/python -m benchmarks.pages --check         # exit 1 when a page differs from its results file
    .venv/bin/python -m benchmarks.pages --list

A benchmark module (listed in ``BENCHMARKS``) provides ``load(path) -> results`` (reads its results file; older files
included), ``render(results) -> list[Section]`` (pure: no torch work, no clock, no machine queries) and optionally
``draw(results) -> list[Path]`` (its plots, drawn from the results alone).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
NOT_RECORDED = "command not recorded"
# environment variables that change what a benchmark measures: recorded as part of its command
COMMAND_ENV_PREFIXES = ("SLIMDIFF_",)

# (page, heading, markdown starting with the heading)
Section = tuple[Path, str, str]


# ---- pages ---------------------------------------------------------------------------------------------------------


def replace_section(current: str, heading: str, text: str) -> str:
    """``current`` with the section that starts with the line ``heading`` replaced by ``text`` (which starts with
    ``heading``), or with ``text`` added: a "# " title section goes first, any other at the end.

    A section runs from its heading to the next "## " heading that is not one of ``text``'s own "## " sub-headings
    (so a page rendered whole, with sub-sections, replaces itself), or to the end. Everything else is kept byte for
    byte."""
    lines = current.splitlines(keepends=True)
    body = text if text.endswith("\n") else text + "\n"
    own = {line for line in body.splitlines() if line.startswith("## ") and line != heading}
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        if heading.startswith("# ") and current:
            return body + ("\n" + current if not body.endswith("\n\n") else current)
        prefix = current if current.endswith("\n") or not current else current + "\n"
        return prefix + ("\n" if prefix and not prefix.endswith("\n\n") else "") + body
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ") and lines[i].rstrip("\n") not in own), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + tail if tail and not body.endswith("\n\n") else tail)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then ``os.replace``)."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_section(path: Path, heading: str, text: str) -> None:
    """Replace the section of ``path`` that starts with the line ``heading`` (up to the next "## " heading that is not
    one of ``text``'s own, or the end), or add it; everything else in the file is kept byte for byte. ``text`` starts
    with ``heading``. Written atomically."""
    path = Path(path)
    current = path.read_text() if path.exists() else ""
    new = replace_section(current, heading, text)
    if new != current or not path.exists():
        write_text(path, new)


def write_sections(sections: Iterable[Section]) -> list[Path]:
    """Write every section into its page (``update_section``, in order); the pages written."""
    pages: list[Path] = []
    for page, heading, text in sections:
        update_section(Path(page), heading, text)
        if Path(page) not in pages:
            pages.append(Path(page))
    return pages


def rendered_pages(sections: Iterable[Section]) -> dict[Path, tuple[str, str]]:
    """Without writing: {page: (its current text, its text with the sections)}."""
    out: dict[Path, tuple[str, str]] = {}
    for page, heading, text in sections:
        page = Path(page)
        if page not in out:
            current = page.read_text() if page.exists() else ""
            out[page] = (current, current)
        out[page] = (out[page][0], replace_section(out[page][1], heading, text))
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def relative(path: Path | str, start: Path = ROOT) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(start))
    except ValueError:
        return str(path)


# ---- results files -------------------------------------------------------------------------------------------------


def source_hash(package: Path = ROOT / "slimdiff") -> str:
    """sha256 over the package's Python source files (relative path and bytes, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(Path(package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version() -> dict[str, Any]:
    """The git commit of this checkout, whether tracked files differ from it, and the hash of slimdiff's source (which
    identifies the code where there is no git, e.g. a copied tree on a device machine)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "slimdiff_source": source_hash()}


def system() -> dict[str, Any]:
    """The machine: CPU model and cores, RAM, the GPU (if torch sees one), torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        ram = None
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "ram_gib": ram, "gpu": None,
                           "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
    except ImportError:
        out["torch"] = None
    return out


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """The command that runs ``script`` with ``argv`` (default: this process's arguments), from the repository root,
    with the SLIMDIFF_* environment variables that were set in front of it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith(COMMAND_ENV_PREFIXES)]
    return " ".join([*env, "python", relative(script), *(shlex.quote(str(a)) for a in argv)])


def run_record(script: str | Path, argv: list[str] | None = None) -> dict[str, Any]:
    """What every results file records: ``command`` (exact, as typed from the repository root), ``system`` (the
    machine), ``code`` (git commit, dirty or not, slimdiff source hash), ``date`` (local ISO time), and ``launcher``
    when a wrapper (benchmarks/gpu/run.sh) started it."""
    record = {"command": command_line(script, argv), "system": system(), "code": code_version(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if os.environ.get("BENCHMARK_LAUNCHER"):
        record["launcher"] = os.environ["BENCHMARK_LAUNCHER"]
    return record


def write_results(path: Path, results: dict, **dumps) -> Path:
    """The results file, written atomically (keys starting with "_" are not saved)."""
    data = {k: v for k, v in results.items() if not k.startswith("_")}
    write_text(Path(path), json.dumps(data, **{"indent": 2, "default": str, **dumps}) + "\n")
    return Path(path)


def read_results(path: Path) -> dict:
    """A JSON results file, with ``_source`` (its path from the repository root) added for the page."""
    results = json.loads(Path(path).read_text())
    results["_source"] = relative(path)
    return results


# ---- what every section says about its numbers ---------------------------------------------------------------------


def _settings(settings: dict | None) -> str:
    if not settings:
        return ""
    skip = ("out", "doc", "plot", "json", "out_json", "out_doc", "from_json", "from_csv", "render", "render_only")
    return "; the settings it records: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()
                                                      if k not in skip and v is not None)


def command_block(results: dict, settings: dict | None = None, predates: str = "recorded commands") -> list[str]:
    """The command that produced ``results`` as a bash block, or the explicit "command not recorded" line (with the
    settings the file does record) for a file written before commands were recorded."""
    command = results.get("command")
    source = results.get("_source", "the results file")
    if not command:
        return [f"Command: {NOT_RECORDED} (file predates {predates}: `{source}`{_settings(settings)})."]
    lines = ["Command:", "", "```bash", command, "```"]
    if results.get("launcher"):
        lines[-1:-1] = [f"# started by: {results['launcher']}"]
    return lines


def machine_text(results: dict, recorded: str | None = None) -> str:
    """One line: the machine (the file's ``system``, else the older ``recorded`` description), the code version and
    the date."""
    s = results.get("system")
    if s:
        gpu = f"GPU {s['gpu']}" + (f" (CUDA {s['cuda']})" if s.get("cuda") else "") if s.get("gpu") else "no GPU"
        ram = f", {s['ram_gib']} GiB RAM" if s.get("ram_gib") else ""
        machine = (f"Machine: {s['cpu']} ({s['cores']} cores, {s['arch']}{ram}), {gpu}; torch {s.get('torch')}, "
                   f"Python {s['python']}.")
    elif recorded:
        machine = f"Machine: {recorded}."
    else:
        machine = "Machine: not recorded."
    code = results.get("code")
    if code:
        commit = f"git `{code['commit'][:12]}`" if code.get("commit") else "no git checkout"
        dirty = " with uncommitted changes" if code.get("dirty") else ""
        version = f" Code: {commit}{dirty}, slimdiff source `{code['slimdiff_source'][:12]}`."
    else:
        version = " Code version: not recorded."
    date = results.get("date")
    return machine + version + (f" Measured {str(date)[:10]}." if date else "")


def provenance(results: dict, recorded_machine: str | None = None, settings: dict | None = None,
               predates: str = "recorded commands") -> list[str]:
    """The command block and the machine line that every rendered section carries."""
    return [*command_block(results, settings, predates), "", machine_text(results, recorded_machine)]


# ---- the benchmarks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str  # from the repository root
    results: str  # its results file, from the repository root

    def module(self) -> ModuleType:
        return load_module(ROOT / self.script)


BENCHMARKS = {b.name: b for b in [
    Benchmark("cost_sd15", "benchmarks/cost_sd15.py", "benchmarks/results/cost_sd15.json"),
    Benchmark("capture_scaling", "benchmarks/capture_scaling.py", "benchmarks/results/capture_scaling.json"),
    Benchmark("cost_dit", "benchmarks/cost_dit.py", "benchmarks/results/cost_dit.json"),
    Benchmark("speed_sd15", "benchmarks/speed_sd15.py", "benchmarks/results/speed.json"),
    Benchmark("quality", "benchmarks/quality.py", "benchmarks/results/quality.json"),
    Benchmark("calibration", "benchmarks/quality.py", "benchmarks/results/calibration.json"),
    Benchmark("macs_vs_params", "benchmarks/macs_vs_params.py", "benchmarks/results/macs_vs_params.json"),
    Benchmark("gains_agreement", "benchmarks/gains_agreement.py", "benchmarks/results/gains_agreement.json"),
    Benchmark("memory_table", "benchmarks/memory_table.py", "benchmarks/results/memory.json"),
    Benchmark("realscale", "benchmarks/realscale.py", "benchmarks/results/realscale.json"),
    Benchmark("reference_repro", "benchmarks/reference_repro.py", "benchmarks/results/reference_repro.json"),
    Benchmark("serve_load", "benchmarks/serve_load.py", "benchmarks/results/serve_load.json"),
    Benchmark("gpu_sd15", "benchmarks/gpu/sd15.py", "benchmarks/results/gpu.json"),
    Benchmark("gpu_job", "benchmarks/gpu/job.py", "benchmarks/results/gpu_job.json"),
    Benchmark("gpu_flux_block", "benchmarks/gpu/flux_block.py", "benchmarks/results/flux_block.json"),
    Benchmark("layout_walk", "benchmarks/layout_walk.py", "benchmarks/results/layout_walk.json"),
    Benchmark("lora_projection", "benchmarks/lora_projection.py", "benchmarks/results/lora_projection.json"),
    Benchmark("lora_projection_flux", "benchmarks/lora_projection.py", "benchmarks/results/lora_projection_flux.json"),
    Benchmark("dit", "benchmarks/dit.py", "benchmarks/results/dit.json"),
]}


def load_module(path: Path) -> ModuleType:
    """A benchmark script as a module (one instance per file, registered under a private name)."""
    path = Path(path).resolve()
    name = "_benchmark_" + relative(path).removesuffix(".py").replace("/", "_").replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def render_benchmark(name: str) -> tuple[list[Section], tuple[ModuleType, dict]] | None:
    """(the sections of benchmark ``name`` from its results file, (its module, the results)), or None when it has no
    results file yet."""
    bench = BENCHMARKS[name]
    module = bench.module()
    results = module.load(ROOT / bench.results)
    if results is None:
        return None
    return module.render(results), (module, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-render the benchmarks' docs pages from their results files "
                                                 "(no measuring).")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--check", action="store_true", help="write nothing; print the diff of every page that "
                        "differs from its results file and exit 1 if any does")
    parser.add_argument("--no-plots", action="store_true", help="leave the plots as they are")
    parser.add_argument("--list", action="store_true", help="list the benchmarks, their scripts and results files")
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS.values():
            earlier = (ROOT / b.results).with_suffix(".csv")
            state = ("" if (ROOT / b.results).exists() else f" (none yet; rows of an earlier run: {relative(earlier)})"
                     if earlier.exists() else " (none yet)")
            print(f"{b.name:<16} {b.script:<32} {b.results}{state}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    differs = False
    for name in args.names or list(BENCHMARKS):
        rendered = render_benchmark(name)
        if rendered is None:
            print(f"{name}: no results file ({BENCHMARKS[name].results}); run {BENCHMARKS[name].script} first")
            continue
        sections, (module, results) = rendered
        if args.check:
            for page, (before, after) in rendered_pages(sections).items():
                if before != after:
                    differs = True
                    sys.stdout.writelines(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                                               relative(page), relative(page) + " (rendered)"))
            continue
        pages = write_sections(sections)
        plots = module.draw(results) if hasattr(module, "draw") and not args.no_plots else []
        print(f"{name}: {', '.join(relative(p) for p in [*pages, *plots])}")
    return 1 if differs else 0


if __name__ == "__main__":
    raise SystemExit(main())
