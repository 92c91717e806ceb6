"""sd_notify without libsystemd: READY/RELOADING/STOPPING/WATCHDOG datagrams to $NOTIFY_SOCKET.

A no-op when not started by systemd (``NOTIFY_SOCKET`` unset), so the daemon runs the same
under systemd, Docker or a shell.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True if a notify socket took it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:  # systemd gone or socket unreadable: keep running regardless
        log.debug("sd_notify(%s) failed: %s", state, exc)
        return False


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (systemd's advice), or None if no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.5)
    except ValueError:
        return None


def reloading() -> bool:
    # Type=notify-reload wants MONOTONIC_USEC with RELOADING=1.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
