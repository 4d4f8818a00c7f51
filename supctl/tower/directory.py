"""What the tower judges requests with, in memory: a snapshot of the store's credentials.

The store (:mod:`supctl.tower.database`) is the one source of truth; the
:class:`Directory` is a copy of its admin tokens, sites, users, login and API tokens
and the policy set in force, so that authorising a request stays a synchronous
dictionary lookup (the same methods the tower called on the JSON stores).

Freshness: every write to those tables bumps the store's generation counter in the
same transaction.  :meth:`Directory.fresh` reads it (one cheap SELECT, shared by every
request that arrives while it is pending) and loads everything again when it changed;
the tower awaits it before judging each request, and :meth:`Directory.poll_forever`
runs it every :data:`POLL_INTERVAL`, so the sweep sees a revocation or a site rotation
made by ``control-tower`` in another process.  The tower's own writes (login, logout,
renewal) go to the store first and then into the copy (read-your-writes), without a
reload when nobody else wrote meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import logging
from collections.abc import Callable, Sequence

from supctl.errors import UsageError

from .database import SQLStore, StoreUnavailable
from .database.engine import track
from .database.model import TOKEN_EXPIRED, TOKEN_REVOKED, USER_REMOVED, IssuedToken
from .database.snapshot import Snapshot, TokenRow, load
from .policy import ALLOW_ALL, ALLOW_EVERYTHING, Rule
from .policywatch import PolicyWatch, parse_policy_text
from .store import hash_token
from .users import (
    API_PREFIX,
    LOGIN_PREFIX,
    MAX_PASSWORD,
    Identity,
    TokenRefused,
    check_password,
    hash_password,
)

log = logging.getLogger("supctl.tower")

#: How often the tower polls the store's generation (the sweep re-checks every 0.5 s).
POLL_INTERVAL = 0.25
_NO_HASH = "0" * 64
# Spent on unknown users too, so timing does not tell which names exist.
_DUMMY_HASH = hash_password("not a password")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Directory:
    """The store's credentials and policies in memory; build it with :meth:`load`."""

    def __init__(
        self,
        store: SQLStore,
        snapshot: Snapshot,
        rules: dict[str, tuple[Rule, ...]],
        *,
        watch: PolicyWatch | None = None,
        clock: Callable[[], datetime.datetime] = utc_now,
    ) -> None:
        self.store = store
        self.clock = clock  # wall clock, aware: token expiry (fake in tests)
        self.watch = watch
        self.reloads = 0  # how many times everything was loaded again (tests, logs)
        self._install(snapshot, rules)
        self._waiting: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        # Set by a NOTIFY of a credential write (PostgreSQL, listen_forever): the poll runs now.
        self.wake = asyncio.Event()
        # Called after each reload: the tower sweeps at once, so a revocation ends sessions now.
        self.on_reload: Callable[[], None] = lambda: None

    @classmethod
    async def load(
        cls,
        store: SQLStore,
        *,
        watch: PolicyWatch | None = None,
        clock: Callable[[], datetime.datetime] = utc_now,
    ) -> Directory:
        snapshot = await load(store)
        directory = cls(store, snapshot, await _parsed(snapshot), watch=watch, clock=clock)
        if watch is not None:
            await directory.fresh()  # a policies.toml changed while the tower was down
        return directory

    def _install(self, snapshot: Snapshot, rules: dict[str, tuple[Rule, ...]]) -> None:
        self.generation = snapshot.generation
        self._admins = snapshot.admins
        self._admin_accessors = set(snapshot.admins.values())
        self._sites = snapshot.sites
        self._users = snapshot.users
        self._tokens = snapshot.tokens
        by_accessor: dict[str, list[str]] = {}
        for digest, row in snapshot.tokens.items():
            by_accessor.setdefault(row.accessor, []).append(digest)
        self._by_accessor = by_accessor
        self.policy = snapshot.policy
        self._rules = rules

    # -- freshness ---------------------------------------------------------

    async def fresh(self) -> None:
        """Bring the copy up to date with the store: every write committed before this
        call is seen when it returns.  Callers that arrive while a check is pending share
        it; those that arrive once it has started wait for the next one (it may have read
        the generation before their write).  StoreUnavailable if the store cannot be read."""
        if self._waiting is None and self._current():
            return  # nothing changed, seen without awaiting (SQLite): no task, no future
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_future()
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run(), name="directory-fresh")
        await asyncio.shield(self._waiting)

    def _current(self) -> bool:
        """Whether the copy is known to be current without awaiting: the policy file
        unchanged and the store's generation, read synchronously (SQLite), the copy's."""
        if self.watch is not None and not self.watch.unchanged():
            return False
        return self.store.peek_generation() == self.generation

    async def _run(self) -> None:
        while (waiting := self._waiting) is not None:
            self._waiting = None
            try:
                await self._refresh()
            except Exception as exc:
                waiting.set_exception(exc)
                waiting.exception()  # retrieved: a caller that went away must not warn
            else:
                waiting.set_result(None)

    async def _refresh(self) -> None:
        if self.watch is not None:
            await self.watch.check(self.store, self.policy)
        generation = self.store.peek_generation()  # SQLite: 5 us, on the loop
        if generation is None:
            generation = await self.store.generation()
        if generation == self.generation:
            return
        snapshot = await load(self.store)
        rules = self._rules if _same_policy(snapshot, self) else await _parsed(snapshot)
        self._install(snapshot, rules)
        self.reloads += 1
        self.on_reload()

    async def poll_forever(self, interval: float = POLL_INTERVAL) -> None:
        """:meth:`fresh` every ``interval`` seconds, for the sweep; a store that cannot be
        read is logged once until it can again (requests are refused meanwhile)."""
        down = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)
            self.wake.clear()
            try:
                await self.fresh()
            except StoreUnavailable as exc:
                if not down:
                    log.error("%s", exc)
                down = True
            except Exception:  # a bug here must not stop the polling for good
                log.exception("internal error reloading the store")
            else:
                if down:
                    log.warning("the store is available again")
                down = False

    async def listen_forever(self, retry: float = POLL_INTERVAL * 4) -> None:
        """PostgreSQL: wake :meth:`poll_forever` at every credential write of any process
        (LISTEN/NOTIFY), so that a revocation made anywhere is in force within milliseconds;
        the poll stays the fallback while the listening connection is down (then retried
        every ``retry`` s).  SQLite: nothing to listen to."""
        if self.store.backend != "postgresql":
            return
        while True:
            try:
                await self.store.listen(self.wake.set)
            except StoreUnavailable:
                pass  # the poll says so, once
            except Exception:  # a bug here must not stop the fallback
                log.exception("internal error listening to the store")
            self.wake.set()  # what was written while no one listened
            await asyncio.sleep(retry)

    def _own_write(self, seen: list[int]) -> bool:
        """Whether the write just made (generations ``seen``) was the only change since the
        copy was loaded: then the caller updates the copy and no reload is needed."""
        if seen and seen[-1] == self.generation + 1:
            self.generation = seen[-1]
            return True
        return False

    # -- admin and site tokens ---------------------------------------------

    def check_admin(self, token: str) -> str | None:
        """The accessor of admin token ``token``, or None.  A lookup by hash: the caller
        chooses the token, not its hash, so the lookup's timing tells them nothing."""
        return self._admins.get(hash_token(token))

    def admin_valid(self, accessor: str) -> bool:
        return accessor in self._admin_accessors

    def check_site(self, name: str, token: str) -> bool:
        expected = self._sites.get(name)
        return hmac.compare_digest(expected or _NO_HASH, hash_token(token)) and expected is not None

    def site_token_hash(self, name: str) -> str | None:
        return self._sites.get(name)

    def site_refusal(self, name: str, token_hash: str) -> str | None:
        """Why a link of site ``name`` that authenticated with ``token_hash`` may no longer
        serve it (removed, rotated), or None while that token is still the site's."""
        expected = self._sites.get(name)
        if expected is None:
            return "site removed"
        if not hmac.compare_digest(expected, token_hash):
            return "site token rotated"
        return None

    def site_exists(self, name: str) -> bool:
        return name in self._sites

    def sites(self) -> list[str]:
        return sorted(self._sites)

    # -- users and their tokens --------------------------------------------

    def _why(self, row: TokenRow) -> str | None:
        owner = self._users.get(row.user)
        if row.revoked is not None:
            return TOKEN_REVOKED if owner is not None else USER_REMOVED
        if row.expires <= self.clock():
            return TOKEN_EXPIRED
        return USER_REMOVED if owner is None else None

    def check_token(self, token: str) -> Identity | None:
        """The identity of a valid login or API token; None if it is none (or unknown);
        TokenRefused (``token expired``, ``token revoked`` ...) if it may not be used."""
        if not token.startswith((LOGIN_PREFIX, API_PREFIX)):
            return None
        digest = hash_token(token)
        row = self._tokens.get(digest)
        if row is None:
            return None
        if (why := self._why(row)) is not None:
            raise TokenRefused(why, row.user, row.accessor)
        return Identity(row.user, row.accessor, self._users[row.user][1], row.kind, digest)

    def expires(self, token_hash: str) -> datetime.datetime | None:
        """When the login or API token with this hash expires (None: unknown)."""
        row = self._tokens.get(token_hash)
        return row.expires if row is not None else None

    def refusal(self, accessor: str) -> str | None:
        """Why the token with this accessor may no longer be used, or None while it is
        valid.  Accessors are 32 bits and may collide: if any token with this accessor is
        refused, so is the session (fail closed); :meth:`refusal_by_hash` is exact."""
        digests = self._by_accessor.get(accessor)
        if not digests:
            return TOKEN_REVOKED
        for digest in digests:
            if (why := self._why(self._tokens[digest])) is not None:
                return why
        return None

    def refusal_by_hash(self, token_hash: str) -> str | None:
        """:meth:`refusal` for the token hashed ``token_hash`` (admin tokens too)."""
        if token_hash in self._admins:
            return None
        row = self._tokens.get(token_hash)
        return TOKEN_REVOKED if row is None else self._why(row)

    def policies(self, name: str) -> tuple[str, ...] | None:
        """The policies of user ``name`` now (None: no such user)."""
        user = self._users.get(name)
        return None if user is None else user[1]

    def has_user(self, name: str) -> bool:
        return name in self._users

    def password_hash(self, name: str, password: str) -> str | None:
        """The hash to check ``password`` against: a dummy one for an unknown user (the
        same work), None for a password too long to be worth hashing."""
        if len(password) > MAX_PASSWORD:
            return None
        user = self._users.get(name)
        return user[0] if user else _DUMMY_HASH

    def check_password(self, name: str, password: str) -> bool:
        stored = self.password_hash(name, password)
        return stored is not None and check_password(password, stored) and self.has_user(name)

    # -- policies ------------------------------------------------------------

    @property
    def policy_version(self) -> int | None:
        return None if self.policy is None else self.policy.version

    def rules(self, names: Sequence[str]) -> list[Rule]:
        """The rules of the named policies in the set in force; an unknown name gives
        nothing (default deny).  UsageError while the watched policies.toml is invalid."""
        if ALLOW_ALL in names:
            return [ALLOW_EVERYTHING]
        if self.watch is not None and self.watch.error is not None:
            raise UsageError(str(self.watch.error))
        return [rule for name in names for rule in self._rules.get(name, ())]

    # -- the tower's own writes ----------------------------------------------

    async def log_in(self, user: str, lifetime: datetime.timedelta, cap: int) -> IssuedToken:
        """A new login token of ``user`` (UsageError: no such user any more), revoking their
        oldest beyond ``cap``."""
        now = self.clock()
        with track() as seen:
            issued = await self.store.tokens.add(user, "login", lifetime, now=now, cap=cap)
        if self._own_write(seen):
            digest = hash_token(issued.token)
            gone = set(issued.revoked)
            for other in self._by_accessor_of(user, gone):
                self._set(other, revoked=now)
            for old in issued.forgotten:
                self._forget(old)
            self._tokens[digest] = TokenRow(user, issued.accessor, "login", issued.expires, None)
            self._by_accessor.setdefault(issued.accessor, []).append(digest)
        return issued

    async def log_out(self, token: str) -> None:
        now = self.clock()
        with track() as seen:
            await self.store.tokens.revoke_token(token, now=now)
        digest = hash_token(token)
        if self._own_write(seen) and digest in self._tokens and self._tokens[digest].revoked is None:
            self._set(digest, revoked=now)

    async def renew(self, token: str, lifetime: datetime.timedelta) -> datetime.datetime | None:
        """Push a live login token's expiry to now + ``lifetime``; None if it is no longer one."""
        now = self.clock()
        with track() as seen:
            expires = await self.store.tokens.renew(token, lifetime, now=now)
        digest = hash_token(token)
        if self._own_write(seen) and expires is not None and digest in self._tokens:
            self._set(digest, expires=expires)
        return expires

    def _forget(self, digest: str) -> None:
        row = self._tokens.pop(digest, None)
        if row is not None:
            same = self._by_accessor.get(row.accessor, [])
            if digest in same:
                same.remove(digest)
            if not same:
                self._by_accessor.pop(row.accessor, None)

    def _by_accessor_of(self, user: str, accessors: set[str]) -> list[str]:
        return [
            digest
            for accessor in accessors
            for digest in self._by_accessor.get(accessor, ())
            if self._tokens[digest].user == user and self._tokens[digest].kind == "login"
        ]

    def _set(
        self,
        digest: str,
        *,
        revoked: datetime.datetime | None = None,
        expires: datetime.datetime | None = None,
    ) -> None:
        row = self._tokens[digest]
        self._tokens[digest] = TokenRow(
            row.user,
            row.accessor,
            row.kind,
            expires if expires is not None else row.expires,
            revoked if revoked is not None else row.revoked,
        )


def _same_policy(snapshot: Snapshot, directory: Directory) -> bool:
    new, old = snapshot.policy, directory.policy
    return (new is None and old is None) or (
        new is not None and old is not None and new.version == old.version
    )


async def _parsed(snapshot: Snapshot) -> dict[str, tuple[Rule, ...]]:
    """The policy set in force, parsed (in a thread: up to 1 MiB of TOML).  It was
    validated when applied; if this code cannot parse it, nothing is allowed."""
    if snapshot.policy is None:
        return {}
    policy = snapshot.policy
    try:
        return await asyncio.to_thread(parse_policy_text, policy.text, f"policy set version {policy.version}")
    except UsageError as exc:
        log.error("%s: nothing is allowed by its policies", exc)
        return {}
