"""Where the server listens: a port checked before it is bound, and one error naming what to change.

A server that cannot listen must say so in one line: the address, why, and the
flag that moves it (``--port``, ``--metrics-port``, ``--host``). gRPC's own bind
failure is a C-level log line and a bare RuntimeError, so the gRPC port is
checked here first, bound and released as gRPC binds it (``SO_REUSEADDR``: a
port whose old connections linger in TIME_WAIT is free, a port something
listens on is not). The check and the bind are not atomic; a port taken in
between still fails the bind, and that failure is translated too.

Imports no torch: the supervisor of ``--workers`` uses it.
"""

from __future__ import annotations

import errno
import socket

from kernelgen_server.settings import flag

__all__ = ["ListenError", "check_free", "listen_error"]


class ListenError(OSError):
    """The server cannot listen where its settings say; the message names the address and the flag."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)  # one argument: str() is the message, without "[Errno N]"
        self.errno = code


def _address(host: str, port: int) -> str:
    name = host.strip("[]")
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def listen_error(error: OSError, host: str, port: int, *, setting: str, host_setting: str) -> ListenError:
    """``error`` (from binding ``host:port``) as a ``ListenError`` naming the flag of ``setting``.

    ``setting`` is the port's setting (``port``, ``metrics_port``), ``host_setting`` the address's.
    """
    port_flag, host_flag = flag(setting), flag(host_setting)
    what = "gRPC" if setting == "port" else "/metrics"
    where = f"cannot listen for {what} on {_address(host, port)}"
    if error.errno == errno.EADDRINUSE:
        other = "0 picks a free one" if setting == "port" else "0 turns /metrics off"
        message = f"{where}: the address is in use; set {port_flag} to another port ({other})"
    elif error.errno == errno.EACCES:
        message = f"{where}: permission denied (ports below 1024 need privileges); set {port_flag}"
    elif isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        reason = error.strerror or str(error)
        message = f"{where}: {reason}; set {host_flag} to an address of this host (0.0.0.0: all of them)"
    else:
        message = f"{where}: {error.strerror or error}; check {host_flag} and {port_flag}"
    return ListenError(error.errno, message)


def check_free(host: str, port: int, *, setting: str, host_setting: str) -> None:
    """Raise ``ListenError`` unless ``host:port`` can be bound now as a lone listener binds it.

    Port 0 (the system picks one) always can. ``setting`` and ``host_setting`` as in ``listen_error``.
    """
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise listen_error(exc, host, port, setting=setting, host_setting=host_setting) from None
