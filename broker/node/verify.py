"""Who is calling: the pod's projected service-account token, verified with the TokenReview API.

The API server checks the signature, the expiry, the audience and that the pod the token is bound to
still exists with the same uid (offline JWKS verification could not see a deleted pod). The broker then
insists on its own audience, a service-account user and a pod binding (and, with ``same_node``, this
node). A verdict is kept until the token's ``exp``, keyed by a hash of the token, never the token itself;
concurrent requests with one token share one review. Bad tokens are refused before any store is asked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from broker.backends.base import BackendContext, BackendUnavailable, ConfigurationError, Unauthorized
from broker.backends.rest import make_session
from broker.node.config import NodeConfig

log = logging.getLogger("broker.node")

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
MAX_TOKEN_BYTES = 16_384
_EXTRA = "authentication.kubernetes.io/"


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """The verified caller. ``key`` names its identity partition (never the pod: pods of one service
    account share a partition)."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.service_account

    def as_audit(self) -> dict[str, str]:
        """The verified caller as the audit trail records it."""
        return {
            "namespace": self.namespace,
            "service_account": self.service_account,
            "pod": self.pod_name,
            "pod_uid": self.pod_uid,
        }


@dataclass(frozen=True, slots=True)
class _Verdict:
    identity: PodIdentity
    expires_at: float  # wall clock (the token's exp)


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header. Raises Unauthorized when absent or malformed."""
    if not header:
        raise Unauthorized("missing Authorization: Bearer <pod service-account token>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization must be Bearer <pod service-account token>")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("token too long")
    return token


def token_claims(token: str) -> dict[str, Any]:
    """The unverified claims of a JWT (only ``exp`` is read from them, after the API server accepted it,
    and as a cheap early refusal before). Raises Unauthorized when it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthorized("token is not a JWT")
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        raise Unauthorized("token is not a JWT") from None
    if not isinstance(claims, dict):
        raise Unauthorized("token is not a JWT")
    return claims


class TokenVerifier:
    """Verifies pod tokens for one broker; verdicts bounded by ``max_verdicts``."""

    def __init__(self, config: NodeConfig, ctx: BackendContext, node_name: str | None) -> None:
        self.config = config
        self.ctx = ctx
        self.node_name = node_name
        self._verdicts: collections.OrderedDict[bytes, _Verdict] = collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[PodIdentity]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"TokenVerifier(audience={self.config.audience!r}, verdicts={len(self._verdicts)})"

    async def verify(self, header: str | None) -> PodIdentity:
        """The caller of a request with this Authorization header.

        Raises Unauthorized for a missing, malformed, expired, refused, wrong-audience, unbound or
        other-node token; BackendUnavailable when the TokenReview API cannot answer.
        """
        token = bearer(header)
        exp = token_claims(token).get("exp")
        now = self.ctx.clock.wall()
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Unauthorized("token has no expiry")
        if exp <= now:
            raise Unauthorized("token has expired")
        digest = hashlib.sha256(token.encode()).digest()
        verdict = self._verdicts.get(digest)
        if verdict is not None:
            if verdict.expires_at > now:
                self._verdicts.move_to_end(digest)
                return verdict.identity
            del self._verdicts[digest]
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[PodIdentity] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            identity = await self._review(token)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: followers re-raise it, nobody else needs to
            raise
        finally:
            self._inflight.pop(digest, None)
        future.set_result(identity)
        self._remember(digest, _Verdict(identity, float(exp)))
        return identity

    def _remember(self, digest: bytes, verdict: _Verdict) -> None:
        self._verdicts[digest] = verdict
        while len(self._verdicts) > self.config.max_verdicts:
            self._verdicts.popitem(last=False)

    def forget_expired(self) -> int:
        """Drop verdicts past their token's expiry; returns how many."""
        now = self.ctx.clock.wall()
        stale = [d for d, v in self._verdicts.items() if v.expires_at <= now]
        for digest in stale:
            del self._verdicts[digest]
        return len(stale)

    def __len__(self) -> int:
        return len(self._verdicts)

    # ------------------------------------------------------------------------------------------ review

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            api = self.config.kubernetes
            ca = api.ca_cert if api.url.startswith("https") else None
            self._session = make_session(api.url, ca, {"Accept": "application/json"})
        return self._session

    async def _own_token(self) -> str:
        path = self.config.kubernetes.token_path
        try:
            value = await self.ctx.run_blocking(path.read_text, encoding="utf-8")
        except OSError as exc:
            raise BackendUnavailable(f"node: cannot read the broker's token {path}: {exc.strerror}") from None
        return value.strip()

    async def _review(self, token: str) -> PodIdentity:
        api = self.config.kubernetes
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.config.audience]},
        }
        headers = {"Authorization": f"Bearer {await self._own_token()}", "Content-Type": "application/json"}
        try:
            async with self._http().post(
                api.url + REVIEW_PATH,
                data=json.dumps(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=api.timeout),
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"node: TokenReview API unreachable ({type(exc).__name__})") from None
        if status in (401, 403):
            raise BackendUnavailable(f"node: TokenReview refused the broker's own credentials (HTTP {status})")
        if status not in (200, 201):
            raise BackendUnavailable(f"node: TokenReview answered HTTP {status}")
        try:
            answer = json.loads(raw)
            review = answer.get("status") or {}
        except (ValueError, AttributeError):
            raise BackendUnavailable("node: TokenReview answer is not JSON") from None
        return self._judge(review)

    def _judge(self, review: dict[str, Any]) -> PodIdentity:
        """The identity in an accepted review. Raises Unauthorized when it does not meet node mode's rules."""
        if review.get("authenticated") is not True:
            raise Unauthorized("token refused by the Kubernetes API")
        if self.config.audience not in (review.get("audiences") or []):
            raise Unauthorized("token is not for this broker's audience")
        user = review.get("user") or {}
        parts = str(user.get("username", "")).split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise Unauthorized("token is not a service-account token")
        extra = user.get("extra") or {}

        def one(name: str) -> str | None:
            values = extra.get(_EXTRA + name)
            return values[0] if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) else None

        pod_name, pod_uid = one("pod-name"), one("pod-uid")
        if not pod_name or not pod_uid:
            raise Unauthorized("token is not bound to a pod")
        if self.config.same_node and one("node-name") != self.node_name:
            raise Unauthorized("token is bound to a pod on another node")
        return PodIdentity(parts[2], parts[3], pod_name, pod_uid)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def node_name(config: NodeConfig) -> str | None:
    """This node's name from ``$NODE_NAME`` (the downward API's ``spec.nodeName``).

    Raises ConfigurationError when ``same_node`` is on and it is not set.
    """
    name = os.environ.get("NODE_NAME") or None
    if config.same_node and name is None:
        raise ConfigurationError(["node.same_node: set $NODE_NAME (fieldRef spec.nodeName) or turn same_node off"])
    return name
