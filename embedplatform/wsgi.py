"""WSGI entry point; gunicorn imports `application` once per worker, which loads the model."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedplatform.settings")

application = get_wsgi_application()
