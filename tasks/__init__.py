"""The pipeline's stages. Each `tasks/<stage>.py` holds a plain function that does the work and a
thin Prefect `@task` wrapper; `tasks/core/` holds what stages share and never imports Prefect."""
