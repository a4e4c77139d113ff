"""`manage.py revoke_api_key <prefix or key> [...]`: the keys stop working at once (401)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import services
from accounts.selectors import api_key_by_prefix


class Command(BaseCommand):
    help = "Revokes API keys, named by their prefix (as the admin shows it) or in full."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="+", metavar="prefix", help="e.g. emb_1a2b3c4d5e6f")

    def handle(self, *args: Any, **options: Any) -> None:
        found = []
        for value in options["keys"]:
            prefix = services.api_key_prefix(value.strip())
            api_key = api_key_by_prefix(prefix)
            if api_key is None:
                raise CommandError(f"No API key has the prefix {prefix!r}.")
            found.append(api_key)
        for api_key in found:
            already = api_key.is_revoked
            services.revoke_api_key(api_key=api_key)
            state = "was already revoked" if already else "revoked"
            self.stdout.write(
                f"{api_key.prefix} ({api_key.name!r}, tenant {api_key.tenant_id} "
                f"{api_key.tenant.name!r}): {state}."
            )
