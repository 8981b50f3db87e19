"""The store's bulk listener: hands a pull's TCP connection to the gRPC handler that holds its pins.

A PullBlocks handler that offers the bulk path opens a ticket here and waits for it to be claimed.
The listener accepts connections, reads each one's ticket (a few seconds at most, on a small
thread pool, so a silent peer holds no accept loop) and gives the socket to the waiting handler;
the handler then sends exactly the blocks it pinned, straight from the pool, and ends the call
as a streamed pull does. So pins, the stream watchdog, counters and the summary are the same
for both paths.

Tickets: 128 random bits from `secrets`, single use (taken out of the book by the first
connection that presents it, or by its handler when it expires), valid for `ticket_s`, and
bound to one pull's pinned set (only the handler that opened it sends, and only what it pinned).
A connection presenting an unknown, used or expired ticket is closed without a byte.
"""

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

from kvcluster.rpc.bulk import TICKET_BYTES

log = logging.getLogger(__name__)
HANDSHAKE_WORKERS = 4


@dataclass
class Ticket:
    """One offered transfer: its secret and, once claimed, the client's connection."""

    secret: bytes
    claimed: threading.Event = field(default_factory=threading.Event)
    connection: socket.socket | None = None


class BulkListener:
    """A TCP listener for bulk pulls and the book of open tickets. Thread-safe."""

    def __init__(self, host: str, port: int, ticket_s: float):
        self.ticket_s = ticket_s
        host = host.strip("[]")
        self._server = socket.create_server((host, port), family=_family(host), backlog=64)
        self.port = self._server.getsockname()[1]
        self._tickets: dict[bytes, Ticket] = {}
        self._connections: set[socket.socket] = set()  # claimed, not yet finished
        self._lock = threading.Lock()
        self._handshakes = futures.ThreadPoolExecutor(HANDSHAKE_WORKERS, thread_name_prefix="bulk-handshake")
        self.refused = 0  # connections closed for an unknown, used or expired ticket (a metric)
        self._thread = threading.Thread(target=self._accept_loop, name="bulk-listener", daemon=True)
        self._thread.start()

    def open_ticket(self) -> Ticket:
        ticket = Ticket(secrets.token_bytes(TICKET_BYTES))
        with self._lock:
            self._tickets[ticket.secret] = ticket
        return ticket

    def wait(self, ticket: Ticket, still_wanted: Callable[[], bool]) -> socket.socket | None:
        """The connection that claimed `ticket`, or None once it expired unused or `still_wanted()`
        turned false (the call was cancelled). An expired ticket can no longer be claimed."""
        deadline = time.monotonic() + self.ticket_s
        while time.monotonic() < deadline and still_wanted():
            if ticket.claimed.wait(0.05):
                return ticket.connection
        with self._lock:
            withdrawn = self._tickets.pop(ticket.secret, None) is not None
        if withdrawn:
            return None
        ticket.claimed.wait()  # claimed in the meantime: the claimer sets it right after the pop
        return ticket.connection

    def hang_up(self, connection: socket.socket) -> None:
        """End a claimed connection now: a send blocked on it fails at once (its call was cancelled,
        or the store is stopping). Idempotent."""
        _shut(connection)

    def finished(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
        connection.close()

    def close(self) -> None:
        _shut(self._server)  # wakes the blocked accept (close alone does not)
        self._server.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _shut(connection)
        self._thread.join(timeout=5)
        self._handshakes.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            tickets, self._tickets = list(self._tickets.values()), {}
        for ticket in tickets:  # waiting handlers see no connection and end their pulls
            ticket.claimed.set()

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed
                return
            try:
                self._handshakes.submit(self._handshake, connection)
            except RuntimeError:  # shut down
                connection.close()
                return

    def _handshake(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(self.ticket_s)
            secret = _receive_exactly(connection, TICKET_BYTES)
        except OSError:
            secret = b""
        with self._lock:
            ticket = self._tickets.pop(secret, None)
            self.refused += ticket is None
        if ticket is None:
            log.warning("bulk connection refused: unknown, used or expired ticket")
            connection.close()
            return
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._connections.add(connection)
        ticket.connection = connection
        ticket.claimed.set()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = connection.recv(size - len(data))
        if not more:
            break
        data += more
    return data


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
