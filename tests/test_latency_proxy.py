"""bench/latency_proxy.py, the benchmarks' stand-in for netem: it adds the round trip it is asked for, keeps the
bytes and their order, and is a delayed pipe (many chunks in flight), not one delay per chunk."""

from __future__ import annotations

import socket
import sys
import threading
import time

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from latency_proxy import delay_proxy  # noqa: E402


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def echo(c: socket.socket) -> None:
                with c:
                    while data := c.recv(1 << 16):
                        c.sendall(data)

            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 16, n - len(buf)))
        assert chunk, "connection closed early"
        buf += chunk
    return bytes(buf)


def test_proxy_adds_the_rtt_and_keeps_bytes_in_order():
    srv, port = _echo_server()
    rtt = 0.040
    with delay_proxy("127.0.0.1", port, rtt_ms=rtt * 1000) as pport, \
            socket.create_connection(("127.0.0.1", pport)) as s:
        t0 = time.perf_counter()
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        first = time.perf_counter() - t0  # handshake RTT + one request RTT
        assert first >= 2 * rtt * 0.95
        pings = []
        for i in range(5):
            t0 = time.perf_counter()
            s.sendall(bytes([i]))
            assert _recv_exactly(s, 1) == bytes([i])
            pings.append(time.perf_counter() - t0)
        assert rtt * 0.95 <= min(pings) and sorted(pings)[2] < rtt * 3  # the added RTT, not a multiple of it
        # 8 MB in 64 KB writes from a thread while this one reads: pipelined, so the whole transfer takes about
        # one RTT plus transfer time, far below 128 chunks x RTT/2 (= 2.6 s); order and content intact
        payload = bytes(range(256)) * (8 * 4096)
        t0 = time.perf_counter()
        sender = threading.Thread(target=lambda: [s.sendall(payload[i:i + 65536])
                                                  for i in range(0, len(payload), 65536)])
        sender.start()
        got = _recv_exactly(s, len(payload))
        sender.join()
        bulk = time.perf_counter() - t0
    srv.close()
    assert got == payload
    assert bulk < 128 * rtt / 2 / 4
