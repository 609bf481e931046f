"""The vhost-user hang-up watch (vhost/hangup.py) on real sockets: sockets added and removed while it runs,
a removed socket closed and its number reused without a false report."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pyvmm.vhost.hangup import HangupWatch


@pytest.fixture
def watch() -> Iterator[tuple[HangupWatch, list[str]]]:
    seen: list[str] = []
    w = HangupWatch(seen.append)
    w.start()
    yield w, seen
    w.close()


def wait_for(seen: list[str], count: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while len(seen) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_socket_added_while_running_is_reported_once_when_its_peer_goes(watch) -> None:
    w, seen = watch
    ours, peer = socket.socketpair()
    try:
        w.add(ours.fileno(), lambda: "disk A gone")
        time.sleep(0.1)
        assert seen == []
        peer.close()
        wait_for(seen, 1)
        time.sleep(0.1)  # and only once
        assert seen == ["disk A gone"]
        assert w.watched() == []
    finally:
        ours.close()


def test_a_hangup_before_the_socket_was_added_is_reported(watch) -> None:
    w, seen = watch
    ours, peer = socket.socketpair()
    peer.close()
    try:
        w.add(ours.fileno(), lambda: "gone before")
        wait_for(seen, 1)
        assert seen == ["gone before"]
    finally:
        ours.close()


def test_a_removed_socket_may_be_closed_and_its_number_reused(watch) -> None:
    """The removal is acknowledged before `remove` returns: closing the socket then is no hang-up (no
    POLLNVAL report), and a new file with the same number is not watched."""
    w, seen = watch
    kept, kept_peer = socket.socketpair()
    ours, peer = socket.socketpair()
    w.add(kept.fileno(), lambda: "kept")
    w.add(ours.fileno(), lambda: "removed")
    number = ours.fileno()
    w.remove(number)
    assert w.watched() == [kept.fileno()]
    ours.close()
    peer.close()
    reused_r, reused_w = os.pipe()
    try:
        if number in (reused_r, reused_w):  # the lowest free number: usually the socket's
            os.close(reused_w if number == reused_r else reused_r)
        time.sleep(0.2)
        assert seen == []
        kept_peer.close()  # the other socket is still watched
        wait_for(seen, 1)
        assert seen == ["kept"]
    finally:
        for fd in (reused_r, reused_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        kept.close()


def test_remove_of_an_unknown_socket_or_on_a_stopped_watch_returns_at_once() -> None:
    seen: list[str] = []
    w = HangupWatch(seen.append)
    ours, peer = socket.socketpair()
    try:
        w.add(ours.fileno(), lambda: "never started")
        w.remove(ours.fileno())  # not started: nothing to wait for
        w.remove(12345)
        w.start()
        w.add(ours.fileno(), lambda: "x")
        w.close()
        done = threading.Event()
        threading.Thread(target=lambda: (w.remove(ours.fileno()), done.set()), daemon=True).start()
        assert done.wait(2)
        assert seen == []
    finally:
        ours.close()
        peer.close()


def test_many_sockets_come_and_go_while_others_hang_up(watch) -> None:
    """Adds and removes from another thread interleaved with hang-ups: every hang-up of a socket still
    watched is reported, none of a removed one."""
    w, seen = watch
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        for n, (ours, _peer) in enumerate(pairs):
            w.add(ours.fileno(), lambda n=n: f"s{n}")
        for n, (ours, peer) in enumerate(pairs):
            if n % 2:
                w.remove(ours.fileno())
            peer.close()
        wait_for(seen, 20)
        time.sleep(0.1)
        assert sorted(seen, key=lambda s: int(s[1:])) == [f"s{n}" for n in range(0, 40, 2)]
    finally:
        for ours, _peer in pairs:
            ours.close()
