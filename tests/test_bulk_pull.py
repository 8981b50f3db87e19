"""The pull's bulk data path (docs/pull_path.md): raw bytes over TCP, headers over gRPC, tickets,
pins, and the fallback to the gRPC stream. Real stores on port 0, real sockets, loopback only."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from cache_store import service
from kvcluster.errors import IntegrityError, InvalidArgument
from kvcluster.proto import cache_pb2
from kvcluster.rpc.bulk import TICKET_BYTES, receive_blocks
from kvcluster.rpc.security import SecuritySettings
from kvcluster.rpc.store_client import StoreClient, verified
from tests.store_fixtures import (BIG_LAYOUT, SMALL_LAYOUT, fingerprint_for, hashes_of, make_blocks, store_config,
                                  store_factory, tail_block, wait_until)
from tests.tls_certs import make_certs

__all__ = ["store_factory"]  # a fixture, used by name
FP = fingerprint_for(BIG_LAYOUT)


def bulk_store(store_factory, layout=BIG_LAYOUT, blocks=16, **overrides):
    store, client = store_factory(store_config("", layout, blocks=blocks, **overrides))
    return store, client


def offer_of(client: StoreClient, keys, fingerprint=FP):
    """A bulk pull's stream and its BulkOffer, the blocks pinned and nothing read yet."""
    stream = client.pull_stream(fingerprint, keys, bulk=True)
    first = next(stream)
    assert first.WhichOneof("item") == "bulk"
    return stream, first.bulk


def small_window_connection(port: int) -> socket.socket:
    """A connection to the bulk port with a 64 KiB receive buffer, so a reader that stops reading
    leaves the store's send blocked (loopback buffers here grow to 32 MiB otherwise)."""
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    connection.settimeout(10)
    connection.connect(("127.0.0.1", port))
    return connection


def refused(port: int, ticket: bytes) -> bool:
    """Whether the store's bulk listener closes a connection presenting `ticket` without a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(ticket)
        return connection.recv(1) == b""


def test_blocks_are_byte_identical_over_the_bulk_path_the_grpc_stream_and_a_store_without_bulk(store_factory):
    blocks = make_blocks(BIG_LAYOUT, 6) + [tail_block(BIG_LAYOUT, "req-1")]
    keys = hashes_of(blocks[:6]) + ["req-1"]
    with_bulk, client = bulk_store(store_factory)
    without_bulk, plain_client = bulk_store(store_factory, bulk_port=-1)
    assert without_bulk.servicer.bulk is None
    for store, puller in ((with_bulk, client), (without_bulk, plain_client)):
        assert puller.push_blocks(FP, blocks, lease_seconds=60).num_rejected == 0
        stream = puller.pull_stream(FP, keys[:1], bulk=True)
        assert next(stream).WhichOneof("item") == ("bulk" if store is with_bulk else "chunk")
        stream.cancel()
        result = puller.pull_blocks(FP, keys)
        assert result.num_blocks_sent == 7 and result.stop_reason == ""
        assert [bytes(payload) for _, payload in result.blocks] == [payload for _, payload in blocks]
        assert [header.checksum for header, _ in result.blocks] == [header.checksum for header, _ in blocks]
        assert wait_until(lambda: store.pool.stats().pinned_blocks == 0)
    # the tail block was consumed by its complete pull (over the bulk path too); the full ones stay
    assert with_bulk.pool.stats().request_blocks == 0
    assert with_bulk.servicer.counters.snapshot()["bulk_pulls"] == 1
    assert without_bulk.servicer.counters.snapshot()["bulk_pulls"] == 0
    stream_only = StoreClient(client.target, BIG_LAYOUT, bulk=False)
    try:
        result = stream_only.pull_blocks(FP, keys[:6])
        assert [bytes(payload) for _, payload in result.blocks] == [payload for _, payload in blocks[:6]]
    finally:
        stream_only.close()


def test_a_pull_into_caller_buffers_lands_every_block_there_on_both_paths(store_factory):
    store, client = bulk_store(store_factory)
    blocks = make_blocks(BIG_LAYOUT, 4)
    client.push_blocks(FP, blocks)
    size = BIG_LAYOUT.block_nbytes
    for bulk in (True, False):
        puller = StoreClient(client.target, BIG_LAYOUT, bulk=bulk)
        destination = memoryview(bytearray(4 * size))
        summary = cache_pb2.PullSummary()
        for _ in puller.iter_blocks(FP, hashes_of(blocks), summary, into=lambda i: destination[i * size:(i + 1) * size]):
            pass
        puller.close()
        assert summary.num_blocks_sent == 4
        assert bytes(destination) == b"".join(payload for _, payload in blocks)


def test_corrupt_bulk_bytes_are_caught_by_the_consumer_and_the_pull_falls_back_to_the_stream(store_factory, monkeypatch):
    store, client = bulk_store(store_factory)
    blocks = make_blocks(BIG_LAYOUT, 4)
    client.push_blocks(FP, blocks)
    original_send = service._BulkTransport.send

    def corrupting_send(self, header, payload):  # flips one byte of the third block on the wire only
        if header.block_hash == blocks[2][0].block_hash:
            payload = bytearray(payload)
            payload[len(payload) // 2] ^= 0xFF
        return (yield from original_send(self, header, memoryview(payload)))

    monkeypatch.setattr(service._BulkTransport, "send", corrupting_send)
    stream, offer = offer_of(client, hashes_of(blocks))
    bulk_blocks = receive_blocks("127.0.0.1", offer, BIG_LAYOUT.block_nbytes, 10)
    checked = 0
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        for header, payload in bulk_blocks:
            verified(header, payload)
            checked += 1
    assert checked == 2
    bulk_blocks.close()
    stream.cancel()
    result = client.pull_blocks(FP, hashes_of(blocks))  # bulk, caught at block 2, the rest over the stream
    assert result.num_blocks_sent == 4
    assert [bytes(payload) for _, payload in result.blocks] == [payload for _, payload in blocks]
    assert store.servicer.counters.snapshot()["checksum_failures"] == 0  # the pool's bytes were never bad
    assert wait_until(lambda: store.pool.stats().pinned_blocks == 0)


def test_wrong_reused_and_expired_tickets_are_refused_and_the_pins_released(store_factory):
    store, client = bulk_store(store_factory, bulk_ticket_seconds=0.5)
    blocks = make_blocks(BIG_LAYOUT, 3)
    client.push_blocks(FP, blocks)
    listener = store.servicer.bulk

    # wrong ticket: refused, the real one still works once, then never again
    stream, offer = offer_of(client, hashes_of(blocks))
    assert store.pool.stats().pinned_blocks == 3
    assert refused(offer.port, secrets.token_bytes(TICKET_BYTES))
    received = list(receive_blocks("127.0.0.1", offer, BIG_LAYOUT.block_nbytes, 10))
    assert [bytes(p) for _, p in received] == [p for _, p in blocks]
    assert next(stream).summary.num_blocks_sent == 3
    assert refused(offer.port, offer.ticket)  # reuse
    assert store.pool.stats().pinned_blocks == 0

    # expired: the pull ends on its own, nothing sent, pins released, the ticket dead
    stream, offer = offer_of(client, hashes_of(blocks))
    assert store.pool.stats().pinned_blocks == 3
    summary = next(stream).summary  # the store gives up after bulk_ticket_seconds
    assert summary.num_blocks_sent == 0 and "expired" in summary.stop_reason
    assert store.pool.stats().pinned_blocks == 0
    assert refused(offer.port, offer.ticket)
    assert listener.refused == 3
    assert store.servicer.counters.snapshot()["bulk_tickets_unused"] == 1

    # a short, garbled handshake is refused too
    with socket.create_connection(("127.0.0.1", offer.port), timeout=10) as connection:
        connection.sendall(b"\x00" * 5)
        connection.shutdown(socket.SHUT_WR)
        assert connection.recv(1) == b""


def test_a_client_killed_mid_bulk_transfer_leaks_no_pins(store_factory):
    store, client = bulk_store(store_factory, blocks=40)
    blocks = make_blocks(BIG_LAYOUT, 32)  # 16 MiB: more than the socket buffers hold
    client.push_blocks(FP, blocks)
    script = (
        "import sys, socket\n"
        "from kvcluster.rpc.store_client import StoreClient\n"
        "from tests.store_fixtures import BIG_LAYOUT, fingerprint_for, hashes_of, make_blocks\n"
        "from tests.test_bulk_pull import small_window_connection\n"
        "client = StoreClient(sys.argv[1], BIG_LAYOUT)\n"
        "stream = client.pull_stream(fingerprint_for(BIG_LAYOUT), hashes_of(make_blocks(BIG_LAYOUT, 32)), bulk=True)\n"
        "offer = next(stream).bulk\n"
        "connection = small_window_connection(offer.port)\n"
        "connection.sendall(offer.ticket)\n"
        "connection.recv(65536)\n"
        "print('reading', flush=True)\n"
        "sys.stdin.read()\n")
    puller = subprocess.Popen([sys.executable, "-c", script, client.target], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert puller.stdout.readline().strip() == "reading"  # 64 KiB of the 32 blocks arrived: mid-transfer
        assert store.pool.stats().pinned_blocks == 32  # the handler cannot finish: nobody reads the rest
        assert store.servicer.counters.snapshot()["pull_seconds"] == 0
        os.kill(puller.pid, signal.SIGKILL)
        puller.wait(10)
    finally:
        puller.kill()
    assert wait_until(lambda: store.pool.stats().pinned_blocks == 0, timeout_s=10)
    result = client.pull_blocks(FP, hashes_of(blocks[:2]))  # the store serves on
    assert [bytes(p) for _, p in result.blocks] == [p for _, p in blocks[:2]]


def test_a_failing_bulk_path_falls_back_to_the_grpc_stream(store_factory):
    store, client = bulk_store(store_factory)
    blocks = make_blocks(BIG_LAYOUT, 3)
    client.push_blocks(FP, blocks)
    store.servicer.bulk.close()  # offers still go out, but nobody listens on the port
    result = client.pull_blocks(FP, hashes_of(blocks))
    assert result.num_blocks_sent == 3
    assert [bytes(p) for _, p in result.blocks] == [p for _, p in blocks]
    assert wait_until(lambda: store.pool.stats().pinned_blocks == 0)


def test_a_tls_store_never_offers_the_plain_bulk_socket(store_factory, tmp_path):
    certs = make_certs(tmp_path)
    store, _ = store_factory(store_config("", SMALL_LAYOUT, tls_cert=certs.server_cert, tls_key=certs.server_key))
    assert store.servicer.bulk is None
    credentials = SecuritySettings(tls_ca=certs.ca).channel_credentials()
    client = StoreClient(f"127.0.0.1:{store.port}", SMALL_LAYOUT, credentials=credentials)
    try:
        assert not client.bulk  # nor does a TLS client ask for it
        fingerprint = fingerprint_for(SMALL_LAYOUT)
        blocks = make_blocks(SMALL_LAYOUT, 2)
        client.push_blocks(fingerprint, blocks)
        stream = client.pull_stream(fingerprint, hashes_of(blocks), bulk=True)  # asked anyway: streamed
        assert next(stream).WhichOneof("item") == "chunk"
        stream.cancel()
        assert [bytes(p) for _, p in client.pull_blocks(fingerprint, hashes_of(blocks)).blocks] == [p for _, p in blocks]
    finally:
        client.close()


def test_bulk_ticket_seconds_must_be_positive():
    with pytest.raises(InvalidArgument, match="bulk_ticket_seconds"):
        store_config("", SMALL_LAYOUT, bulk_ticket_seconds=0)


def test_a_cancelled_pull_ends_its_blocked_bulk_send_at_once(store_factory):
    store, client = bulk_store(store_factory, blocks=40)  # stream_idle_seconds stays 30 s
    blocks = make_blocks(BIG_LAYOUT, 32)
    client.push_blocks(FP, blocks)
    stream, offer = offer_of(client, hashes_of(blocks))
    with small_window_connection(offer.port) as connection:
        connection.sendall(offer.ticket)
        connection.recv(65536)  # the send started; then stop reading: it blocks on a full socket
        assert store.servicer.counters.snapshot()["pull_seconds"] == 0  # still in the handler
        assert store.pool.stats().pinned_blocks == 32
        stream.cancel()
        # the handler finished (it counts the pull on the way out) long before the 30 s send timeout
        assert wait_until(lambda: store.servicer.counters.snapshot()["pull_seconds"] > 0, timeout_s=5)
        assert store.pool.stats().pinned_blocks == 0
    assert store.servicer.bulk._connections == set()
