"""A TCP proxy that adds network round-trip latency without limiting throughput (a userspace stand-in for
``tc qdisc ... netem delay``, which the benchmark kernel lacks: see bench/README.md, "S3: added latency").

Every chunk read from one side is stamped with its arrival time and written to the other side at
arrival + RTT/2, in order. Reading and writing are separate tasks joined by a queue, so many chunks are in
flight at once (a pipe with a delay, like a long link), not read-sleep-write (which would cap throughput at
one chunk per delay). A new connection's first bytes also wait one extra RTT, as the TCP handshake over the
delayed link would have made the client wait.

    python bench/latency_proxy.py --target 127.0.0.1:8333 --rtt-ms 20      # prints "listening on PORT"

or in-process: ``with delay_proxy("127.0.0.1", 8333, rtt_ms=20) as port: ...`` (a background thread).
``python bench/latency_proxy.py --rtt-ms 20 --measure`` checks it against a loopback test server: the round
trip it adds and its throughput, vs the same server direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

CHUNK = 1 << 20


async def _pump(reader: asyncio.StreamReader, queue: asyncio.Queue, not_before: float = 0.0) -> None:
    """Read chunks as they arrive and stamp them (no earlier than ``not_before``); None ends the stream."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            queue.put_nowait((max(loop.time(), not_before), data))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((max(loop.time(), not_before), None))


async def _deliver(queue: asyncio.Queue, writer: asyncio.StreamWriter, delay: float) -> None:
    """Write each chunk at its arrival + delay, in order; half-close at end of stream."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            t, data = await queue.get()
            wait = t + delay - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


class DelayProxy:
    """Listen on 127.0.0.1:``port`` (0 = any free port) and forward to ``host:port`` with ``rtt_ms`` added."""

    def __init__(self, host: str, port: int, rtt_ms: float, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.one_way = rtt_ms / 2000.0
        self.listen_port = listen_port
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(c_writer)
        # the client's connect() returned at once here, but over a delayed link it would have taken one RTT:
        # its first bytes leave no earlier than that, then take RTT/2 to reach the server
        not_before = asyncio.get_running_loop().time() + 2 * self.one_way
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        self._writers.add(s_writer)
        to_server: asyncio.Queue = asyncio.Queue()
        to_client: asyncio.Queue = asyncio.Queue()
        try:
            await asyncio.gather(_pump(c_reader, to_server, not_before),
                                 _deliver(to_server, s_writer, self.one_way),
                                 _pump(s_reader, to_client), _deliver(to_client, c_writer, self.one_way))
        finally:
            for w in (c_writer, s_writer):
                w.close()
                self._writers.discard(w)

    async def serve(self, started: threading.Event | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (forever without one); then close every connection."""
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.listen_port = server.sockets[0].getsockname()[1]
        if started is not None:
            started.set()
        else:
            print(f"listening on {self.listen_port}", flush=True)
        await (stop or asyncio.Event()).wait()
        server.close()
        for w in self._writers:
            w.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:  # closed sockets end the pumps; cancel only what still hangs
            _, pending = await asyncio.wait(others, timeout=2)
            for t in pending:
                t.cancel()
        await server.wait_closed()


@contextlib.contextmanager
def delay_proxy(host: str, port: int, rtt_ms: float) -> Iterator[int]:
    """The proxy on a daemon thread of this process; yields its port."""
    proxy = DelayProxy(host, port, rtt_ms)
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    th = threading.Thread(target=lambda: loop.run_until_complete(proxy.serve(started, stop)), daemon=True)
    th.start()
    if not started.wait(10):
        raise RuntimeError("latency proxy did not start")
    try:
        yield proxy.listen_port
    finally:
        loop.call_soon_threadsafe(stop.set)
        th.join(10)
        loop.close()


@contextlib.contextmanager
def delay_proxy_process(host: str, port: int, rtt_ms: float) -> Iterator[int]:
    """The proxy as a child process (its own interpreter, so it never competes for this one's GIL)."""
    proc = subprocess.Popen([sys.executable, __file__, "--target", f"{host}:{port}", "--rtt-ms", str(rtt_ms)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"latency proxy did not start: {line!r}")
        yield int(line.split()[-1])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_test(n_bulk: int) -> int:
    """A loopback server for ``measure``: echoes 1-byte pings; b"B" asks for n_bulk bytes. -> its port."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def conn(c: socket.socket) -> None:
        block = b"\0" * (1 << 20)
        with c:
            while data := c.recv(1):
                if data == b"B":
                    for i in range(0, n_bulk, len(block)):
                        c.sendall(block[:n_bulk - i])
                else:
                    c.sendall(data)

    def accept() -> None:
        while True:
            threading.Thread(target=conn, args=(srv.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def measure(rtt_ms: float, n_bulk: int = 512 << 20, pings: int = 30) -> None:
    """Check the proxy without any S3: median and min round trip of 1-byte pings on one connection, and MB/s
    of one bulk transfer, direct vs through the proxy (a child process, as the benchmarks run it)."""
    import socket
    import statistics

    port = _serve_test(n_bulk)

    def probe(p: int) -> tuple[float, float, float]:
        with socket.create_connection(("127.0.0.1", p)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            s.recv(1)
            ts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                s.sendall(b"p")
                s.recv(1)
                ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.sendall(b"B")
            got = 0
            while got < n_bulk:
                got += len(s.recv(1 << 20))
            return statistics.median(ts) * 1e3, min(ts) * 1e3, got / 1e6 / (time.perf_counter() - t0)

    with delay_proxy_process("127.0.0.1", port, rtt_ms) as pport:
        d, p = probe(port), probe(pport)
    print(f"+{rtt_ms:g} ms RTT asked; 1-byte ping round trip median (min), ms: direct {d[0]:.2f} ({d[1]:.2f}), "
          f"proxy {p[0]:.2f} ({p[1]:.2f}), added {p[0] - d[0]:.2f} ({p[1] - d[1]:.2f}); "
          f"{n_bulk >> 20} MB transfer: direct {d[2]:,.0f} MB/s, proxy {p[2]:,.0f} MB/s ({p[2] / d[2]:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="HOST:PORT to forward to")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round-trip time to add, milliseconds")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    ap.add_argument("--measure", action="store_true", help="measure the proxy against a loopback test server")
    a = ap.parse_args()
    if a.measure:
        measure(a.rtt_ms)
        return
    if not a.target:
        ap.error("--target HOST:PORT is required (or --measure)")
    host, _, port = a.target.rpartition(":")
    t0 = time.time()
    try:
        asyncio.run(DelayProxy(host, int(port), a.rtt_ms, a.port).serve())
    except KeyboardInterrupt:
        print(f"stopped after {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
