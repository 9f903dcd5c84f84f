"""What the AWS backends share: identity, clients, the one error map, and lookup patterns.

Identity is boto3's default credential chain, so IRSA (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``)
and EKS Pod Identity (``AWS_CONTAINER_CREDENTIALS_FULL_URI``) work with no settings; ``role_arn`` assumes
a further role on top of whatever the chain found. Credentials are botocore refreshable credentials,
whose lock makes every concurrent call share one refresh; the session and clients are built once and
shared by the worker threads (botocore clients are thread-safe, sessions are not, so only one thread
ever builds).

Every boto3 call runs in the core's bounded thread pool and makes exactly one attempt: botocore's own
retries are off because the core's guard owns retries, backoff and the time budget.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from broker.backends.base import (
    TEAM_SEP,
    AccessDenied,
    Backend,
    BackendConfig,
    BackendContext,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    Kind,
    RateLimited,
    SecretNotFound,
    layout_key,
)
from broker.providerkw import Ignored, ProviderKwarg, Replaced

# Error codes as AWS services spell them (JSON protocols add "Exception"; the STS query protocol does not).
THROTTLED = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "ThrottledException",
        "SlowDown",
    }
)
DENIED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "NotAuthorized",
        "InvalidIdentityToken",
        "IDPRejectedClaim",
    }
)
EXPIRED = frozenset({"ExpiredToken", "ExpiredTokenException"})
NOT_FOUND = frozenset({"ResourceNotFoundException", "ParameterNotFound", "ParameterVersionNotFound"})
UNAVAILABLE = frozenset(
    {
        "InternalServiceError",
        "InternalServiceErrorException",
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "IDPCommunicationError",
    }
)


_POD_IDENTITY = (
    "the broker uses boto3's default chain (IRSA, EKS Pod Identity, instance profile); role_arn assumes a role"
)
# amazon provider 9.39.0: SecretsManagerBackend / SystemsManagerParameterStoreBackend kwargs (and the AWS
# connection extras they pass on) that are not keys of ours.
AWS_PROVIDER_KWARGS: dict[str, ProviderKwarg] = {
    "aws_access_key_id": Replaced(f"a credential in the config; {_POD_IDENTITY}"),
    "aws_secret_access_key": Replaced(f"a credential in the config; {_POD_IDENTITY}"),
    "aws_session_token": Replaced(f"a credential in the config; {_POD_IDENTITY}"),
    "profile_name": Replaced(f"shared-config profiles are not read; {_POD_IDENTITY}"),
    "assume_role_kwargs": Replaced("use external_id and role_session_name (with role_arn)"),
    "verify": Replaced("TLS is always verified; set ca_cert to trust a private CA"),
    "assume_role_method": Ignored(
        "role_arn is assumed with sts:AssumeRole on top of the default chain, which already does web identity (IRSA)"
    ),
    "api_version": Ignored("the client uses the service's current API version"),
    "use_ssl": Ignored("the scheme of endpoint_url decides (https unless a test endpoint says http://)"),
    "botocore_config": Ignored("timeouts and retries are the broker's: timeout, retries, circuit_breaker"),
    "config_kwargs": Ignored("timeouts and retries are the broker's: timeout, retries, circuit_breaker"),
}


class AwsConfig(BackendConfig):
    """Identity keys shared by both AWS backends, and Airflow's lookup patterns."""

    provider_kwargs = AWS_PROVIDER_KWARGS

    region_name: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    role_arn: str | None = Field(default=None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")
    # Lengths as min/max_length, not a {2,64} repeat: pydantic's regex engine expands a bounded repeat of
    # the Unicode \w class into an automaton of about 5 MiB, built for every model that has the field.
    role_session_name: str = Field(default="airflow-broker", min_length=2, max_length=64, pattern=r"^[\w+=,.@-]+$")
    external_id: str | None = Field(default=None, min_length=2, max_length=1224, pattern=r"^[\w+=,.@:/-]+$")
    connections_lookup_pattern: str | None = None
    variables_lookup_pattern: str | None = None
    config_lookup_pattern: str | None = None

    @field_validator("connections_lookup_pattern", "variables_lookup_pattern", "config_lookup_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError, or ""."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code") or "")


def map_client_error(exc: BaseException, backend: str, what: str) -> BrokerError:
    """The one place AWS failures become broker errors.

    Matches on error codes, not HTTP status (moto answers 404 where AWS documents 400); the status is a
    fallback only for answers without a known code (401/403 denied, 429 throttled, 5xx unavailable; never "not
    found"). Messages name the backend, the call and the code.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        CredentialRetrievalError,
        EndpointConnectionError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, BrokerError):  # raised by our own code inside the SDK (node mode: no pod token)
        return exc
    prefix = f"aws {backend}: {what}"
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{prefix}: {code or f'HTTP {status}'}"
        if code in NOT_FOUND:
            return SecretNotFound(message)
        if code in DENIED or code in EXPIRED:  # an expired token reaches here only after a fresh login
            return AccessDenied(message)
        if code in THROTTLED:
            return RateLimited(message)
        if code in UNAVAILABLE:
            return BackendUnavailable(message)
        if status in (401, 403):
            return AccessDenied(message)
        if status == 429:
            return RateLimited(message)
        if status >= 500:
            return BackendUnavailable(message)
        return BackendError(message)  # DecryptionFailure, InvalidRequestException, ...: never "not found"
    # botocore's timeout classes also inherit the generic connection/OS errors: test them first.
    if isinstance(exc, ReadTimeoutError):
        return BackendTimeout(f"{prefix}: no answer within the read timeout")
    if isinstance(exc, ConnectTimeoutError | EndpointConnectionError):
        return BackendUnavailable(f"{prefix}: endpoint unreachable")
    if isinstance(exc, HTTPClientError):
        return BackendUnavailable(f"{prefix}: connection failed ({type(exc).__name__})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AccessDenied(f"{prefix}: no usable credentials in the default chain")
    if isinstance(exc, CredentialRetrievalError):
        # The credentials endpoint (Pod Identity agent, IMDS) failed to answer: worth retrying.
        return BackendUnavailable(f"{prefix}: credential provider failed")
    if isinstance(exc, NoRegionError):
        return BackendError(f"{prefix}: no region: set region_name or AWS_DEFAULT_REGION")
    if isinstance(exc, OSError):
        return BackendUnavailable(f"{prefix}: {type(exc).__name__}")
    return BackendError(f"{prefix}: {type(exc).__name__}")


SERVICES = frozenset({"secretsmanager", "ssm", "sts"})  # every AWS service the broker calls
# The operations the broker calls on them (and botocore's own chain: web identity and assume-role profiles).
OPERATIONS = {
    "secretsmanager": frozenset({"GetSecretValue"}),
    "ssm": frozenset({"GetParameter"}),
    "sts": frozenset({"GetCallerIdentity", "AssumeRole", "AssumeRoleWithWebIdentity"}),
}
_LOADER_LOCK = threading.Lock()
_LOADER: Any = None


def shared_loader(data_path: str | None) -> Any:
    """The one botocore data loader of the process, shared by every session the AWS backends build.

    botocore's loader caches what it reads (endpoints, partitions, each service model, as parsed JSON);
    one loader per backend read and held them once per backend. Its endpoints table keeps only the
    services in ``SERVICES`` and the service models of ``OPERATIONS`` only those operations, each read
    one entry at a time (``endpoints_for``, ``model_for``).
    """
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            from botocore.loaders import JSONFileLoader, Loader

            class TrimmedJSON(JSONFileLoader):
                """Drops every documentation string while parsing (SSM's model is mostly prose), and reads
                the endpoints table and the models of the services the broker calls trimmed."""

                def _load_file(self, full_path: str, open_method: Any) -> Any:
                    if not os.path.isfile(full_path):
                        return None
                    with open_method(full_path, "rb") as fp:
                        payload = fp.read().decode("utf-8")
                    base = os.path.basename(full_path)
                    if base.startswith("endpoints.json"):  # endpoints.json or endpoints.json.gz
                        return endpoints_for(payload, SERVICES)
                    service = os.path.basename(os.path.dirname(os.path.dirname(full_path)))
                    if base.startswith("service-2.json") and service in OPERATIONS:
                        return model_for(payload, OPERATIONS[service])
                    return json.loads(payload, object_pairs_hook=_undocumented)

            # AWS_DATA_PATH, read as botocore's own create_loader reads it
            paths = (
                None
                if data_path is None
                else [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)]
            )
            _LOADER = Loader(extra_search_paths=paths, file_loader=TrimmedJSON())
        return _LOADER


_DOC_KEYS = frozenset({"documentation", "documentationUrl"})


def _undocumented(pairs: list[tuple[str, Any]]) -> OrderedDict[str, Any]:
    return OrderedDict((k, v) for k, v in pairs if k not in _DOC_KEYS)


def _plain_undocumented(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if k not in _DOC_KEYS}


class _Reader:
    """Reads a JSON document one member at a time, so that what is dropped is parsed and freed one
    member at a time too. A whole botocore table parsed at once (the endpoints table is about 7 MiB
    parsed, SSM's model several MiB) leaves its freed memory with the process as half-used pools."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what
        self._decode = json.JSONDecoder(object_pairs_hook=_plain_undocumented).raw_decode

    def skip(self, i: int) -> int:
        match = _SPACE.match(self.text, i)
        return match.end() if match else i

    def expect(self, i: int, char: str) -> int:
        i = self.skip(i)
        if self.text[i : i + 1] != char:
            raise ValueError(f"{self.what}: expected {char!r} at {i}")
        return i + 1

    def value(self, i: int) -> tuple[Any, int]:
        return self._decode(self.text, self.skip(i))

    def members(self, i: int, read: Callable[[str, int], tuple[Any, int]]) -> tuple[dict[str, Any], int]:
        """The object at ``i``, each member read by ``read(key, index)``; members it returns as
        ``_DROP`` are left out."""
        out: dict[str, Any] = {}
        i = self.skip(self.expect(i, "{"))
        if self.text[i : i + 1] == "}":
            return out, i + 1
        while True:
            key, i = self.value(i)
            if not isinstance(key, str):
                raise ValueError(f"{self.what}: expected a key at {i}")  # noqa: TRY004 - malformed text, as json raises
            item, i = read(key, self.expect(i, ":"))
            if item is not _DROP and key not in _DOC_KEYS:
                out[key] = item
            i = self.skip(i)
            if self.text[i : i + 1] == "}":
                return out, i + 1
            i = self.expect(i, ",")

    def items(self, i: int, read: Callable[[int], tuple[Any, int]]) -> tuple[list[Any], int]:
        out: list[Any] = []
        i = self.skip(self.expect(i, "["))
        if self.text[i : i + 1] == "]":
            return out, i + 1
        while True:
            item, i = read(i)
            out.append(item)
            i = self.skip(i)
            if self.text[i : i + 1] == "]":
                return out, i + 1
            i = self.expect(i, ",")

    def document(self, read: Callable[[str, int], tuple[Any, int]]) -> dict[str, Any]:
        out, end = self.members(0, read)
        if self.skip(end) != len(self.text):
            raise ValueError(f"{self.what}: extra data at {end}")
        return out


_DROP = object()
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def endpoints_for(text: str, services: frozenset[str]) -> dict[str, Any]:
    """botocore's endpoints table (``endpoints.json``) with only ``services`` in each partition: the whole
    table (some 400 services) is never built at once. Raises ValueError when the text is not JSON."""
    reader = _Reader(text, "endpoints.json")

    def service(name: str, i: int) -> tuple[Any, int]:
        item, end = reader.value(i)
        return (item if name in services else _DROP), end

    def partition(key: str, i: int) -> tuple[Any, int]:
        return reader.members(i, service) if key == "services" else reader.value(i)

    def top(key: str, i: int) -> tuple[Any, int]:
        if key == "partitions":
            return reader.items(i, lambda j: reader.members(j, partition))
        return reader.value(i)

    return reader.document(top)


def model_for(text: str, operations: frozenset[str]) -> dict[str, Any]:
    """A service model (``service-2.json``) with only ``operations``, the shapes they reach and the
    service's error shapes, and no documentation: SSM's whole model is about 1,400 shapes for 150
    operations, and botocore builds a client method for every operation it lists. Read twice, one shape at
    a time: first which shapes each one refers to, then only the shapes kept. Raises ValueError when the
    text is not JSON."""
    reader = _Reader(text, "service-2.json")
    refs: dict[str, list[str]] = {}
    pending: list[str] = []

    def operation(name: str, i: int) -> tuple[Any, int]:
        op, end = reader.value(i)
        if name not in operations:
            return _DROP, end
        pending.extend(ref["shape"] for ref in (op.get("input"), op.get("output"), *op.get("errors", [])) if ref)
        return op, end

    def shape_refs(name: str, i: int) -> tuple[Any, int]:
        shape, end = reader.value(i)
        links = [shape.get("member"), shape.get("key"), shape.get("value"), *shape.get("members", {}).values()]
        refs[name] = [ref["shape"] for ref in links if ref]
        if shape.get("exception"):
            pending.append(name)
        return _DROP, end

    def first(key: str, i: int) -> tuple[Any, int]:
        if key == "operations":
            return reader.members(i, operation)
        if key == "shapes":
            return reader.members(i, shape_refs)
        return reader.value(i)

    model = reader.document(first)
    keep: set[str] = set()
    while pending:
        name = pending.pop()
        if name in keep or name not in refs:
            continue
        keep.add(name)
        pending += refs[name]
    refs.clear()

    def kept_shape(name: str, i: int) -> tuple[Any, int]:
        shape, end = reader.value(i)
        return (shape if name in keep else _DROP), end

    def second(key: str, i: int) -> tuple[Any, int]:
        if key == "shapes":
            return reader.members(i, kept_shape)
        return _DROP, reader.value(i)[1]

    if "shapes" in model:
        shapes = reader.document(second)["shapes"]
        model["shapes"] = {name: shapes[name] for name in sorted(shapes)}
    return model


def _as_refreshed(creds: dict[str, Any]) -> dict[str, str]:
    """STS ``Credentials`` as botocore's refreshable credentials take them."""
    return {
        "access_key": creds["AccessKeyId"],
        "secret_key": creds["SecretAccessKey"],
        "token": creds["SessionToken"],
        "expiry_time": creds["Expiration"].isoformat(),
    }


class AwsBackend(Backend):
    """Session, credentials and client management for one AWS service."""

    service: str = ""
    config: AwsConfig

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        super().__init__(config, ctx)
        self._lock = threading.Lock()
        self._generation = 0
        self._credentials: Any = None
        self._client: Any = None
        self._sts: Any = None  # built on first use (only ``broker check`` calls STS)
        self._session: Any = None
        self._seen_expiry: datetime | None = None

    # ------------------------------------------------------------------------------------ layout

    def served_prefix(self, kind: Kind, name: str, multi_team: bool) -> str | None:
        """The kind's prefix when this backend looks ``name`` up at all, else None: the kind is off (a null
        prefix), the id is outside Airflow's ``*_lookup_pattern`` (no AWS call), or, with multi-team, it holds
        "--" and so could name another team's secret."""
        prefix = layout_key(self.config, kind, "prefix")
        if prefix is None or (multi_team and TEAM_SEP in name):
            return None
        pattern = layout_key(self.config, kind, "lookup_pattern")
        return prefix if not pattern or re.match(pattern, name, re.IGNORECASE) is not None else None

    # ------------------------------------------------------------------------------------ identity

    def _client_config(self) -> Any:
        from botocore.config import Config

        return Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # the core retries, within its own budget
            connect_timeout=self.config.timeout,
            read_timeout=self.config.timeout,
            max_pool_connections=32,
            user_agent_extra="airflow-credential-broker",
        )

    def _build(self) -> None:
        """Build the session, credentials and clients (in a worker thread, under ``self._lock``).

        Most providers resolve on first use; the container provider (Pod Identity) fetches at once.
        Raises the SDK's error (NoRegionError, CredentialRetrievalError, ...); the caller maps it.
        """
        import botocore.session
        from botocore.credentials import CredentialProvider, CredentialResolver, DeferredRefreshableCredentials

        def core_session() -> Any:
            core = botocore.session.Session()
            core.register_component("data_loader", shared_loader(core.get_config_variable("data_path")))
            if self.config.region_name:
                core.set_config_variable("region", self.config.region_name)
            # Also applies to the STS clients botocore makes inside the chain (web identity, assume role).
            core.set_default_client_config(self._client_config())
            return core

        core = core_session()
        refresh: Callable[[], dict[str, str]] | None = None
        if self.ctx.workload_token is not None:
            # Node mode: the calling pod's token for the identity's role; no credential of the node's is used
            # (the call is unsigned, as botocore's own web-identity provider makes it).
            from botocore import UNSIGNED
            from botocore.config import Config

            unsigned = self._client_config().merge(Config(signature_version=UNSIGNED))
            refresh, method = self._web_identity_refresher(core.create_client("sts", config=unsigned)), "web-identity"
        elif self.config.role_arn:
            # Like Airflow's session factory, the assume-role STS client never uses the service's
            # endpoint_url: AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL apply as botocore reads them.
            refresh, method = self._assume_role_refresher(core.create_client("sts")), "assume-role"
        if refresh is not None:
            credentials = DeferredRefreshableCredentials(refresh_using=refresh, method=method)

            class Fixed(CredentialProvider):
                METHOD = "broker-assume-role"
                CANONICAL_NAME = "custom-broker-assume-role"

                def load(self) -> Any:
                    return credentials

            core = core_session()
            core.register_component("credential_provider", CredentialResolver([Fixed()]))
        # Clients straight from the botocore session: boto3's Session only wraps this call (its import alone
        # brings s3transfer, multiprocessing and the resource layer, about 2 MiB), and the credential chain
        # is the session's either way.
        verify = str(self.config.ca_cert) if self.config.ca_cert else None
        client = core.create_client(
            self.service, endpoint_url=self.config.endpoint_url, verify=verify, config=self._client_config()
        )
        self._session, self._sts = core, None
        self._credentials = core.get_credentials()
        self._client = client

    def _assume_role_refresher(self, sts: Any) -> Callable[[], dict[str, str]]:
        role_arn, session_name, external_id = (
            self.config.role_arn,
            self.config.role_session_name,
            self.config.external_id,
        )

        def refresh() -> dict[str, str]:
            kwargs: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": session_name}
            if external_id:
                kwargs["ExternalId"] = external_id
            return _as_refreshed(sts.assume_role(**kwargs)["Credentials"])

        return refresh

    def _web_identity_refresher(self, sts: Any) -> Callable[[], dict[str, str]]:
        role_arn, session_name, token = self.config.role_arn, self.config.role_session_name, self.ctx.pod_token

        def refresh() -> dict[str, str]:
            creds = sts.assume_role_with_web_identity(
                RoleArn=role_arn, RoleSessionName=session_name, WebIdentityToken=token()
            )["Credentials"]
            return _as_refreshed(creds)

        return refresh

    def _ensure(self, stale_generation: int | None = None) -> None:
        """Build once; with ``stale_generation``, rebuild unless another thread already did."""
        if self._client is not None and stale_generation is None:
            return
        with self._lock:
            if self._client is None or stale_generation == self._generation:
                self._build()
                self._generation += 1

    def _resolve_credentials(self) -> None:
        """Resolve or refresh the credentials (shared: botocore's lock lets one thread refresh).

        Raises the SDK's error; the caller maps it.
        """
        if self._credentials is None:
            from botocore.exceptions import NoCredentialsError

            raise NoCredentialsError()
        self._credentials.get_frozen_credentials()

    def _invoke(self, method: str, kwargs: dict[str, Any], sts: bool) -> Any:
        """One call in a worker thread. An expired token gets one fresh login, then counts as denied."""
        self._ensure()
        generation = self._generation
        try:
            self._resolve_credentials()
            return getattr(self._sts_client() if sts else self._client, method)(**kwargs)
        except Exception as exc:
            if error_code(exc) not in EXPIRED:
                raise
        self._ensure(stale_generation=generation)
        self._resolve_credentials()
        return getattr(self._sts_client() if sts else self._client, method)(**kwargs)

    def _sts_client(self) -> Any:
        """The STS client on the backend's session, built on first use (its model is not loaded before)."""
        with self._lock:
            if self._sts is None:
                self._sts = self._session.create_client("sts", config=self._client_config())
            return self._sts

    async def _call(self, what: str, method: str, *, sts: bool = False, **kwargs: Any) -> Any:
        """One AWS call in the thread pool. Raises the mapped broker error."""
        try:
            result = await self.ctx.run_blocking(self._invoke, method, kwargs, sts)
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped in one place
            raise map_client_error(exc, self.name, what) from None
        self._observe_credentials()
        return result

    def _observe_credentials(self) -> None:
        """Export the credentials' expiry and count each new set as a login (botocore refreshes them)."""
        # botocore exposes no public accessor for the expiry of refreshable credentials.
        expiry: datetime | None = getattr(self._credentials, "_expiry_time", None)
        gauge = self.ctx.metrics.identity_expiry
        if expiry is None:
            gauge.set(self, self.name, -1)
            return
        # Never below 0: -1 means "does not expire", and an expired credential is refreshed at its next use.
        gauge.set(self, self.name, max(0.0, expiry.timestamp() - self.ctx.clock.wall()))
        if expiry != self._seen_expiry:
            self._seen_expiry = expiry
            self.ctx.metrics.logins.labels(backend=self.name, outcome="ok").inc()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build the client and resolve credentials once (IRSA: AssumeRoleWithWebIdentity).

        Raises AccessDenied, BackendUnavailable, BackendTimeout or BackendError.
        """

        def warm() -> None:
            self._ensure()
            self._resolve_credentials()

        try:
            await self.ctx.run_blocking(warm)
        except Exception as exc:  # noqa: BLE001
            self.ctx.metrics.logins.labels(backend=self.name, outcome="failed").inc()
            raise map_client_error(exc, self.name, "credentials") from None
        self._observe_credentials()

    async def check(self) -> str:
        """STS GetCallerIdentity with the backend's credentials: the ARN in use (the assumed role's).

        Raises like ``start``.
        """
        await self.start()
        me = await self._call("GetCallerIdentity", "get_caller_identity", sts=True)
        return f"aws arn={me.get('Arn')} account={me.get('Account')}"

    def not_ready_reason(self) -> str | None:
        return None if self._client is not None else "AWS client not built"

    async def aclose(self) -> None:
        self.ctx.metrics.identity_expiry.withdraw(self, self.name)
