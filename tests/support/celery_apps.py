"""Closing test Celery apps completely.

Why: `Celery.close()` leaves the rpc:// result consumer's connection open, and the
producer connections live in kombu's process-global pools (shared by every app with
the same broker URL), so they cannot be closed per app. Celery names an app's reply
queue after `id(app)`: once a closed app is garbage-collected, a later app can get
the same id, hence the same reply queue, while an idle pooled connection of the old
app still claims that queue in this process. Keeping closed apps referenced makes
their ids, and so their reply queues, unique for the whole test session.
"""

from __future__ import annotations

from celery import Celery

_KEPT: dict[int, Celery] = {}


def keep_alive(app: Celery) -> None:
    """Hold a reference to `app` for the rest of the session (see the module docstring)."""
    _KEPT.setdefault(id(app), app)


def close_app(app: Celery) -> None:
    """Stop the rpc:// result consumer, release its connection, then close the app."""
    backend = app._backend  # the backend already built, if any: do not build one now
    consumer = getattr(backend, "result_consumer", None) if backend is not None else None
    if consumer is not None:
        if getattr(consumer, "_consumer", None) is not None:
            consumer.stop()
        if getattr(consumer, "_connection", None) is not None:
            consumer._connection.release()
    app.close()
    keep_alive(app)
