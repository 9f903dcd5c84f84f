"""Kubernetes API endpoints on loopback: a minimal TokenReview for Vault's kubernetes auth method, and a
small cluster that issues real signed, pod-bound service-account tokens (TokenReview, OIDC discovery, JWKS)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.servers.httpd import LoopbackHTTPServer


class TokenReviewServer:
    """Accepts the tokens in ``valid`` (token -> service account "ns:name"); counts reviews."""

    def __init__(self) -> None:
        self.valid: dict[str, str] = {}
        self.reviews = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.reviews += 1
                token = body.get("spec", {}).get("token", "")
                account = outer.valid.get(token)
                status: dict[str, Any] = {"authenticated": False}
                if account:
                    ns, name = account.split(":")
                    status = {
                        "authenticated": True,
                        "audiences": body.get("spec", {}).get("audiences") or [],
                        "user": {
                            "username": f"system:serviceaccount:{ns}:{name}",
                            "uid": f"uid-{name}",
                            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                        },
                    }
                answer = json.dumps(
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
                ).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> TokenReviewServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------- a cluster


ISSUER_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    service_account: str
    uid: str
    node: str = "node-a"

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


class KubernetesAPI:
    """The parts of a Kubernetes API server that node mode and Vault's kubernetes auth use, on loopback.

    Issues RS256 service-account tokens bound to pods, as the kubelet's TokenRequest does (claims ``iss``,
    ``sub``, ``aud``, ``exp``, ``iat``, ``nbf``, ``jti`` and ``kubernetes.io`` naming the namespace, the
    pod, the node and the service account), and serves ``POST tokenreviews`` (signature, expiry, audience,
    and the bound pod still existing with its uid), OIDC discovery and the JWKS document. A review needs a
    valid bearer token, as the API server's authentication does.
    """

    def __init__(self, api_audiences: tuple[str, ...] = ("https://kubernetes.default.svc",)) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        self.api_audiences = list(api_audiences)
        self.pods: dict[str, Pod] = {}
        self.reviews = 0
        self.refuse_reviews = False  # answer 503 to every review (an API server outage)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == ISSUER_PATH:
                    self._json(200, outer.discovery())
                elif self.path == JWKS_PATH:
                    self._json(200, outer.jwks())
                else:
                    self._json(404, {"kind": "Status", "code": 404})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path != REVIEW_PATH:
                    self._json(404, {"kind": "Status", "code": 404})
                    return
                if outer.refuse_reviews:
                    self._json(503, {"kind": "Status", "code": 503})
                    return
                bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if outer.review(bearer, [*outer.api_audiences, "vault", "broker"], count=False) is None:
                    self._json(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return
                spec = (json.loads(raw or b"{}").get("spec")) or {}
                with outer._lock:
                    outer.reviews += 1
                audiences = spec.get("audiences") or outer.api_audiences
                status = outer.review(spec.get("token", ""), audiences) or {"authenticated": False, "error": "invalid"}
                self._json(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})

            def _json(self, code: int, payload: dict[str, Any]) -> None:
                answer = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.issuer = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> KubernetesAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------ objects

    def add_pod(self, namespace: str, service_account: str, name: str | None = None, node: str = "node-a") -> Pod:
        pod = Pod(
            namespace, name or f"{service_account}-{uuid.uuid4().hex[:8]}", service_account, str(uuid.uuid4()), node
        )
        with self._lock:
            self.pods[pod.uid] = pod
        return pod

    def delete_pod(self, pod: Pod) -> None:
        with self._lock:
            self.pods.pop(pod.uid, None)

    # ------------------------------------------------------------------------------------------ tokens

    def token(
        self,
        pod: Pod,
        audience: str | list[str] = "broker",
        ttl: int = 600,
        *,
        issued_ago: int = 0,
        bound: bool = True,
        key: Any = None,
    ) -> str:
        """A projected token for ``pod``; ``key`` signs with another key (a forgery), ``bound=False`` makes
        a legacy token that names no pod."""
        import jwt

        now = int(time.time()) - issued_ago
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": pod.username,
            "aud": [audience] if isinstance(audience, str) else audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
        }
        ns_claims: dict[str, Any] = {
            "namespace": pod.namespace,
            "serviceaccount": {"name": pod.service_account, "uid": f"sa-uid-{pod.namespace}-{pod.service_account}"},
        }
        if bound:
            ns_claims["pod"] = {"name": pod.name, "uid": pod.uid}
            ns_claims["node"] = {"name": pod.node, "uid": f"node-uid-{pod.node}"}
        claims["kubernetes.io"] = ns_claims
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    def review(self, token: str, audiences: list[str], *, count: bool = True) -> dict[str, Any] | None:
        """The TokenReview status for ``token`` (None when the API server would not authenticate it)."""
        import jwt

        try:
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "require": ["exp", "iat", "sub"]},
                issuer=self.issuer,
            )
        except jwt.PyJWTError:
            return None
        granted = [a for a in claims.get("aud", []) if a in audiences]
        if not granted:
            return None
        info = claims.get("kubernetes.io") or {}
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/credential-id": [f"JTI={claims.get('jti')}"]}
        if "pod" in info:
            with self._lock:
                pod = self.pods.get(info["pod"]["uid"])
            if pod is None or pod.name != info["pod"]["name"]:
                return None  # the bound object is gone: the API server invalidates the token
            extra |= {
                "authentication.kubernetes.io/pod-name": [pod.name],
                "authentication.kubernetes.io/pod-uid": [pod.uid],
                "authentication.kubernetes.io/node-name": [info["node"]["name"]],
                "authentication.kubernetes.io/node-uid": [info["node"]["uid"]],
            }
        ns = info.get("namespace", "")
        return {
            "authenticated": True,
            "audiences": granted,
            "user": {
                "username": claims["sub"],
                "uid": info.get("serviceaccount", {}).get("uid", ""),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                "extra": extra,
            },
        }

    # ------------------------------------------------------------------------------------------ OIDC

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.url + JWKS_PATH,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        import jwt

        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def public_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
