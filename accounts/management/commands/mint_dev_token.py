"""`manage.py mint_dev_token [--email E] [--sub S] [--ttl SECONDS] [--force]`

Prints an HS256 access token signed with SUPABASE_JWT_SECRET, shaped exactly as Supabase Auth
mints them, for trying the API without a Supabase project. On the embedded default (no
SUPABASE_URL, no secret) the secret is the development one generated in DATA_DIR, which the
service started from the same DATA_DIR also uses. Anyone holding the secret can mint tokens for
any user, so the command runs only with DEBUG on, or when told so with --force.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.jwt import mint_token

MAX_TTL_SECONDS = 7 * 24 * 3600


def dev_subject(email: str) -> str:
    """The same e-mail always gets the same Supabase user id, so repeated tokens reach the same
    local user and tenant."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"embedplatform-dev:{email.lower()}"))


class Command(BaseCommand):
    help = "Prints a development access token (HS256, like Supabase's). Needs DEBUG or --force."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", default="dev@example.com")
        parser.add_argument("--sub", default=None, help="Default: derived from the e-mail.")
        parser.add_argument("--ttl", type=int, default=3600, help="Lifetime in seconds.")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Mint even with DEBUG off (the token is as good as a real user's).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not (settings.DEBUG or options["force"]):
            raise CommandError(
                "mint_dev_token refuses to run with DEBUG off: its tokens are as good as a real "
                "user's. Set DEBUG=true for local development, or pass --force."
            )
        if not settings.SUPABASE_JWT_SECRET:
            raise CommandError(
                "SUPABASE_JWT_SECRET is not set, so this service accepts no HS256 tokens to mint."
            )
        ttl = options["ttl"]
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            raise CommandError(f"--ttl must be between 1 and {MAX_TTL_SECONDS} seconds.")
        email = options["email"]
        subject = options["sub"] or dev_subject(email)
        if settings.SUPABASE_URL:
            self.stderr.write(
                f"Signed with the secret of the Supabase project at {settings.SUPABASE_URL}."
            )
        self.stdout.write(mint_token(subject=subject, email=email, lifetime_seconds=ttl))
