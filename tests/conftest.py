import os
import sys
from pathlib import Path

# the test helpers (tests/helpers.py) live outside the installed package: importable as tests.helpers from any runner
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads; one thread keeps timings stable on a busy 2-core machine.
torch.set_num_threads(1)

# Devices the engine tests run on: the CPU always, CUDA where this machine has it. Tests that take the
# ``device`` fixture run once per device; the CUDA runs carry the ``cuda`` marker (``pytest -k cuda``).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES])
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def prefect_api_url():
    """One Prefect server for the test process (temporary database): flows run in-process use it, and flow
    subprocesses get it as ``PREFECT_API_URL``, instead of each starting its own temporary server (~20 s each here)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# Minutes each long module takes on the CI machine (fresh clone, 2 cores, both busy): they start first, longest
# first, each on its own worker, so that no worker is left alone with a long one at the end. Keyed by file name: the
# module's import name is ``test_x`` (tests/ is not a package) or ``tests.test_x``, depending on the import mode
LONGEST_FIRST = {"test_kill_stages": 9.0, "test_flows": 8.0, "test_tracking_auth": 1.5, "test_resume": 1.1}


def _long_minutes(item) -> float:
    return LONGEST_FIRST.get(item.module.__name__.rpartition(".")[2], 0)


def pytest_collection_modifyitems(config, items):
    """The long modules first, longest first (``LONGEST_FIRST``), then other modules with slow tests, then the rest
    (stable order otherwise). With parallel workers (``-n``, one file per worker at a time; ``scripts/test.sh`` passes
    ``--no-loadscope-reorder``, else xdist orders the files by their number of tests instead) the long modules start
    at once instead of last."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (-_long_minutes(item), item.module.__name__ not in slow_modules))
