"""The tracking server: its URI and credentials, checked before any stage; its failures in one line; links to its UI."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI and why."""


@contextmanager
def _tracking_step(uri: str, step: str):
    """Turn an MLflow or connection error during ``step`` into a one-line ``TrackingError`` naming the server.

    Not a silent fallback: the job fails. The outputs stay in the workspace and a re-run retries the
    tracking alone (every stage is up to date); a version this try registered is completed, not duplicated.
    """
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, requests.RequestException) as error:
        reason, unreachable = _failure_reason(error)
        retry = "re-run when the server answers" if unreachable else "re-run to retry"
        raise TrackingError(f"tracking server {uri}: {step} failed ({reason}); the outputs are kept: {retry} "
                            f"(nothing is registered twice)") from None


def _auth_reason(error: BaseException) -> str | None:
    """For a server with authentication that refused this request (MLflow's UNAUTHENTICATED / PERMISSION_DENIED): who
    was refused, in a few words; else None."""
    code = getattr(error, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    try:
        _, who = _credentials()
    except TrackingError as partial:
        return str(partial)
    if code == "UNAUTHENTICATED":
        return f"the server refused the credentials of {who} (HTTP 401)" if who else \
            f"the server requires credentials (HTTP 401): set {USERNAME_ENV} and {PASSWORD_ENV}"
    return f"{who or 'anonymous access'} lacks the permission (HTTP 403)"


def _failure_reason(error: BaseException) -> tuple[str, bool]:
    """(the reason of an MLflow client error in a few words, whether the server did not answer). For a server that
    does not answer: the request and the connection error (MLflow's own message repeats the URL three times); for
    refused credentials, whose; else MLflow's first line."""
    import requests

    refused = _auth_reason(error)
    if refused is not None:
        return refused, False

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, requests.ConnectionError):
            request = getattr(cause, "request", None)
            inner = cause.args[0] if cause.args else cause
            inner = getattr(inner, "reason", inner)  # urllib3's MaxRetryError holds the socket-level reason
            where = f" to {request.method} {request.path_url.split('?')[0]}" if request is not None else ""
            return f"no answer{where}: {inner}", True
        cause = cause.__cause__ or cause.__context__
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (message if len(message) <= 300 else message[:300] + "..."), False


def tracking_uri(workspace: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite database in the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workspace / 'mlflow.db').resolve()}"


def _credentials() -> tuple[dict[str, str], str]:
    """(the Authorization header MLflow's client will send, who it names) from the environment."""
    import base64

    token = os.environ.get(TOKEN_ENV)
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}, f"user {user!r} ({USERNAME_ENV}, {PASSWORD_ENV})"
    if bool(user) != bool(password):
        given, missing = (USERNAME_ENV, PASSWORD_ENV) if user else (PASSWORD_ENV, USERNAME_ENV)
        raise TrackingError(f"{given} is set but {missing} is not: set both for the tracking server's basic auth")
    if token:
        return {"Authorization": f"Bearer {token}"}, f"the token in {TOKEN_ENV}"
    return {}, ""


def check_tracking_uri(uri: str, timeout: float = 15.0) -> None:
    """Fail fast, before any stage runs, when the tracking URI cannot be reached or written, or (a server with
    authentication) refuses the environment's credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``,
    or ``MLFLOW_TRACKING_TOKEN``): an authenticated read of the experiments, before any stage runs. ``timeout``: per
    request; a refused connection fails at once, and a busy server (basic-auth hashes the password on every request)
    may take seconds to answer."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"tracking server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"tracking server {uri} is unreachable ({reason})") from None
        headers, who = _credentials()
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as error:
            if error.code == 401 and not who:
                raise TrackingError(f"tracking server {uri} requires credentials (HTTP 401) and none are set: set "
                                    f"{USERNAME_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV})") from None
            if error.code == 401:
                raise TrackingError(f"tracking server {uri} refused the credentials of {who} (HTTP 401)") from None
            if error.code == 403:
                raise TrackingError(f"tracking server {uri}: {who or 'anonymous access'} may not read experiments "
                                    f"(HTTP 403)") from None
            raise TrackingError(f"tracking server {uri} answered an experiments search with HTTP {error.code} "
                                f"({error.reason})" + (f" to {who}" if who else "")) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"tracking server {uri} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking database folder {folder} does not exist or is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        return
    else:
        raise TrackingError(f"unsupported tracking URI {uri!r}: use http(s)://, sqlite:/// or a local path")


UI_URL_ENV = "SLIMDIFF_MLFLOW_UI_URL"  # where people open the MLflow UI of a local tracking database


def ui_base(uri: str) -> str:
    """The MLflow UI's address: ``SLIMDIFF_MLFLOW_UI_URL`` when set, else the tracking server itself, else (a local
    database) ``mlflow ui``'s default ``http://127.0.0.1:5000``."""
    configured = os.environ.get(UI_URL_ENV, "").strip()
    if configured:
        return configured.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows the run (:func:`ui_base`; README: 'Open the UIs')."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table (MLflow 3 opens a bare experiment link on its GenAI overview)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"
