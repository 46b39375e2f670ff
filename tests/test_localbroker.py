"""The private Mosquitto of the demo, `validate` and the tests: it restarts on its port, keeps
its log and persistence (also as root), and says why it could not start."""

from __future__ import annotations

import socket
import time

import pytest

from gateway.errors import BrokerError
from gateway.localbroker import LocalBroker, _ephemeral_range, free_port


def test_a_free_port_is_below_the_range_outgoing_connections_take_their_ports_from():
    # A port in that range can become an outgoing connection's source port while its broker is
    # stopped, and then keep the broker from starting again on it (CI failed so once).
    low, _ = _ephemeral_range()
    if low <= 11000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    ports = {free_port() for _ in range(20)}
    assert all(1024 < p < low for p in ports), ports
    assert len(ports) > 1  # not one fixed port


def test_the_broker_writes_its_log_and_persistence_where_it_was_told(tmp_path):
    # As root Mosquitto switches to the user `mosquitto`, which could not write the test's
    # private folder: the log and the persistence database were silently lost.
    broker = LocalBroker(workdir=tmp_path)
    broker.start()
    broker.stop()
    assert "New connection" in broker.log_path.read_text()  # the start-up probe's
    assert (tmp_path / "mosquitto.db").stat().st_size > 0
    broker.start()  # and it starts again on the same port
    assert broker.running
    broker.close()


def test_a_port_held_by_a_connection_is_said_at_once_with_mosquittos_reason(tmp_path):
    broker = LocalBroker(workdir=tmp_path)
    with socket.socket() as server, socket.socket() as client:
        # GIVEN the broker's port used as the source port of a connection (as a port from the
        # ephemeral range could be, while its broker is stopped)
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.bind(("127.0.0.1", broker.port))
        client.connect(server.getsockname())
        peer, _ = server.accept()
        with peer:
            client.shutdown(socket.SHUT_RDWR)
            # WHEN the broker starts THEN it fails at once, saying what Mosquitto said
            began = time.monotonic()
            with pytest.raises(BrokerError) as caught:
                broker.start(timeout=30)
    assert time.monotonic() - began < 10
    assert "Address already in use" in str(caught.value)
    assert f"port {broker.port}" in str(caught.value)
    assert not broker.running


def test_another_program_listening_on_the_port_is_not_taken_for_the_broker(tmp_path):
    # GIVEN a program that listens on the broker's port (a connection to it succeeds, as the
    # start-up probe's did, so that the broker was said to be running while Mosquitto, unable
    # to bind the port, had exited)
    broker = LocalBroker(workdir=tmp_path)
    try:
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", broker.port))
            other.listen(50)
            # WHEN the broker starts THEN it fails, saying why, and is not running
            with pytest.raises(BrokerError) as caught:
                broker.start(timeout=30)
            assert not broker.running
    finally:
        broker.close()  # (a broker taken as started binds the port once it is free)
    assert "Address already in use" in str(caught.value)


def test_the_probe_tells_the_brokers_own_listener_from_another_programs(tmp_path):
    from gateway.localbroker import _listens

    with LocalBroker(workdir=tmp_path) as broker:
        assert broker._proc is not None
        assert _listens(broker._proc.pid, broker.port) is not False
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            assert _listens(broker._proc.pid, other.getsockname()[1]) is False


def test_without_proc_the_listener_cannot_be_told_and_the_probe_alone_decides(monkeypatch):
    # (macOS has no /proc: every start would have waited its timeout and failed)
    import builtins

    from gateway.localbroker import _listens

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert _listens(1, 1883) is None
