"""What the REST stores (GCP Secret Manager, Azure Key Vault) share: one aiohttp session, bearer GETs, status map.

Bodies of error answers are parsed for the store's error code only; they are never quoted in messages
(a store may echo the request, and nothing a store says is trusted to be free of secrets).
"""

from __future__ import annotations

import email.utils
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from broker.backends.base import (
    AccessDenied,
    BackendError,
    BackendUnavailable,
    BrokerError,
    RateLimited,
    SecretNotFound,
    ssl_context,
)

MAX_BODY = 1 << 20  # a secret store answer larger than 1 MiB is refused (GCP and Azure cap secrets at 64 KiB / 25 KiB)


def make_session(base_url: str, ca_cert: Path | None, user_agent: str) -> aiohttp.ClientSession:
    """One pooled session per backend; verifying TLS (``ca_cert`` replaces the system store when set)."""
    ssl: Any = ssl_context(ca_cert) if base_url.startswith("https") else False
    return aiohttp.ClientSession(
        headers={"User-Agent": user_agent, "Accept": "application/json"},
        connector=aiohttp.TCPConnector(ssl=ssl, limit=64),
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
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str], what: str) -> Answer:
    """One GET. Raises BackendUnavailable when the store cannot be reached or a success answer is cut or
    unreadable, BackendError when the answer is oversized."""
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
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
