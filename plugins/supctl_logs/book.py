"""The site's memory of containers' output (sans-I/O): one bounded ring per container.

A :class:`Book` holds the most recent lines of one container, oldest first, each with
a sequence number, the wall-clock time it was read and its fd (1 stdout, 2 stderr; 0
for a *mark*, a note of the site such as a restart).  It is bounded in bytes: each
entry costs its payload plus :data:`OVERHEAD`, what Python spends on an entry beyond
the payload (measured: about 130 bytes for the tuple, its float and the bytes object's
header, and the deque's slot), so ``buffer-bytes`` bounds the memory, not only the
text, and a flood of empty lines is bounded like any other.  Adding past the bound
forgets the oldest entries.

Readers never get a queue of their own: a reader (a ``logs -f`` stream) holds a
sequence number, a *cursor*, and reads from it (:meth:`Book.read`).  One that fell
behind the ring learns how many entries it missed and goes on from the oldest one
held, so a slow client costs the site nothing but its cursor.

A :class:`Shelf` holds the books of a site, keyed by (application, service instance,
container), at most :data:`MAX_BOOKS` of them; the enforcer only reports the
containers of its inventory, so in practice it holds one per supervised container.
A container stopped by the enforcer (removed or changed at a reload, or shutdown)
keeps its book for :data:`FORGET_AFTER` seconds, so its last words can still be
read; the next reload after that forgets it.
"""

from __future__ import annotations

import itertools
import signal
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .wire import MAX_PAYLOAD

#: Bytes charged per entry beyond its payload: an upper bound of what Python spends on it.
OVERHEAD = 144
MIN_CAPACITY = 4 * 1024
MAX_CAPACITY = 64 * 1024 * 1024
DEFAULT_CAPACITY = 1024 * 1024
#: Most books a shelf holds; past it the one stopped longest ago (or, if none is
#: stopped, the one silent longest) is forgotten.  A backstop: the inventory bounds it first.
MAX_BOOKS = 4096
#: Seconds a stopped container's book is kept before a reload may forget it.
FORGET_AFTER = 60.0
#: fd of a mark.
MARK_FD = 0

Key = tuple[str, str, str]  # application, service instance, container


class Entry(NamedTuple):
    seq: int
    time: float
    fd: int  # 1 stdout, 2 stderr, 0 a mark
    data: bytes


def ended(event: str, exit_code: int | None) -> str:
    """How a run ended, in words: ``exit status 1``, ``killed by SIGKILL``."""
    if event == "failed":
        return "its start failed"
    if event == "stopped":
        return "stopped by the enforcer"
    if exit_code is None:
        return event
    if exit_code >= 0:
        return f"exit status {exit_code}"
    try:
        return f"killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"killed by signal {-exit_code}"


class Book:
    """The ring of one container; see the module's docstring."""

    def __init__(self, name: str, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < MIN_CAPACITY:
            raise ValueError(f"a book holds at least {MIN_CAPACITY} bytes")
        self.name = name
        self.capacity = capacity
        #: Bytes charged for the entries held (payloads + OVERHEAD each): <= capacity.
        self.used = 0
        #: Sequence number of the oldest entry held (of the next one when empty).
        self.first = 0
        self.last_time = 0.0  # of the newest entry or event: the shelf's eviction order
        #: When the enforcer stopped the container (None: running, restarting, or never seen stopped).
        self.stopped_at: float | None = None
        #: True once the shelf dropped it: readers still holding it stop.
        self.forgotten = False
        self._entries: deque[tuple[float, int, bytes]] = deque()
        self._last_end: str | None = None  # how the previous run ended, for the restart mark

    @property
    def end(self) -> int:
        """The sequence number the next entry gets."""
        return self.first + len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, fd: int, data: bytes, time: float) -> None:
        """A line of stdout (1) or stderr (2), or a mark (0); cut into pieces of at most
        :data:`~supctl_logs.wire.MAX_PAYLOAD` bytes that each fit the book."""
        piece = min(MAX_PAYLOAD, self.capacity - OVERHEAD)
        self.last_time = time
        for start in range(0, max(len(data), 1), piece):
            chunk = data[start : start + piece]
            self._entries.append((time, fd, chunk))
            self.used += OVERHEAD + len(chunk)
        self._trim()

    def event(self, event: str, time: float, exit_code: int | None = None) -> None:
        """A life event of the container: a start after an end leaves one restart mark."""
        self.last_time = time
        if event == "started":
            self.stopped_at = None
            if self._last_end is not None:
                self.add(MARK_FD, f"container {self.name} restarted ({self._last_end})".encode(), time)
            self._last_end = None
        elif event in ("exited", "failed", "stopped"):
            self._last_end = ended(event, exit_code)
            if event == "stopped":
                self.stopped_at = time

    def resize(self, capacity: int) -> None:
        if capacity < MIN_CAPACITY:
            raise ValueError(f"a book holds at least {MIN_CAPACITY} bytes")
        self.capacity = capacity
        self._trim()

    def _trim(self) -> None:
        while self.used > self.capacity:
            _, _, data = self._entries.popleft()
            self.used -= OVERHEAD + len(data)
            self.first += 1

    def start(self, tail: int | None, cutoff: float | None) -> int:
        """The cursor of a reader that wants the last ``tail`` lines (None: all held;
        marks among them come along) that are no older than ``cutoff`` (None: any age).

        Both select a suffix: from the ``tail``-th last line of output, and the longest
        suffix whose every entry has a time >= ``cutoff`` (a wall clock stepped back
        cannot make an old line look new in the middle); the shorter suffix wins."""
        entries = self._entries
        begin = 0
        if tail is not None:
            begin = len(entries)
            seen = 0
            while seen < tail and begin > 0:
                begin -= 1
                if entries[begin][1] != MARK_FD:
                    seen += 1
        if cutoff is not None:
            newest = len(entries)
            while newest > begin and entries[newest - 1][0] >= cutoff:
                newest -= 1
            begin = newest
        return self.first + begin

    def read(self, cursor: int, budget: int) -> tuple[int, list[Entry], int]:
        """(entries dropped since ``cursor``, entries from there on of about ``budget``
        payload bytes (at least one if any), the next cursor)."""
        dropped = max(0, self.first - cursor)
        index = max(cursor, self.first) - self.first
        out: list[Entry] = []
        size = 0
        # One walk from the cursor (islice skips in C): indexing a deque entry by entry
        # walks its blocks again for each one.
        for time, fd, data in itertools.islice(self._entries, index, None):
            if out and size >= budget:
                break
            out.append(Entry(self.first + index, time, fd, data))
            size += len(data)
            index += 1
        return dropped, out, self.first + index


class Shelf:
    """The books of one site, by container."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        max_books: int = MAX_BOOKS,
        on_forget: Callable[[Key], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.max_books = max_books
        #: Called with the key of each book forgotten (its readers must stop waiting).
        self.on_forget = on_forget
        self.books: dict[Key, Book] = {}

    def get(self, key: Key) -> Book | None:
        return self.books.get(key)

    def output(self, key: Key, fd: int, data: bytes, time: float) -> None:
        self._book(key).add(fd, data, time)

    def event(self, key: Key, event: str, time: float, exit_code: int | None = None) -> None:
        self._book(key).event(event, time, exit_code)

    def configure(self, capacity: int, now: float) -> None:
        """A new ``buffer-bytes`` (at start and each reload); books of containers stopped
        more than :data:`FORGET_AFTER` seconds ago are forgotten."""
        self.capacity = capacity
        for key, book in list(self.books.items()):
            if book.stopped_at is not None and now - book.stopped_at > FORGET_AFTER:
                self._forget(key)
            else:
                book.resize(capacity)

    def used(self) -> int:
        return sum(book.used for book in self.books.values())

    def _book(self, key: Key) -> Book:
        book = self.books.get(key)
        if book is None:
            while len(self.books) >= self.max_books:
                self._forget(min(self.books, key=self._eviction_order))
            book = self.books[key] = Book(key[2], self.capacity)
        return book

    def _eviction_order(self, key: Key) -> tuple[bool, float]:
        book = self.books[key]
        if book.stopped_at is not None:
            return False, book.stopped_at
        return True, book.last_time

    def _forget(self, key: Key) -> None:
        book = self.books.pop(key)
        book.forgotten = True
        if self.on_forget is not None:
            self.on_forget(key)
