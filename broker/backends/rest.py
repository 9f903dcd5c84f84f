"""The one HTTP layer of the stores spoken to over HTTP (Vault, GCP Secret Manager, Azure Key Vault): one pooled
aiohttp session per backend, answers read up to a size bound, one status-to-error table (a store adds its own
entries), ``Retry-After``, and a base class whose requests carry the identity's token and get one fresh token
when the store refuses it.

Bodies of error answers are parsed for the store's error code only; they are never quoted in messages
(a store may echo the request, and nothing a store says is trusted to be free of secrets).
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from broker import __version__
from broker.backends.base import (
    AccessDenied,
    Backend,
    BackendConfig,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    RateLimited,
    SecretNotFound,
    ssl_context,
)
from broker.clock import SystemClock
from broker.identity import TokenSource

MAX_BODY = 1 << 20  # a secret store answer larger than 1 MiB is refused (GCP and Azure cap secrets at 64 KiB / 25 KiB)
POOL_LIMIT = 64  # connections one backend keeps to its store, kept alive between requests
USER_AGENT = f"credential-broker/{__version__}"


def make_session(base_url: str, ca_cert: Path | None, headers: dict[str, str]) -> aiohttp.ClientSession:
    """One pooled session per backend; verifying TLS. ``ca_cert`` replaces the system store when set;
    otherwise the session uses aiohttp's own verifying context (``ssl=True``: the system store, TLS 1.2 at
    least), which aiohttp loads once when it is imported: a context of our own would load the store again,
    about 0.8 MiB for each backend."""
    ssl: Any = (ssl_context(ca_cert) if ca_cert else True) if base_url.startswith("https") else False
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(ssl=ssl, limit=POOL_LIMIT),
        trust_env=False,  # store traffic never goes through an environment proxy
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110). None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (SystemClock().wall() if now is None else now))


class Answer:
    """One HTTP answer: status, the headers we look at, and the JSON body (empty dict when not JSON)."""

    __slots__ = ("data", "retry_after", "status", "www_authenticate")

    def __init__(self, status: int, data: dict[str, Any], retry_after: str | None, www_authenticate: str | None):
        self.status = status
        self.data = data
        self.retry_after = retry_after
        self.www_authenticate = www_authenticate

    def __repr__(self) -> str:
        return f"Answer(status={self.status})"


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    what: str,
    *,
    body: Any = None,
) -> Answer:
    """One request, its answer read up to ``MAX_BODY``. Raises BackendUnavailable when the store cannot be
    reached or a success answer is cut or is not a JSON object (an HTML page from a proxy in front of the
    store: never "not found"), BackendError when the answer is oversized."""
    try:
        async with session.request(method, url, headers=headers, json=body, allow_redirects=False) as resp:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_any():  # raises ClientPayloadError when cut short
                size += len(chunk)
                if size > MAX_BODY:
                    raise BackendError(f"{what}: answer larger than {MAX_BODY} bytes")
                chunks.append(chunk)
            raw = b"".join(chunks)
            status = resp.status
            retry_after = resp.headers.get("Retry-After")
            challenge = resp.headers.get("WWW-Authenticate")
    except aiohttp.ClientError as exc:
        raise BackendUnavailable(f"{what}: {type(exc).__name__}") from None
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        if status < 400:  # a success we cannot read was damaged on the way: worth another attempt
            raise BackendUnavailable(f"{what}: answer unreadable (HTTP {status}, not a JSON object)")
        data = {}
    return Answer(status, data, retry_after, challenge)


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str], what: str) -> Answer:
    """One GET (see ``request``)."""
    return await request(session, "GET", url, headers, what)


# The status map the stores share; a store passes its own copy with entries added or changed.
STATUS_ERRORS: Mapping[int, type[BrokerError]] = {
    401: AccessDenied,
    403: AccessDenied,
    404: SecretNotFound,
    408: BackendUnavailable,
    429: RateLimited,
}


def error_for(
    status: int,
    message: str,
    retry_after: str | None = None,
    table: Mapping[int, type[BrokerError]] = STATUS_ERRORS,
    *,
    store_says_missing: bool = False,
) -> BrokerError:
    """The error for an HTTP error status: ``table``'s entry, else BackendUnavailable for 5xx, else BackendError.

    A status the table reads as "not found" is that only when ``store_says_missing``: the caller has read the
    body as the store's own word that the secret does not exist. Without it (the default, so a store that does
    not look cannot turn a failure into a miss), and for any other answer with that status (a proxy's or a load
    balancer's page, a route the store does not have), it is BackendError: a failure is never "not found".
    """
    kind = table.get(status) or (BackendUnavailable if status >= 500 else BackendError)
    if kind is SecretNotFound and not store_says_missing:
        return BackendError(f"{message} (not the store's own not-found answer)")
    if kind in (RateLimited, BackendUnavailable):
        return kind(message, retry_after=parse_retry_after(retry_after))
    return kind(message)


def status_message(what: str, status: int, code: str | None = None) -> str:
    """An error answer as messages name it: the call, the status and the store's own error code (never the
    body)."""
    return f"{what}: HTTP {status}" + (f" {code}" if code else "")


def raise_for_status(
    answer: Answer,
    what: str,
    code: str | None = None,
    table: Mapping[int, type[BrokerError]] = STATUS_ERRORS,
    *,
    store_says_missing: bool = False,
) -> None:
    """Raise the error ``table`` gives an error answer (nothing for a success). ``code`` is the store's own
    error code, named in the message; ``store_says_missing`` as ``error_for``."""
    if answer.status >= 400:
        message = status_message(what, answer.status, code)
        raise error_for(answer.status, message, answer.retry_after, table, store_says_missing=store_says_missing)


class RestBackend(Backend):
    """A store read with requests that carry the identity's token: the session, the token source and their
    lifecycle.

    A plug-in sets ``identity`` in its constructor and writes ``candidates`` (or ``locate``), ``fetch`` (with
    ``authorized``) and ``check``; it may change the session's headers, how a token is sent, and which status
    means "this token is refused".
    """

    identity: TokenSource
    refused_status: ClassVar[int] = 401  # the store's answer to a token it does not accept

    def __init__(self, config: BackendConfig, ctx: BackendContext, base_url: str) -> None:
        super().__init__(config, ctx)
        self._base = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def session_headers(self) -> dict[str, str]:
        """Headers on every request of this backend."""
        return {"User-Agent": USER_AGENT, "Accept": "application/json"}

    def token_headers(self, token: str) -> dict[str, str]:
        """How a request carries the token."""
        return {"Authorization": f"Bearer {token}"}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = make_session(self._base, self.config.ca_cert, self.session_headers())
        return self._session

    async def _on_unauthorized(self, answer: Answer, what: str, token: str) -> bool:
        """Called when the store answered ``refused_status`` to ``token``: True to get a fresh token and try
        once more, False to let the answer stand."""
        return True

    async def authorized(self, method: str, url: str, what: str, *, body: Any = None) -> Answer:
        """A request with the current token; a refused token gets one fresh token and one more try, then the
        answer stands.

        Raises what ``request`` and the token source raise.
        """
        token = await self.identity.token()
        answer = await request(self._http(), method, url, self.token_headers(token), what, body=body)
        if answer.status == self.refused_status and await self._on_unauthorized(answer, what, token):
            token = await self.identity.token(refused=token)  # revoked or expired early, or a new challenge
            answer = await request(self._http(), method, url, self.token_headers(token), what, body=body)
        return answer

    async def authorized_get(self, url: str, what: str) -> Answer:
        """A GET with the token (see ``authorized``)."""
        return await self.authorized("GET", url, what)

    def not_ready_reason(self) -> str | None:
        return self.identity.not_ready_reason()

    async def aclose(self) -> None:
        await self.identity.aclose()
        if self._session is not None:
            await self._session.close()
