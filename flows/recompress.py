"""Scheduled recompression: compress a checkpoint only when its content hash is new to the registry.

    python -m flows.recompress [--workspace .]                     # check once now
    python -m flows.recompress --serve [--cron "0 3 * * *"]        # a scheduled Prefect deployment

The checkpoint source is ``recompress.source`` in params.yaml: a local diffusers folder (the model the
pipeline compresses), or ``hub:owner/name@revision`` when online (the revision's commit hash is
the checkpoint hash, and the snapshot is downloaded into the model path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.compress import compress_flow, preflight
from flows.registry import registered_checkpoint_hashes
from flows.tracking import folder_hash


@task(name="checkpoint-hash", task_run_name="checkpoint-hash")
def checkpoint_hash(workspace: str, source: str, model_path: str) -> str:
    """Content hash of the checkpoint; for a hub source, fetch the revision into the model path first."""
    root = Path(workspace)
    if source.startswith("hub:"):
        from huggingface_hub import HfApi, snapshot_download

        repo, _, revision = source[len("hub:"):].partition("@")
        info = HfApi().model_info(repo, revision=revision or None)
        snapshot_download(repo, revision=info.sha, local_dir=root / model_path)
        return str(info.sha)
    path = root / source
    if path.resolve() != (root / model_path).resolve():
        raise ValueError(f"recompress.source {source!r} must be the model path {model_path!r} (or hub:owner/name@revision)")
    return folder_hash(path)


@flow(name="slimdiff-recompress", log_prints=True)
def recompress_flow(workspace: str = ".") -> dict[str, Any]:
    """Run ``compress`` if the checkpoint's content hash has no registered version yet."""
    root = Path(workspace).resolve()
    params = preflight(root, show_memory=False)  # the compress flow, when it runs, prints the memory table
    source = str(params.get("recompress", {}).get("source", params["model"]["path"]))
    digest = checkpoint_hash(str(root), source, str(params["model"]["path"]))
    if digest in registered_checkpoint_hashes(root, params):
        print(f"checkpoint {digest[:12]} already registered; nothing to do")
        return {"compressed": False, "checkpoint_hash": digest}
    result = compress_flow(str(root), checkpoint_hash=digest)
    return {"compressed": True, "checkpoint_hash": digest, **result}


def main(argv: list[str] | None = None) -> int:
    from slimdiff.pipeline.stages import load_params

    parser = argparse.ArgumentParser(prog="python -m flows.recompress", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".")
    parser.add_argument("--serve", action="store_true", help="serve a scheduled deployment (needs a Prefect server for schedules)")
    parser.add_argument("--cron", default=None, help="cron schedule (default: recompress.cron in params.yaml)")
    args = parser.parse_args(argv)
    root = Path(args.workspace).resolve()
    if args.serve:
        cron = args.cron or load_params(root / "params.yaml").get("recompress", {}).get("cron", "0 3 * * *")
        recompress_flow.serve(name="recompress", cron=cron, parameters={"workspace": str(root)})
        return 0
    try:
        result = recompress_flow(str(root))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"recompress: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print("compressed" if result["compressed"] else "unchanged", result["checkpoint_hash"][:12])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
