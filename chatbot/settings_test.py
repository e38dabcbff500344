"""Settings for the test suite: the project's settings with development defaults and fast hashing."""

import os

os.environ.setdefault("CHATBOT_DEV_DEFAULTS", "1")
# Tests choose their provider per test; the embedded default is the local model.
os.environ.pop("OPENAI_API_KEY", None)

from chatbot.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# No collectstatic in tests: serve the apps' static folders as they are.
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
SERVESTATIC_USE_FINDERS = True
SERVESTATIC_AUTOREFRESH = True

if DATABASES["default"]["ENGINE"] == "chatbot_api.sqlite3":  # noqa: F405
    # A file, not Django's shared in-memory database: in-memory SQLite locks whole tables
    # and fails at once when the generations' DB thread and a request write together,
    # where a file in WAL mode waits its turn like in production.
    import tempfile

    DATABASES["default"]["TEST"] = {  # noqa: F405
        "NAME": os.path.join(tempfile.gettempdir(), f"chatbot-test-{os.getpid()}.sqlite3")
    }
