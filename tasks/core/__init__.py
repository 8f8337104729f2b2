"""Stage-independent helpers. Nothing here imports Prefect or pandera, so the training core runs on
machines that only have torch and transformers."""
