"""The bulk data path of a pull, as a client reads it: raw block bytes over a plain TCP socket.

A PullBlocks call with `bulk` set may open with a BulkOffer (a ticket, the store's bulk port and
the pinned blocks' headers). The client connects to that port on the store's host, sends the
ticket, and reads the blocks' bytes back to back, each straight into its own buffer (`recv_into`,
no copy in Python). Headers and checksums come only through gRPC; the bytes are verified against
them by the caller, once, as every pulled block is. The gRPC stream then ends with the
PullSummary as usual. The protocol and its guarantees are in docs/pull_path.md.
"""

import socket
from collections.abc import Callable, Iterator

import numpy as np

from kvcluster.proto import cache_pb2, common_pb2

TICKET_BYTES = 16  # 128 random bits
# A bulk port a firewall drops must cost a pull seconds, not its whole timeout, before the fallback.
CONNECT_SECONDS = 2.0


class BulkBroken(ConnectionError):
    """The bulk connection ended in the middle of a block, or the store refused the ticket."""


def store_host(target: str) -> str:
    """The host part of a "host:port" gRPC target ("[::1]:50053" -> "::1")."""
    host = target.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def receive_blocks(host: str, offer: cache_pb2.BulkOffer, block_nbytes: int, timeout_s: float | None,
                   into: Callable[[int], memoryview] | None = None) -> Iterator[tuple[common_pb2.BlockRef, memoryview]]:
    """Each offered block as it arrives, unverified, received straight into `into(position)` (by
    default a new uninitialised buffer per block). Stops early, without error, where the store
    closed the connection between two blocks (it stopped the pull; the summary says why); raises
    BulkBroken where it closed inside a block or before the first byte of a nonempty offer."""
    if into is None:  # not zero-filled (recv_into is the only write); block-sized, so malloc reuses freed ones
        into = lambda position: memoryview(np.empty(block_nbytes, dtype=np.uint8))  # noqa: E731
    connect_s = min(CONNECT_SECONDS, timeout_s or CONNECT_SECONDS)
    with socket.create_connection((host, offer.port), timeout=connect_s) as connection:
        connection.settimeout(timeout_s)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.sendall(offer.ticket)
        for position, header in enumerate(offer.headers):
            payload = into(position)
            if len(payload) != block_nbytes:
                raise ValueError(f"into({position}) gave {len(payload)} bytes for a block of {block_nbytes}")
            received = _receive_into(connection, payload)
            if received == 0 and position > 0:
                return
            if received < block_nbytes:
                raise BulkBroken(f"the bulk connection ended after {received} of {block_nbytes} bytes of block "
                                 f"{position}" + (" (ticket refused?)" if position == 0 else ""))
            yield header, payload


def _receive_into(connection: socket.socket, buffer: memoryview) -> int:
    """Fill `buffer` from the socket; how many bytes came before end of stream."""
    received = 0
    while received < len(buffer):
        count = connection.recv_into(buffer[received:])
        if count == 0:
            break
        received += count
    return received
