"""The operators' admin: tenants with their members and keys, plans, API keys, quota periods and
the read-only usage log, one module each. The usage dashboard lives in accounts.dashboard."""

from django.contrib import admin

# Importing them registers their ModelAdmins (Django's autodiscovery imports this package).
from accounts.admin import api_keys, tenants, usage  # noqa: F401

admin.site.site_header = "embedplatform administration"
admin.site.site_title = "embedplatform admin"
admin.site.index_title = "Operations"
# "/" is no page of this service (it serves APIs), so no "View site" link.
admin.site.site_url = None
