"""The ``node:`` config section and the rules node mode adds to the rest of the config."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from broker.configtypes import Duration, StrictModel, rooted

if TYPE_CHECKING:
    from broker.backends.base import BackendConfig
    from broker.config import BrokerConfig

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Backends that would answer every pod with the node's own identity, never the caller's.
NODE_WIDE_TYPES = {"file", "env"}
POD_AUTH_METHODS = {"kubernetes", "jwt"}
AWS_TYPES = {"aws_secrets_manager", "aws_ssm"}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class KubernetesAPIConfig(StrictModel):
    """Where the TokenReview API is, and the broker's own credentials for it."""

    url: str = Field(default="https://kubernetes.default.svc", pattern=r"^https?://[^/]+$")
    token_path: Path = SA_DIR / "token"
    ca_cert: Path | None = SA_DIR / "ca.crt"
    timeout: Duration = Field(default=5.0, gt=0, le=60)


class IdentityConfig(StrictModel):
    """A service account, the backends its pods' lookups go through, and what differs for it."""

    namespace: str = Field(pattern=_DNS_LABEL)
    service_account: str = Field(pattern=_DNS_SUBDOMAIN)
    backends: list[str] = Field(min_length=1)
    overrides: dict[str, dict[str, Any]] = {}


class NodeConfig(StrictModel):
    audience: str = Field(default="broker", min_length=1, max_length=256)
    kubernetes: KubernetesAPIConfig = KubernetesAPIConfig()
    same_node: bool = True
    idle_timeout: Duration = Field(default=900.0, ge=1, le=86_400)
    max_identities: int = Field(default=256, ge=1, le=100_000)
    max_verdicts: int = Field(default=10_000, ge=1, le=1_000_000)
    identities: list[IdentityConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> NodeConfig:
        seen: set[tuple[str, str]] = set()
        for identity in self.identities:
            key = (identity.namespace, identity.service_account)
            if key in seen:
                raise ValueError(f"identities: {key[0]}/{key[1]} is listed twice")
            seen.add(key)
        return self

    @functools.cached_property
    def _by_account(self) -> dict[tuple[str, str], IdentityConfig]:
        return {(i.namespace, i.service_account): i for i in self.identities}

    def identity(self, namespace: str, service_account: str) -> IdentityConfig | None:
        return self._by_account.get((namespace, service_account))


def identity_chain(
    identity: IdentityConfig, templates: list[BackendConfig], errors: list[str] | None = None, where: str = ""
) -> list[BackendConfig]:
    """The backend configs of one identity: the named templates with its overrides merged in.

    Problems go to ``errors`` (each naming its key path under ``where``) when given, else raise ValueError.
    """
    from broker.backends import load_type
    from broker.config import _errors

    out: list[BackendConfig] = []
    problems: list[str] = []
    by_name = {b.name: b for b in templates}
    for k, name in enumerate(identity.backends):
        if name not in by_name:
            problems.append(f"{where}.backends[{k}]: no backend named {name!r} in backends")
    for name in identity.overrides:
        if name not in identity.backends:
            problems.append(f"{where}.overrides.{name}: not one of this identity's backends")
    for name in identity.backends:
        template = by_name.get(name)
        if template is None:
            continue
        override = identity.overrides.get(name, {})
        for fixed in ("name", "type"):
            if fixed in override:
                problems.append(f"{where}.overrides.{name}.{fixed}: cannot be overridden")
        merged = _merge(template.model_dump(exclude_unset=True), override)
        try:
            cfg = load_type(template.type).config_model.model_validate(merged)
        except ValidationError as exc:
            problems.extend(_errors(exc, (f"{where}.overrides.{name}",)) if where else [str(exc)])
            continue
        problems.extend(f"{where}.overrides.{name}.{p}" for p in _pod_identity_problems(cfg))
        out.append(cfg)
    if problems:
        if errors is None:
            raise ValueError("; ".join(problems))
        errors.extend(problems)
    return out


def anchor_overrides(node: NodeConfig, templates: list[BackendConfig], base: Path) -> NodeConfig:
    """``node`` with the relative paths its identities' overrides set taken from ``base``.

    An override is a raw mapping: which of its values are paths is read from the backend model it merges
    into, so a path key any backend type adds is covered. Expects a validated config (``node_errors`` empty).
    """
    identities = []
    for identity in node.identities:
        chain = {cfg.name: cfg for cfg in identity_chain(identity, templates)}
        overrides = {name: _anchor_raw(raw, chain[name], base) for name, raw in identity.overrides.items()}
        identities.append(identity.model_copy(update={"overrides": overrides}))
    return node.model_copy(update={"identities": identities})


def _anchor_raw(raw: Any, validated: Any, base: Path) -> Any:
    """``raw`` (as written) with each value that ``validated`` (the model it became) holds as a relative path
    taken from ``base``."""
    if isinstance(validated, Path) and isinstance(raw, str | Path):
        return str(rooted(validated, base))
    if isinstance(raw, dict) and isinstance(validated, BaseModel):
        return {key: _anchor_raw(value, getattr(validated, key, None), base) for key, value in raw.items()}
    if isinstance(raw, dict) and isinstance(validated, dict):
        return {key: _anchor_raw(value, validated.get(key), base) for key, value in raw.items()}
    if isinstance(raw, list) and isinstance(validated, list) and len(raw) == len(validated):
        return [_anchor_raw(r, v, base) for r, v in zip(raw, validated, strict=True)]
    return raw


def _pod_identity_problems(cfg: BackendConfig) -> list[str]:
    """What one identity's merged backend lacks to ask its store with the pod's token ("key: problem")."""
    problems = []
    if cfg.type in AWS_TYPES and getattr(cfg, "role_arn", None) is None:
        problems.append("role_arn: required in node mode (the role the pod's token assumes)")
    elif cfg.type == "gcp_secret_manager":
        if getattr(cfg, "federation", None) is None:
            problems.append("federation: required in node mode (the pool provider the pod's token is exchanged at)")
        if getattr(cfg, "project_id", None) is None:
            problems.append("project_id: required in node mode")
    elif cfg.type == "azure_key_vault":
        if getattr(cfg, "credential", None) != "workload_identity":
            problems.append("credential: must be workload_identity in node mode")
        for key in ("client_id", "tenant_id"):
            if getattr(cfg, key, None) is None:
                problems.append(f"{key}: required in node mode (the app whose federated credential trusts the pod)")
    return problems


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def node_errors(config: BrokerConfig) -> list[str]:
    """What node mode forbids in the rest of the config, and every identity's chain checked; without a
    ``node:`` section, the keys that only node mode gives an effect."""
    node = config.node
    errors: list[str] = []
    if node is None:
        for i, backend in enumerate(config.backends):
            if getattr(backend, "federation", None) is not None:
                errors.append(
                    f"backends[{i}].federation: only in node mode (a sidecar uses credentials_file with an "
                    "external_account file)"
                )
        return errors
    if config.listen.tcp is not None:
        errors.append("listen.tcp: not allowed in node mode: node mode serves its unix socket only")
    if config.listen.socket is None:
        errors.append("listen.socket: required in node mode")
    for kind in ("connections", "variables", "config"):
        if getattr(config.prefetch, kind):
            errors.append(f"prefetch.{kind}: not supported in node mode (each identity's cache fills on first use)")
    for i, backend in enumerate(config.backends):
        if backend.type in NODE_WIDE_TYPES:
            errors.append(f"backends[{i}].type: {backend.type} is not allowed in node mode: it has no per-pod identity")
        elif backend.type == "gcp_secret_manager" and getattr(backend, "credentials_file", None) is not None:
            errors.append(f"backends[{i}].credentials_file: a node-wide identity; node mode uses federation")
        elif backend.type == "azure_key_vault" and getattr(backend, "credential", None) != "workload_identity":
            errors.append(
                f"backends[{i}].credential: {getattr(backend, 'credential', None)} is a node-wide identity; node "
                "mode uses workload_identity with the pod's token"
            )
        elif backend.type == "vault":
            method = backend.auth.method  # type: ignore[attr-defined]
            if method not in POD_AUTH_METHODS:
                errors.append(
                    f"backends[{i}].auth.method: {method} is a node-wide identity; node mode logs in with the "
                    "pod's token (kubernetes or jwt)"
                )
    for j, identity in enumerate(node.identities):
        identity_chain(identity, config.backends, errors, f"node.identities[{j}]")
    return errors
