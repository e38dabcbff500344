"""Django's database sessions, minus the second write of a session created during a request.

An anonymous visitor's first request creates its session at once (`identity.owner_for`
needs the key to own the conversation): an INSERT. `create()` also marks the session
modified, so that `SessionMiddleware` sends the cookie, and the middleware then saves it
again: an UPDATE of exactly what was just inserted, a second transaction on the request's
critical path. This store skips a save whose data is byte-for-byte what its own INSERT
wrote; any change (a login, a value set later in the request) is saved as usual.
"""

from __future__ import annotations

from django.contrib.sessions.backends import db


class SessionStore(db.SessionStore):
    _inserted: str | None = None

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
