"""A configured OpenBao for the Vault backend tests: KV v1/v2 in Airflow's layout, policies, and every
auth method the broker supports (kubernetes against a local TokenReview endpoint, jwt with a key made
here, approle, token)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.servers.openbao import OpenBao, approle, approle_auth
from tests.servers.tokenreview import TokenReviewServer
from tests.support.leakcheck import plant

PASSWORD = "p@ss/w:rd#-vault-7c1e"
VARIABLE = "vault-variable-value-5d2a"
CONFIG_VALUE = "vault-config-value-8e3b"

POLICY = """
path "secret/data/connections/*" { capabilities = ["read"] }
path "secret/data/variables/*" { capabilities = ["read"] }
path "secret/data/config/*" { capabilities = ["read"] }
path "kv1/*" { capabilities = ["read"] }
path "database/creds/airflow" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""


def self_signed_ca_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-k8s-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class VaultEnv:
    bao: OpenBao
    tokenreview: TokenReviewServer
    jwt_key: Any
    files: Path
    secret_id: str = ""
    role_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def make_jwt(self, sub: str = "system:serviceaccount:airflow:airflow", aud: str = "vault", ttl: int = 600) -> str:
        now = int(time.time())
        claims = {"iss": "https://issuer.test", "sub": sub, "aud": aud, "iat": now, "exp": now + ttl}
        return pyjwt.encode(claims, self.jwt_key, algorithm="RS256")

    def k8s_token(self, tag: str) -> str:
        """A service-account token as the kubelet projects it (Vault parses it before the TokenReview)."""
        now = int(time.time())
        claims = {
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:airflow:airflow",
            "aud": ["vault"],
            "iat": now,
            "exp": now + 3600,
            "jti": tag,
            "kubernetes.io": {"namespace": "airflow", "serviceaccount": {"name": "airflow", "uid": "uid-airflow"}},
        }
        return pyjwt.encode(claims, self.jwt_key, algorithm="RS256")

    def backend(self, method: str = "approle", **overrides: Any) -> dict[str, Any]:
        auth: dict[str, Any] = {"method": method}
        if method == "approle":
            auth = approle_auth(self.files, "airflow")
        elif method in ("kubernetes", "jwt"):
            auth |= {"role": "airflow", "token_path": str(self.files / f"{method}.token")}
        elif method == "token":
            auth |= {"token_file": str(self.files / "vault.token")}
        auth |= overrides.pop("auth", {})
        return {
            "name": "vault",
            "type": "vault",
            "url": self.bao.url,
            "auth": auth,
            "timeout": 3,
            "retries": 1,
            **overrides,
        }


@pytest.fixture(scope="session")
def vault_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultEnv]:
    work = tmp_path_factory.mktemp("openbao")
    bao = OpenBao(work / "server").start()
    reviews = TokenReviewServer().start()
    files = work / "files"
    files.mkdir()
    try:
        c = bao.client()
        c.sys.create_or_update_policy("airflow-read", POLICY)
        # KV v2 at secret/ (the dev default), Airflow's default layout
        bao.kv2_put(
            "connections/pg_fields",
            {
                "conn_type": "postgres",
                "host": "db.vault",
                "login": "u",
                "password": PASSWORD,
                "port": "5432",
                "extra": '{"sslmode": "require", "nested": {"a": 1}}',
            },
        )
        bao.kv2_put("connections/pg_uri", {"conn_uri": "postgres://u:p%40ss%2Fw%3Ard%23@db.vault:5432/airflow"})
        bao.kv2_put("variables/plain", {"value": VARIABLE})
        bao.kv2_put("config/sql_alchemy_conn", {"value": CONFIG_VALUE})
        # path lists, nested ids and team-scoped paths (provider layouts)
        bao.kv2_put("variables/extra/only_extra", {"value": "from-the-first-path"})
        bao.kv2_put("variables/team1/db", {"value": "nested-value"})
        bao.kv2_put("variables/alpha/scoped", {"value": "alpha-scoped"})
        bao.kv2_put("variables/beta/scoped", {"value": "beta-scoped"})
        c.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        c.secrets.kv.v1.create_or_update_secret(
            path="airflow/connections/v1conn", mount_point="kv1", secret={"conn_uri": "mysql://a:b@h:3306/s"}
        )
        c.secrets.kv.v1.create_or_update_secret(
            path="airflow/variables/v1var", mount_point="kv1", secret={"value": "kv1-value"}
        )
        # approle with short tokens so renewal and re-login happen within a test
        role_id, secret_id = approle(c, "airflow", ["airflow-read"], "60s", "10m", files)
        approle(c, "short", ["airflow-read"], "3s", "8s", files)
        # jwt with a key made here
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        c.sys.enable_auth_method("jwt")
        c.write("auth/jwt/config", jwt_validation_pubkeys=[pub], bound_issuer="https://issuer.test")
        c.write(
            "auth/jwt/role/airflow",
            role_type="jwt",
            user_claim="sub",
            bound_audiences=["vault"],
            bound_subject="system:serviceaccount:airflow:airflow",
            token_policies=["airflow-read"],
            token_ttl="60s",
        )
        # kubernetes against the local TokenReview endpoint
        c.sys.enable_auth_method("kubernetes")
        c.write(
            "auth/kubernetes/config",
            kubernetes_host=reviews.url,
            disable_local_ca_jwt=True,
            kubernetes_ca_cert=self_signed_ca_pem(),
        )
        c.write(
            "auth/kubernetes/role/airflow",
            bound_service_account_names=["airflow"],
            bound_service_account_namespaces=["airflow"],
            token_policies=["airflow-read"],
            token_ttl="60s",
        )
        token = c.auth.token.create(policies=["airflow-read"], ttl="1h", renewable=True)["auth"]["client_token"]
        (files / "vault.token").write_text(token)
        env = VaultEnv(bao, reviews, key, files, secret_id=secret_id, role_id=role_id)
        (files / "jwt.token").write_text(env.make_jwt())
        env.extra["k8s_a"] = env.k8s_token("a")
        reviews.valid[env.extra["k8s_a"]] = "airflow:airflow"
        (files / "kubernetes.token").write_text(env.extra["k8s_a"])
        yield env
    finally:
        reviews.stop()
        bao.stop()


plant("vault", PASSWORD, VARIABLE, CONFIG_VALUE)
