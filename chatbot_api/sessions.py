"""Django's database sessions, minus the second write of a session created during a request.

An anonymous visitor's first request creates its session at once (`identity.owner_for`
needs the key to own the conversation): an INSERT. `create()` also marks the session
modified, so that `SessionMiddleware` sends the cookie, and the middleware then saves it
again: an UPDATE of exactly what was just inserted, a second transaction on the request's
critical path. This store skips a save whose data is byte-for-byte what its own INSERT
wrote; any change (a login, a value set later in the request) is saved as usual.

Nor does it look a new key up before inserting it: `create()` inserts with
`must_create` and draws another key if that one is taken, so Django's `exists()`
query before it (and, from async code, its thread hop) only repeated that check.
"""

from __future__ import annotations

from django.contrib.sessions.backends import db
from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.utils.crypto import get_random_string


class SessionStore(db.SessionStore):
    _inserted: str | None = None

    def _get_new_session_key(self) -> str:
        return get_random_string(32, VALID_KEY_CHARS)  # unique: create()'s INSERT checks it

    async def _aget_new_session_key(self) -> str:
        return self._get_new_session_key()

    def save(self, must_create=False):
        if not must_create and self._unchanged_since_insert():
            return
        super().save(must_create)
        if must_create:
            self._inserted = self._encoded()

    async def asave(self, must_create=False):
        if not must_create and self._unchanged_since_insert():
            return
        await super().asave(must_create)
        if must_create:
            self._inserted = self._encoded()

    def _encoded(self) -> str:
        # Compared before signing: `encode()` signs with a timestamp, so it differs every second.
        return self.serializer().dumps(self._session_cache).decode("latin-1")

    def _unchanged_since_insert(self) -> bool:
        return (
            self._inserted is not None
            and self.session_key is not None
            and hasattr(self, "_session_cache")
            and self._encoded() == self._inserted
        )
