"""`manage.py create_api_key --tenant <id or name> --name <label> [--expires-in-days N]`

Prints the new key once, alone on stdout (so `... > key.txt` keeps just the key); what it is for
goes to stderr. Only a hash is stored: a lost key cannot be shown again, only replaced.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts import services
from accounts.selectors import tenants_named


class Command(BaseCommand):
    help = "Creates an API key for a tenant and prints it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="The tenant's id or exact name.")
        parser.add_argument("--name", required=True, help="What the key is for, e.g. 'ci'.")
        parser.add_argument(
            "--expires-in-days",
            type=int,
            default=None,
            help="Days until the key stops working (default: never).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenants = tenants_named(options["tenant"])
        if not tenants:
            raise CommandError(f"No tenant has the id or name {options['tenant']!r}.")
        if len(tenants) > 1:
            ids = ", ".join(str(tenant.pk) for tenant in tenants)
            raise CommandError(
                f"{len(tenants)} tenants are named {options['tenant']!r} (ids {ids}); "
                "pass --tenant with the id."
            )
        (tenant,) = tenants
        name = options["name"].strip()
        if not name:
            raise CommandError("--name must not be empty.")
        days = options["expires_in_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-in-days must be a positive number of days.")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        api_key, raw_key = services.create_api_key(tenant=tenant, name=name, expires_at=expires_at)
        expiry = f"expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "never expires"
        self.stderr.write(
            f"Created API key {name!r} ({api_key.prefix}) for tenant {tenant.pk} "
            f"{tenant.name!r}; it {expiry}.\n"
            "Store it now: it is not shown again. Send it as 'Authorization: Bearer <key>'."
        )
        if not tenant.is_active:
            self.stderr.write(f"Note: tenant {tenant.pk} is inactive; its keys get 403 until then.")
        self.stdout.write(raw_key)
