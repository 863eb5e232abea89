"""The process a stage, the command line or a served model runs in: offline and quiet defaults."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Telemetry off unless the environment says otherwise, and diffusers' and transformers' loading bars and
    chatter silenced: they would bury slimdiff's own progress bars and one-line errors."""
    for key, value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(key, value)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
