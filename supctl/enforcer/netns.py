"""Open TCP connections and UDP sockets from inside a service instance's network namespace.

A socket belongs to the network namespace of the thread that *created* it; the
namespace of the thread that later calls ``connect()`` on it does not matter.
So the enforcer keeps one dedicated worker thread per named namespace: the
thread enters the namespace once, when it starts, and from then on only creates
sockets.  The connect itself runs on the event loop thread, which never changes
namespace.  Opening a connection costs one thread hop, never a ``setns()``.

Targets are always numeric addresses in the canonical form of
:mod:`supctl.protocol.targets` (the form the policies judged): no name is ever
resolved here, because a resolver would run in the enforcer's own namespace and
answer for the wrong network, and no IPv6 scope is taken, because it would pick
an interface of the site that no policy judged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import socket
import stat
from dataclasses import dataclass

from pyroute2 import netns as pr_netns

from supctl.bridge import arm_reset
from supctl.errors import StreamError
from supctl.protocol.frames import ErrorCode
from supctl.protocol.targets import canonical_address

__all__ = ["NETNS_DIR", "NamespaceSockets", "namespace_exists", "namespace_path"]

#: Where ``ip netns add`` bind-mounts named network namespaces.
NETNS_DIR = "/run/netns"

_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in {".", ".."}


def namespace_path(name: str) -> str:
    """The bind-mount file of the named namespace (no existence check)."""
    if not _valid_name(name):
        raise ValueError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a mounted namespace file, or None if there is none.

    A namespace file is a bind mount of an nsfs inode, so its device differs from
    the directory's.  A plain file left behind by a half-done ``ip netns del`` has
    the directory's device and is not a namespace.
    """
    try:
        st = os.stat(path)
        dir_st = os.stat(os.path.dirname(path))
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_dev == dir_st.st_dev:
        return None
    return st.st_dev, st.st_ino


def namespace_exists(name: str) -> bool:
    """True if ``name`` is a named network namespace (``ip netns list`` would show it)."""
    if not _valid_name(name):
        return False
    return _identity(namespace_path(name)) is not None


@dataclass(frozen=True, slots=True)
class _Target:
    family: socket.AddressFamily
    host: str  # canonical (supctl.protocol.targets)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def _parse_target(host: str, port: int) -> _Target:
    """The target in the one canonical form every check used (no second rule here).

    A scoped IPv6 address (``fe80::1%eth0``) is refused like everywhere else: the
    scope would let the caller pick the site's interface, which no policy judges.
    """
    try:
        canonical = canonical_address(host)
    except ValueError as exc:
        raise StreamError(f"target {host[:64]!r}: {exc}", code=ErrorCode.PROTOCOL) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise StreamError(f"target port {port!r} is out of range", code=ErrorCode.PROTOCOL)
    family = socket.AF_INET6 if ":" in canonical else socket.AF_INET
    return _Target(family, canonical, port)


def _new_socket(target: _Target, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """Create the non-blocking socket (TCP, or UDP), in the namespace of the calling thread."""
    sock = socket.socket(target.family, kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            arm_reset(sock)  # before connect: an enforcer that dies at any point resets the target
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Non-blocking connect of ``sock`` to a numeric ``address``.

    Not ``loop.sock_connect``: uvloop's resolves even a numeric address with
    getaddrinfo on its thread pool, a thread hop per connection.  Raises OSError.
    """
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not writable.done():
                writable.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class _Worker:
    """One thread living inside one named namespace for its whole life."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        # Written once by the worker thread in _enter(); read by it and, after a
        # completed future (which orders the accesses), by the event loop thread.
        self.identity: tuple[int, int] | None = None
        self.error: OSError | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=self._enter, thread_name_prefix=f"netns-{name}"
        )

    def _enter(self) -> None:
        # Never raise: a failing initializer breaks the pool and loses the reason.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = exc
            return
        try:
            st = os.fstat(fd)
            # flags=0: never create a namespace that is not there (the default is O_CREAT).
            pr_netns.setns(fd, flags=0)
        except OSError as exc:
            self.error = exc
        else:
            self.identity = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    def new_socket(self, target: _Target, kind: socket.SocketKind) -> socket.socket:
        if self.identity is None:
            raise self.error or OSError(errno.EINVAL, "namespace not entered")
        return _new_socket(target, kind)

    def shutdown(self, wait: bool) -> None:
        # Queued socket creations still run (they are quick): cancelling them
        # would surface as a bare CancelledError in connects nobody cancelled.
        self.executor.shutdown(wait=wait, cancel_futures=False)


def _close_result(future: concurrent.futures.Future[socket.socket]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class NamespaceSockets:
    """Connect TCP and UDP sockets from inside named network namespaces.

    Use from one event loop.  ``netns=None`` means the enforcer's own (host)
    network.  Call :meth:`close` when done; it stops the worker threads.
    """

    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}
        self._closed = False

    async def connect(self, netns: str | None, host: str, port: int, timeout: float) -> socket.socket:
        """Return a connected non-blocking TCP socket to ``host:port`` as seen from ``netns``.

        Raises :class:`StreamError` with an :class:`ErrorCode` and a one-line message.
        """
        if self._closed:
            raise StreamError("the enforcer is shutting down", code=ErrorCode.INTERNAL)
        target = _parse_target(host, port)
        where = f"network namespace {netns}" if netns is not None else "the host network"
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                sock = await self._socket(netns, target)
                await _connect(sock, (target.host, target.port))
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, StreamError):
                raise
            if isinstance(exc, TimeoutError):
                # Our deadline, or the kernel's own ETIMEDOUT after the SYN retries.
                raise StreamError(
                    f"connection to {target} in {where} timed out", code=ErrorCode.TIMEOUT
                ) from None
            if isinstance(exc, ConnectionRefusedError):
                raise StreamError(
                    f"connection refused by {target} in {where}", code=ErrorCode.REFUSED
                ) from None
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise StreamError(
                    f"cannot connect to {target} in {where}: {reason}", code=ErrorCode.UNREACHABLE
                ) from None
            raise
        return sock

    async def datagram(self, netns: str | None, host: str, port: int) -> socket.socket:
        """Return a non-blocking UDP socket in ``netns``, connected to ``host:port``.

        A UDP connect sends nothing: it fixes the peer (the kernel then drops datagrams
        from anyone else) and picks the route, so only an unroutable target fails here.
        Raises :class:`StreamError` like :meth:`connect`.
        """
        if self._closed:
            raise StreamError("the enforcer is shutting down", code=ErrorCode.INTERNAL)
        target = _parse_target(host, port)
        sock = await self._socket(netns, target, socket.SOCK_DGRAM)
        try:
            sock.connect((target.host, target.port))
        except OSError as exc:
            sock.close()
            where = f"network namespace {netns}" if netns is not None else "the host network"
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise StreamError(
                f"cannot reach {target} in {where}: {reason}", code=ErrorCode.UNREACHABLE
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _socket(
        self, netns: str | None, target: _Target, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        if netns is None:
            try:
                return _new_socket(target, kind)
            except OSError as exc:
                raise self._socket_error(None, target, exc) from None
        worker = self._worker(netns)
        future = worker.executor.submit(worker.new_socket, target, kind)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The worker may already be creating the socket: close it when it comes.
            future.add_done_callback(_close_result)
            raise
        except OSError as exc:
            if worker.identity is None:
                # The thread never got into the namespace; it is useless.
                self._drop(netns, worker)
                raise self._enter_error(netns, exc) from None
            raise self._socket_error(netns, target, exc) from None

    def _worker(self, name: str) -> _Worker:
        try:
            path = namespace_path(name)
        except ValueError:
            raise StreamError(f"invalid network namespace name {name!r}", code=ErrorCode.NOT_FOUND) from None
        identity = _identity(path)
        worker = self._workers.get(name)
        if identity is None:
            if worker is not None:
                self._drop(name, worker)
            raise StreamError(f"network namespace {name} does not exist", code=ErrorCode.NOT_FOUND)
        if worker is not None and worker.identity is not None and worker.identity != identity:
            # Deleted and re-created under the same name: the old thread holds the old one.
            self._drop(name, worker)
            worker = None
        if worker is None:
            worker = self._workers[name] = _Worker(name, path)
        return worker

    def _drop(self, name: str, worker: _Worker) -> None:
        if self._workers.get(name) is worker:
            del self._workers[name]
        worker.shutdown(wait=False)

    @staticmethod
    def _enter_error(name: str, exc: OSError) -> StreamError:
        if exc.errno in (errno.ENOENT, errno.EINVAL):
            # Gone between the check and the open, or a file that is not a namespace.
            return StreamError(f"network namespace {name} does not exist", code=ErrorCode.NOT_FOUND)
        reason = exc.strerror or str(exc)
        return StreamError(f"cannot enter network namespace {name}: {reason}", code=ErrorCode.INTERNAL)

    @staticmethod
    def _socket_error(name: str | None, target: _Target, exc: OSError) -> StreamError:
        where = f"network namespace {name}" if name is not None else "the host network"
        reason = exc.strerror or str(exc) or type(exc).__name__
        code = ErrorCode.UNREACHABLE if exc.errno in _UNREACHABLE_ERRNOS else ErrorCode.INTERNAL
        return StreamError(f"cannot create a socket for {target} in {where}: {reason}", code=code)

    def release(self, netns: str) -> None:
        """Stop the worker of one namespace (e.g. its service instance is gone).

        A worker thread keeps its namespace alive even after ``ip netns del``.
        """
        worker = self._workers.get(netns)
        if worker is not None:
            self._drop(netns, worker)

    def namespaces(self) -> list[str]:
        """Names of the namespaces that currently have a worker thread."""
        return sorted(self._workers)

    def close(self, wait: bool = True) -> None:
        """Stop every worker thread; later connects fail.  Idempotent."""
        self._closed = True
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.shutdown(wait=wait)
