"""Send the same raw requests to ``broker serve`` and to the fast-front variant; compare the answers.

A check of the fast path in ``broker/server/fast.py`` (status, error code, value, cache header, and that
the connection stays usable), including hostile and unusual requests. Prints a table; exits 1 on a
difference. Usage: python benchmarks/fast_equivalence.py
"""

from __future__ import annotations

import json
import re
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack

T = stack.TOKEN
CASES: list[tuple[str, bytes]] = [
    ("hit", b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("variable", b"GET /v1/variables/v1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("not found", b"GET /v1/connections/nope HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("no token", b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("wrong token", b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: nope-nope-nope-nope\r\n\r\n"),
    (
        "two tokens",
        b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: bad-bad-bad-bad-bad\r\n"
        b"X-Broker-Token: %s\r\n\r\n" % T.encode(),
    ),
    (
        "forwarded",
        b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
        % T.encode(),
    ),
    ("dotdot", b"GET /v1/connections/.. HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("encoded slash", b"GET /v1/connections/a%%2Fb HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("bad utf-8", b"GET /v1/connections/%%ff%%fe HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("query", b"GET /v1/connections/c1?x=1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    (
        "POST secret",
        b"POST /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\nContent-Length: 0\r\n\r\n" % T.encode(),
    ),
    ("HEAD", b"HEAD /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("HTTP/1.0", b"GET /v1/connections/c1 HTTP/1.0\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("unknown kind", b"GET /v1/secrets/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    ("healthz", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % T.encode()),
    (
        "invalidate",
        b"POST /v1/cache/invalidate HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\nContent-Length: 2\r\n\r\n{}"
        % T.encode(),
    ),
    ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"),
    (
        "pipelined x2",
        b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n"
        b"GET /v1/variables/v1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % (T.encode(), T.encode()),
    ),
    (
        "hit then bad",
        b"GET /v1/connections/c1 HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n"
        b"GET /v1/connections/%%2e%%2e HTTP/1.1\r\nHost: x\r\nX-Broker-Token: %s\r\n\r\n" % (T.encode(), T.encode()),
    ),
]


def exchange(port: int, raw: bytes) -> str:
    """Status codes, error codes and X-Broker-Cache of every answer to ``raw``, then a follow-up hit."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        sock.settimeout(1.0)
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.count(b"HTTP/1.") >= raw.count(b" HTTP/1.") and data.endswith(b"}"):
                    break
        except TimeoutError:
            pass
    out = []
    for m in re.finditer(rb"HTTP/1\.\d (\d{3})[^\r]*\r\n(.*?)\r\n\r\n", data, re.S):
        headers = m.group(2).decode(errors="replace").lower()
        cache = re.search(r"x-broker-cache: (\w+)", headers)
        start = m.end()
        length = re.search(r"content-length: (\d+)", headers)
        body = data[start : start + int(length.group(1))] if length else b""
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        out.append(f"{m.group(1).decode()} {doc.get('error', '')}{cache.group(1) if cache else ''}".strip())
    return ", ".join(out) or "(no answer)"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="broker-fast-eq-"))
    (work / "connections.json").write_text(json.dumps({"c1": "postgres://u:p@h:5432/db"}))
    (work / "variables.json").write_text(json.dumps({"v1": "value-1"}))
    cfg = {
        "cache": {"ttl": 3600},
        "backends": [
            {
                "name": "f",
                "type": "file",
                "connections_file_path": str(work / "connections.json"),
                "variables_file_path": str(work / "variables.json"),
            }
        ],
    }
    plain_cfg = json.loads(json.dumps(cfg))
    plain_cfg.setdefault("listen", {})["fast_path"] = False
    plain = stack.Daemon(work / "plain", plain_cfg, tcp=True).start()
    fast = stack.Daemon(work / "fast", json.loads(json.dumps(cfg)), tcp=True).start()
    failures = 0
    try:
        for daemon in (plain, fast):  # warm the same keys in both, so "hit" means hit
            daemon.get_tcp("/v1/connections/c1")
            daemon.get_tcp("/v1/variables/v1")
        print("| request | broker serve | fast front | same |\n|---|---|---|---|")
        for name, raw in CASES:
            a, b = exchange(plain.tcp_port or 0, raw), exchange(fast.tcp_port or 0, raw)
            same = a == b
            failures += not same
            print(f"| {name} | {a} | {b} | {'yes' if same else 'NO'} |")
    finally:
        plain.stop()
        fast.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
