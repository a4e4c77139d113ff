"""The embeddings app; a serving process that gunicorn does not start is told to serve here."""

from __future__ import annotations

import os
import sys

from django.apps import AppConfig


def serves_without_gunicorn(argv: list[str] | None = None) -> bool:
    """Whether this process serves requests through something other than gunicorn (whose workers
    start from its `post_worker_init` hook): a server that says so with EMBEDPLATFORM_SERVING=1,
    or the child of `manage.py runserver` that serves (its autoreloader parent only watches files).
    """
    if os.environ.get("EMBEDPLATFORM_SERVING") == "1":
        return True
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and os.path.basename(argv[0]) == "manage.py" and argv[1] == "runserver":
        return "--noreload" in argv or os.environ.get("RUN_MAIN") == "true"
    return False


class EmbeddingsConfig(AppConfig):
    name = "embeddings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from embeddings import token_inputs  # noqa: F401  # registers its system check

        if serves_without_gunicorn():
            from embedplatform.serving import start_serving_process

            start_serving_process()
