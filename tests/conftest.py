import os

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
