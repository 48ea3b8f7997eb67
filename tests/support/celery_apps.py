"""Closing test Celery apps completely.

Why: `Celery.close()` leaves the rpc:// result consumer's connection open. In a long
test session such a connection idles until the broker times it out, and a later app
that happens to get the same reply-queue name (Celery derives it from `id(app)`)
would find it.
"""

from __future__ import annotations

from celery import Celery


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
