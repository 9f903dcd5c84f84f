"""The threaded HTTP server every loopback test server is built on.

``http.server.ThreadingHTTPServer`` listens with socketserver's backlog of 5. A client that opens more
connections at once than that (botocore's pool opens up to 16 for 16 threads' first calls) overflows the
accept queue: the kernel drops the handshakes it has no room for, and under machine load some of those
connections are reset, so a call fails with a connection error that says nothing about the code under test.
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer


class LoopbackHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with room for every connection a test opens at once; handler threads are daemons."""

    request_queue_size = 128
    daemon_threads = True
