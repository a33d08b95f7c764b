"""A minimal Django project for workerpool's tests.

TESTPROJECT_DB: the SQLite file (tests use tmp_path). TESTPROJECT_REDIS_URL: the private test
Redis. TESTPROJECT_WORKERPOOL: JSON merged into WORKERPOOL (tests change settings with it).
"""

import json
import os

SECRET_KEY = "workerpool-tests-only"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "workerpool.contrib.django",
    "app",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("TESTPROJECT_DB", "testproject.sqlite3"),
        # Two workers write at once: wait for the lock rather than fail.
        "OPTIONS": {"timeout": 30},
    }
}

WORKERPOOL = {
    "redis_url": os.environ.get("TESTPROJECT_REDIS_URL", "redis://127.0.0.1:1/0"),
    "handler": "app.tasks:handle",
    "workers": 2,
    "concurrency": 4,
    "interval": 0.2,
    "drain_timeout": 10,
}
WORKERPOOL.update(json.loads(os.environ.get("TESTPROJECT_WORKERPOOL", "{}")))

# dictConfig's default, spelled out: the workers' django.setup() must not silence workerpool.
LOGGING = {"version": 1, "disable_existing_loggers": True}
