"""Kept only for gunicorn.conf.py's import; the formatter lives in embedplatform.logs. Delete this
module once gunicorn.conf.py sets `logger_class = "embedplatform.logs.GunicornJsonLogger"`."""

from embedplatform.logs import JsonFormatter

__all__ = ["JsonFormatter"]
