"""The WSGI handler: bearer-authenticated API calls skip the middleware only browsers need.

A call with a bearer credential is authenticated by that credential alone (the session class
comes last in DRF's list and is never reached, see accounts/authentication.py), is not
forgeable cross-site (a browser cannot attach the header without a CORS preflight), and never
logs in, so sessions, CSRF, Django's user, messages, axes and static files have nothing to do
for it. Measured in-process with `bench/request_cpu.py --clients 16`, skipping them cut a
metered 1-text request thread's CPU by 13-24% (in the service it is within the noise: README,
Metering). Everything else (request ids, logs, CORS, faults, security headers, the host check,
metrics) runs on every request; `settings.BROWSER_MIDDLEWARE` lists what is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

from django.conf import settings
from django.core.handlers.base import BaseHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponseBase

Chain = Callable[[HttpRequest], HttpResponseBase]

# The admin signs in with a session, and static files are served by a middleware, whatever
# else the browser (or one of its extensions) sends along.
_BROWSER_PREFIXES = ("/admin/", f"/{settings.STATIC_URL.strip('/')}/")


def is_bearer_api_call(request: HttpRequest) -> bool:
    authorization: str = request.META.get("HTTP_AUTHORIZATION", "")
    return authorization[:7].lower() == "bearer " and not request.path_info.startswith(
        _BROWSER_PREFIXES
    )


def api_middleware() -> list[str]:
    """settings.MIDDLEWARE in its order, without the browser-only ones."""
    return [path for path in settings.MIDDLEWARE if path not in settings.BROWSER_MIDDLEWARE]


def load_split_middleware(handler: BaseHandler, *, is_async: bool = False) -> None:
    """Builds `handler`'s middleware chain as two: bearer API calls through api_middleware(),
    everything else through the whole list. Django's test client uses it too (tests/conftest.py),
    so tests see the chains that gunicorn serves."""
    chained = cast(_Chained, handler)
    # Django builds a chain from settings.MIDDLEWARE alone. The list is swapped only while a
    # handler is built, before it serves (gunicorn builds it in each worker before that
    # worker's threads start).
    everything = settings.MIDDLEWARE
    settings.MIDDLEWARE = api_middleware()
    try:
        BaseHandler.load_middleware(handler, is_async)
        api_chain = chained._middleware_chain
    finally:
        settings.MIDDLEWARE = everything
    # Loaded last, the whole list's view, template-response and exception hooks are the
    # handler's, for either chain. Of the skipped middleware only CSRF has one (process_view):
    # every view outside the admin is exempt, and one that was not would refuse an unsafe
    # method without a token, which fails safe.
    BaseHandler.load_middleware(handler, is_async)
    full_chain = chained._middleware_chain

    def chain(request: HttpRequest) -> HttpResponseBase:
        return api_chain(request) if is_bearer_api_call(request) else full_chain(request)

    chained._middleware_chain = chain


class _Chained(Protocol):
    _middleware_chain: Chain  # set by BaseHandler.load_middleware; django-stubs omit it


class EmbedPlatformHandler(WSGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        load_split_middleware(self, is_async=is_async)
