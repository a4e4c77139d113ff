"""A stand-in for a Supabase project's Auth server on 127.0.0.1, for tests.

It does what this service needs from Supabase, the way Supabase does it:

- publishes the public half of its signing keys at /auth/v1/.well-known/jwks.json, and the keys
  can be swapped while it runs (key rotation);
- signs access tokens as Supabase does: ES256 or RS256 with the key's `kid` in the header, or
  HS256 with the project's JWT secret; its `anon` and `service_role` keys are legacy HS256 JWTs;
- answers the password grant (POST /auth/v1/token?grant_type=password, `apikey` header, JSON
  body with email and password) for the users it knows, with Supabase Auth's response shape.

It records the requests it gets, so tests can see what a client sent and how often the service
fetched the keys, and it can stall its JWKS answers to play a hung Supabase.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from accounts.jwt import mint_token

JWKS_PATH = "/auth/v1/.well-known/jwks.json"
TOKEN_PATH = "/auth/v1/token"
PROJECT_REF = "abcdefghijklmnopqrst"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str  # "ES256" or "RS256"
    private_key: Any

    def public_jwk(self) -> dict[str, Any]:
        """The key as Supabase's JWKS lists it."""
        if self.algorithm == "ES256":
            jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        else:
            jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {
            **jwk,
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
            "key_ops": ["verify"],
            "ext": True,
        }

    def public_pem(self) -> bytes:
        pem: bytes = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


def generate_key(algorithm: str) -> SigningKey:
    if algorithm == "ES256":
        private_key: Any = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "RS256":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(algorithm)
    return SigningKey(kid=str(uuid.uuid4()), algorithm=algorithm, private_key=private_key)


@dataclass
class LoginRequest:
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeSupabase:
    jwt_secret: str
    published: list[SigningKey] = field(default_factory=list)
    # Entries served as they are, after the published keys: for keys a JWKS must not be trusted
    # with (symmetric, for encryption, too weak).
    raw_jwks_entries: list[dict[str, Any]] = field(default_factory=list)
    users: dict[str, tuple[str, str]] = field(default_factory=dict)
    login_requests: list[LoginRequest] = field(default_factory=list)
    jwks_requests: int = 0
    stall_jwks_seconds: float = 0.0

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        now = int(time.time())
        self.anon_key = self.project_key("anon", now)
        self.service_role_key = self.project_key("service_role", now)

    # --- Lifecycle ---

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):  # a socket address may be bytes; ours is an IPv4 one
            host = host.decode()
        return f"http://{host}:{port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/auth/v1"

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    def __enter__(self) -> FakeSupabase:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()  # releases stalled answers
        self._server.shutdown()
        self._server.server_close()

    def configure(self, settings: Any) -> None:
        """Makes the service under test trust this project (pytest-django's `settings`)."""
        settings.SUPABASE_URL = self.url
        settings.SUPABASE_JWKS_URL = self.jwks_url
        settings.SUPABASE_ANON_KEY = self.anon_key

    # --- Keys and tokens ---

    def publish(self, key: SigningKey) -> SigningKey:
        with self._lock:
            self.published = [*self.published, key]
        return key

    def add_key(self, algorithm: str) -> SigningKey:
        return self.publish(generate_key(algorithm))

    def unpublish(self, key: SigningKey) -> None:
        with self._lock:
            self.published = [k for k in self.published if k.kid != key.kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [*(key.public_jwk() for key in self.published), *self.raw_jwks_entries]}

    def project_key(self, role: str, now: int) -> str:
        """The project's legacy anon or service_role key: an HS256 JWT, as Supabase makes it."""
        claims = {"iss": "supabase", "ref": PROJECT_REF, "role": role, "iat": now}
        return pyjwt.encode(
            {**claims, "exp": now + 10 * 365 * 24 * 3600}, self.jwt_secret, algorithm="HS256"
        )

    def mint(
        self,
        key: SigningKey | None,
        *,
        subject: str | None = None,
        email: str = "user@example.com",
        lifetime_seconds: int = 3600,
        **claims: Any,
    ) -> str:
        """A user's access token: signed with `key` (ES256/RS256), or HS256 with the secret."""
        subject = subject or str(uuid.uuid4())
        if key is None:
            return mint_token(
                subject=subject,
                email=email,
                lifetime_seconds=lifetime_seconds,
                extra=claims,
                key=self.jwt_secret,
                issuer=self.issuer,
            )
        return mint_token(
            subject=subject,
            email=email,
            lifetime_seconds=lifetime_seconds,
            extra=claims,
            key=key.private_key,
            algorithm=key.algorithm,
            kid=key.kid,
            issuer=self.issuer,
        )

    def add_user(self, email: str, password: str) -> str:
        subject = str(uuid.uuid4())
        self.users[email] = (password, subject)
        return subject

    # --- HTTP ---

    def _password_grant(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body)
            email, password = data["email"], data["password"]
        except (ValueError, KeyError, TypeError):
            return 400, {"code": 400, "error_code": "validation_failed", "msg": "Bad request"}
        known = self.users.get(email)
        if known is None or known[0] != password:
            return 400, {
                "code": 400,
                "error_code": "invalid_credentials",
                "msg": "Invalid login credentials",
            }
        key = self.published[0] if self.published else None
        token = self.mint(key, subject=known[1], email=email)
        user = {"id": known[1], "aud": "authenticated", "role": "authenticated", "email": email}
        return 200, {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": 3600,
            "expires_at": int(time.time()) + 3600,
            "refresh_token": uuid.uuid4().hex[:12],
            "user": user,
        }


def _handler_for(project: FakeSupabase) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if urlsplit(self.path).path != JWKS_PATH:
                self._answer(404, {"msg": "not found"})
                return
            with project._lock:
                project.jwks_requests += 1
            if project.stall_jwks_seconds and project._stopping.wait(project.stall_jwks_seconds):
                return
            self._answer(200, project.jwks())

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            query = parse_qs(parts.query)
            project.login_requests.append(
                LoginRequest(query=query, headers=dict(self.headers.items()), body=body)
            )
            if parts.path != TOKEN_PATH or query.get("grant_type") != ["password"]:
                self._answer(404, {"msg": "not found"})
                return
            if self.headers.get("apikey") != project.anon_key:
                self._answer(401, {"message": "Invalid API key"})
                return
            self._answer(*project._password_grant(body))

    return Handler
