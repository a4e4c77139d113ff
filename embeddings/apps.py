"""Loads the model once per serving process, when Django starts."""

from __future__ import annotations

import os
import sys

from django.apps import AppConfig
from django.conf import settings

# Commands that serve requests; every other management command (migrate, check, shell, ...)
# starts without paying for a model load.
SERVING_COMMANDS = {"runserver"}


def is_serving_process(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    if os.environ.get("EMBEDPLATFORM_SERVING") == "1":  # set by gunicorn.conf.py
        return True
    program = os.path.basename(argv[0]) if argv else ""
    if "gunicorn" in program:
        return True
    if program == "manage.py" and len(argv) > 1 and argv[1] in SERVING_COMMANDS:
        # runserver's autoreloader parent only watches files; its child (RUN_MAIN) serves.
        return "--noreload" in argv or os.environ.get("RUN_MAIN") == "true"
    return False


class EmbeddingsConfig(AppConfig):
    name = "embeddings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from embeddings import token_inputs  # registers its system check

        if is_serving_process():
            token_inputs.prepare()
        if settings.MODEL_LOAD_ON_START and is_serving_process():
            from embeddings.runtime import ensure_loaded

            # A failure propagates: a worker without its model must not serve.
            ensure_loaded()
