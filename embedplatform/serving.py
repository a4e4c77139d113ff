"""What a process does once before it serves requests, whichever server runs it.

gunicorn calls `start_serving_process()` from its `post_worker_init` hook (gunicorn.conf.py), in
each worker after Django is set up; `manage.py runserver`'s serving child and any other server
that sets EMBEDPLATFORM_SERVING=1 get it from the embeddings app's `ready()`. Every other process
(migrate, check, shell, the tests) serves nothing and pays for none of it.
"""

from __future__ import annotations

import threading

from django.conf import settings

_started = False
_lock = threading.Lock()


def start_serving_process() -> None:
    """Says the configuration warnings, prepares token-id input and, with MODEL_LOAD_ON_START,
    loads the model (logging `model_loaded_successfully`). Once per process; a failure
    propagates, since a worker without its model or encoding must not serve."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    from embeddings import token_inputs
    from embeddings.runtime import ensure_loaded
    from embedplatform.checks import log_configuration_warnings

    # gunicorn runs no system checks: a serving process says the warnings in its log.
    log_configuration_warnings()
    token_inputs.prepare()
    if settings.MODEL_LOAD_ON_START:
        ensure_loaded()
