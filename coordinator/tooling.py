"""The Celery app module for operators: `celery -A coordinator.tooling inspect ping`.

Why a module of its own: Celery's tools (`inspect`, `status`, `events`, Flower) need an
app object to import, with the broker URL, the TLS client identity and the serializer
the coordinator's workers speak. This one is built from the coordinator's own
configuration (found like every `edge-coordinator` command finds it: the data dir from
$EDGE_COORDINATOR_DATA_DIR, the file from $EDGE_COORDINATOR_CONFIG) and carries the
coordinator's identity: its certificate opens the broker's pidbox and event topics
(agents' certificates do not, see security/README.md "Remote control"), and its key
signs the control messages, which the workers accept only signed.

Importing it registers the `mqtts://` transport (kombu_mqtt), so any process that
loads the app, Flower included, can reach the broker. It never consumes a queue: it
is a client of the fleet, not a worker (do not run `celery -A coordinator.tooling
worker`; the coordinator runs its own worker).
"""

from __future__ import annotations

from celery import Celery

import kombu_mqtt  # noqa: F401  (registers mqtt:// and mqtts:// in kombu's TRANSPORT_ALIASES for this process)

from .celery_app import make_app
from .config import load_config
from .errors import CoordinatorError


def build_app() -> Celery:
    """The operator app: coordinator config, coordinator identity, no consumer session."""
    try:
        cfg = load_config(require_file=True)
    except CoordinatorError as exc:
        raise CoordinatorError(
            f"{exc} (coordinator.tooling reads the coordinator's config: set EDGE_COORDINATOR_DATA_DIR "
            "to its data dir, the same one `edge-coordinator run --data-dir` uses)"
        ) from None
    if not cfg.cert_path.exists() or not cfg.key_path.exists():
        raise CoordinatorError(
            f"the coordinator identity {cfg.cert_path} / {cfg.key_path} is missing: Celery tooling runs with the "
            "coordinator's certificate; run it on the coordinator host with read access to its pki directory"
        )
    return make_app(cfg, consumer=False)


def _load() -> Celery:
    """build_app, or exit with its one-line error: `celery -A` would print a traceback."""
    try:
        return build_app()
    except CoordinatorError as exc:
        raise SystemExit(f"coordinator.tooling: {exc}") from None


app = _load()
