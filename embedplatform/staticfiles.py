"""Static files (admin, browsable API, Swagger UI, ReDoc) served by the app itself, DEBUG or not.

WhiteNoise serves collectstatic's STATIC_ROOT when there is one and, with WHITENOISE_USE_FINDERS,
the apps' own static folders, so a plain checkout (the tests, a gunicorn started without
collectstatic) serves the same files.
"""

from __future__ import annotations

import os

from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    def add_files(self, root: str, prefix: str | None = None) -> None:
        # WhiteNoise warns about a missing STATIC_ROOT; without collectstatic that is expected.
        if os.path.isdir(root):
            super().add_files(root, prefix)
