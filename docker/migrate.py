"""`manage.py migrate`, one replica at a time.

Several containers started together (`docker compose up --scale embedding-api=3`, a rolling
deploy) would otherwise run the same migrations at once and fail on each other's tables. On
PostgreSQL a session advisory lock makes them take turns; the later ones find nothing to do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedplatform.settings")

# Any 64-bit number, the same in every replica: "embedplatform migrate" in ASCII.
MIGRATION_LOCK_ID = 0x656D62_6D6967


def main() -> None:
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    locked = connection.vendor == "postgresql"
    if locked:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_ID])
    try:
        call_command("migrate", interactive=False, verbosity=1)
    finally:
        if locked:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_ID])


if __name__ == "__main__":
    main()
