"""The model registry: registered names, versions by lineage, the champion, restartable registration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flows.tracking_server import TrackingError, _auth_reason, tracking_uri

# Version tag that makes registration restartable: a version is created with all its tags and
# "pending" in one request, and marked "complete" once its aliases are set. A retry that finds its
# lineage on a "pending" version finishes that version instead of registering a second one.
REGISTRATION_TAG = "registration"


def registered_name(params: dict[str, Any]) -> str:
    """Registry name derived from the base model: ``<prefix>-<model id>`` with unsafe characters replaced."""
    base = str(params["model"].get("id") or Path(params["model"]["path"]).name)
    return f"{params['mlflow']['registered_model_prefix']}-{re.sub(r'[^A-Za-z0-9._-]+', '-', base).strip('-')}"


def champion_of(name: str):
    """The version aliased ``champion`` of ``name`` and its run (``(version, run)``), or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get("champion")
    if version is None:
        return None
    found = client.get_model_version(name, str(version))
    return found, (client.get_run(found.run_id) if found.run_id else None)


def _complete_registration(client, name: str, version: str, passed: bool, description: str = "") -> None:
    """Descriptions (the version's; the registered model's: how to serve it), aliases of a newly registered version
    (``candidate``; ``champion`` when the gate passed), then the mark that registration is complete. Each call is
    idempotent, so a retry may repeat any of them."""
    if description:
        client.update_model_version(name, version, description=description)
    client.update_registered_model(name, description=(
        f"slimdiff-compressed text-to-image pipeline: prompts in (column `prompt`), uint8 images out (N x H x W x 3); "
        f"params steps, guidance, seed, height, width (valid ranges in the model's serving.json). Serve the champion: "
        f"`mlflow models serve -m models:/{name}@champion --env-manager local -p 5001` (docs/serving.md)."))
    client.set_registered_model_alias(name, "candidate", version)
    if passed:
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, REGISTRATION_TAG, "complete")


def registered_versions(name: str) -> list:
    """Every registered version of ``name`` at the current tracking URI; none only when the model is not
    registered yet. Any other registry error (server down, permission, bad answer) is a one-line
    ``TrackingError``: "no versions" would register a duplicate or recompress a known checkpoint."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return list(MlflowClient().search_model_versions(f"name='{name}'"))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":  # the one answer that means "no versions"
            return []
        message = _auth_reason(error) or f"{error.error_code}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"
        raise TrackingError(f"tracking server {mlflow.get_tracking_uri()}: cannot list the versions of {name!r} "
                            f"({message}); the outputs are kept: re-run to retry") from None


def _version_with_lineage(name: str, lineage: dict[str, str], checkpoint_hash: str):
    """A registered version whose stage hashes and checkpoint hash all equal these, if any."""
    for version in registered_versions(name):
        tags = version.tags
        if tags.get("checkpoint_hash") == checkpoint_hash and all(tags.get(f"lineage.{k}") == v for k, v in lineage.items()):
            return version
    return None


def registered_checkpoint_hashes(workspace: Path, params: dict[str, Any]) -> set[str]:
    """Checkpoint hashes already recorded on registered versions of this model."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workspace))
    versions = registered_versions(registered_name(params))
    return {v.tags.get("checkpoint_hash") for v in versions if v.tags.get("checkpoint_hash")}
