# Environment that keeps the stack offline and quiet (source it). Team servers override the URIs.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# Prefect's own client/server loggers and third-party ones stay at WARNING; the flows set Prefect's flow- and task-run
# loggers to INFO themselves (flows.tasks.configure_run_logging), so their lines reach the Prefect UI regardless.
export PREFECT_LOGGING_LEVEL=${PREFECT_LOGGING_LEVEL:-WARNING}
export PREFECT_SERVER_LOGGING_LEVEL=${PREFECT_SERVER_LOGGING_LEVEL:-WARNING}
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
# torch threads of every stage, the MLflow pyfunc and the flows: a whole number, or auto (free cores; docs/tracking.md)
export SLIMDIFF_THREADS=${SLIMDIFF_THREADS:-auto}
