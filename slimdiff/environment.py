"""The process a stage, the command line or a served model runs in: offline and quiet defaults."""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """Telemetry off unless the environment says otherwise, and diffusers' and transformers' loading bars and
    chatter silenced: they would bury slimdiff's own progress bars and one-line errors.

    Cheap: the verbosity goes through the libraries' environment variables (read when they are first imported, in
    this process and the ones it starts), and the calls below reach only libraries already imported; the pipeline
    loaders call this again after importing diffusers. Importing diffusers just to silence it costs ~3 s a process.
    """
    for key, value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("DO_NOT_TRACK", "true"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        logging = sys.modules.get(name)
        if logging is not None:
            logging.set_verbosity_error()
            logging.disable_progress_bar()
