"""A fake EC2 instance metadata service (IMDSv2) on 127.0.0.1 for the spot watcher tests.

It speaks the three calls the watcher makes: ``PUT /latest/api/token`` (needs the TTL
header), and, with a valid ``X-aws-ec2-metadata-token``, ``GET .../spot/instance-action``
(404 until a notice is set, or after ``notice_after_gets`` GETs) and
``GET .../instance-life-cycle``. A missing or revoked token gets 401, as on EC2.
"""

from __future__ import annotations

import http.server
import itertools
import threading
from dataclasses import dataclass, field


@dataclass
class ImdsState:
    notice: str | None = None  # instance-action body once a notice is due
    notice_after_gets: int = 0  # the notice shows from this GET on (0 = at once)
    lifecycle: str = "spot"
    tokens: set[str] = field(default_factory=set)
    puts: list[str] = field(default_factory=list)  # the TTL header of each PUT
    gets: list[tuple[str, str | None, int]] = field(default_factory=list)  # path, token, code
    lock: threading.Lock = field(default_factory=threading.Lock)

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def action_gets(self) -> int:
        return sum(1 for path, _, _ in self.gets if path.endswith("instance-action"))


class FakeImds:
    """``with FakeImds() as imds: ImdsClient(imds.endpoint)`` -- a thread, 127.0.0.1 only."""

    def __init__(self) -> None:
        self.state = ImdsState()
        state, counter = self.state, itertools.count(1)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl:
                    self._send(400)
                    return
                with state.lock:
                    token = f"token-{next(counter)}"
                    state.tokens.add(token)
                    state.puts.append(ttl)
                self._send(200, token)

            def do_GET(self) -> None:  # noqa: N802
                token = self.headers.get("X-aws-ec2-metadata-token")
                with state.lock:
                    if token not in state.tokens:
                        code, body = 401, ""
                    elif self.path == "/latest/meta-data/spot/instance-action":
                        n = sum(1 for p, _, c in state.gets if p == self.path and c != 401)
                        due = state.notice is not None and n >= state.notice_after_gets
                        code, body = (200, state.notice or "") if due else (404, "")
                    elif self.path == "/latest/meta-data/instance-life-cycle":
                        code, body = 200, state.lifecycle
                    else:
                        code, body = 404, ""
                    state.gets.append((self.path, token, code))
                self._send(code, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeImds:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
