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
