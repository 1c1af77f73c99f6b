"""The data plane between Ray stage actors: a TCP link per hop.

Ray places, supervises and restarts the actors (the control plane); runs,
hidden states and results go stage to stage over these links instead of a
Ray actor call each (~1 ms of task overhead a call). A link is
multiprocessing.connection from the standard library (length-prefixed
messages, HMAC handshake with a key only this transport's processes hold),
between machines as on one. Messages are pickled with the wall time they
were sent, so the receiving end measures the hop; a tensor travels as its
raw bytes (torch's own pickling of one costs ~0.1 ms a hop, measured here;
its bytes through numpy ~0.02 ms).
"""

from __future__ import annotations

import copyreg
import io
import logging
import os
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import AuthenticationError, Pipe
from multiprocessing.connection import Client, Connection, Listener, wait

import torch

log = logging.getLogger(__name__)

Address = tuple[str, int]
HOP_SAMPLES = 4096


def _tensor_from_bytes(data, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def _tensor_as_bytes(tensor: torch.Tensor):
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return _tensor_from_bytes, (flat.view(torch.uint8).numpy(), str(tensor.dtype).removeprefix("torch."),
                                tuple(tensor.shape))


class _Pickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _tensor_as_bytes}


def dumps(message: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


class Link:
    """The sending end of one hop (thread-safe)."""

    def __init__(self, address: Address, authkey: bytes) -> None:
        self._conn = _no_delay(Client(address, authkey=authkey))
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        """Raises OSError where the receiving end is gone."""
        data = dumps((time.time(), message))
        with self._lock:
            self._conn.send_bytes(data)

    def close(self) -> None:
        self._conn.close()


def _no_delay(conn: Connection) -> Connection:
    """A message goes out as it is written, not held back for the last one's
    acknowledgement (Nagle's algorithm): these are small and latency-bound."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class HopStats:
    """What came in over a link: messages, bytes, and the time from send to
    the stage taking it (the last HOP_SAMPLES): the hop, and any wait behind
    a forward in progress (Transport.measure_hops times the hop alone)."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.seconds: deque[float] = deque(maxlen=HOP_SAMPLES)

    def add(self, num_bytes: int, seconds: float) -> None:
        self.messages += 1
        self.bytes += num_bytes
        self.seconds.append(seconds)

    def as_dict(self) -> dict:
        times = sorted(self.seconds) or [0.0]
        return {"messages": self.messages, "wait_ms_p50": round(1000 * times[len(times) // 2], 4),
                "wait_ms_p99": round(1000 * times[min(len(times) - 1, len(times) * 99 // 100)], 4),
                "bytes_per_message": round(self.bytes / max(self.messages, 1), 1)}


class Inbox:
    """The receiving end: a listening socket and the connections made to it
    (a neighbour that reconnects after a restart is taken in). take() reads
    what has arrived on the thread that handles it, so a message crosses no
    thread on the way in; given on_message, a thread of its own delivers
    them instead. Each sender's messages come in the order it sent them."""

    def __init__(self, host: str, authkey: bytes, on_message: Callable[[object], None] | None = None) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address: Address = self._listener.address
        self.hops = HopStats()
        self._closed = False
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self._new_conn, self._tell_new_conn = Pipe(duplex=False)  # wakes take() for a new connection or close
        threading.Thread(target=self._accept, name="inbox-accept", daemon=True).start()
        if on_message is not None:
            threading.Thread(target=self._deliver, args=(on_message,), name="inbox-deliver", daemon=True).start()

    def take(self) -> list[object]:
        """Every message that has arrived, waiting for at least one; [] once closed."""
        while not self._closed:
            with self._lock:
                conns = list(self._conns)
            messages = []
            for conn in wait([self._new_conn, *conns]):
                if conn is self._new_conn:
                    conn.recv_bytes()
                    continue
                try:
                    while conn.poll():
                        messages.append(self._read(conn))
                except (OSError, EOFError):  # the sender is gone
                    with self._lock:
                        self._conns.remove(conn)
                    conn.close()
            if messages:
                return messages
        return []

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._tell_new_conn.send_bytes(b"")

    def _read(self, conn: Connection) -> object:
        data = conn.recv_bytes()
        sent_at, message = pickle.loads(data)
        self.hops.add(len(data), max(0.0, time.time() - sent_at))
        return message

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, AuthenticationError) as exc:  # closed, or a peer without the key
                if not self._closed:
                    log.warning("inbox %s: refused a connection (%s)", self.address, exc)
                continue
            with self._lock:
                self._conns.append(_no_delay(conn))
            self._tell_new_conn.send_bytes(b"")

    def _deliver(self, on_message: Callable[[object], None]) -> None:
        while not self._closed:
            for message in self.take():
                on_message(message)
