"""What the HTTP stores share: one pooled aiohttp session per backend; for the REST stores (GCP Secret Manager,
Azure Key Vault) also a base class, bearer GETs and the status map.

Bodies of error answers are parsed for the store's error code only; they are never quoted in messages
(a store may echo the request, and nothing a store says is trusted to be free of secrets).
"""

from __future__ import annotations

import email.utils
import json
from pathlib import Path
from typing import Any

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
    """One pooled session per backend; verifying TLS (``ca_cert`` replaces the system store when set)."""
    ssl: Any = ssl_context(ca_cert) if base_url.startswith("https") else False
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


def raise_for_status(answer: Answer, what: str, code: str | None = None) -> None:
    """The status map both REST stores share. ``code`` is the store's own error code, named in the message."""
    status = answer.status
    if status < 400:
        return
    message = f"{what}: HTTP {status}" + (f" {code}" if code else "")
    error: BrokerError
    if status == 404:
        error = SecretNotFound(message)
    elif status in (401, 403):
        error = AccessDenied(message)
    elif status == 429:
        error = RateLimited(message, retry_after=parse_retry_after(answer.retry_after))
    elif status >= 500 or status == 408:
        error = BackendUnavailable(message, retry_after=parse_retry_after(answer.retry_after))
    else:
        error = BackendError(message)
    raise error


class RestBackend(Backend):
    """A store read with bearer-token GETs: the session, the token source and their lifecycle.

    A plug-in sets ``identity`` in its constructor and writes ``locate``, ``fetch`` (with ``authorized_get``)
    and ``check``.
    """

    identity: TokenSource

    def __init__(self, config: BackendConfig, ctx: BackendContext, base_url: str) -> None:
        super().__init__(config, ctx)
        self._base = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
            self._session = make_session(self._base, self.config.ca_cert, headers)
        return self._session

    async def _on_unauthorized(self, answer: Answer, what: str) -> None:
        """Called when the store refused a token with 401, before one retry with a fresh token."""

    async def authorized_get(self, url: str, what: str) -> Answer:
        """A GET with the current token; a 401 gets one fresh token and one more try, then the answer stands.

        Raises what ``get`` and the token source raise.
        """
        token = await self.identity.token()
        answer = await get(self._http(), url, {"Authorization": f"Bearer {token}"}, what)
        if answer.status == 401:  # revoked or expired early, or (Azure) a new challenge
            await self._on_unauthorized(answer, what)
            token = await self.identity.token(refused=token)
            answer = await get(self._http(), url, {"Authorization": f"Bearer {token}"}, what)
        return answer

    def not_ready_reason(self) -> str | None:
        return self.identity.not_ready_reason()

    async def aclose(self) -> None:
        await self.identity.aclose()
        if self._session is not None:
            await self._session.close()
