"""The execution journal: SQLite, the source of truth, written before anything goes on chain.

Why SQLite in WAL with synchronous=FULL: a record the coordinator acked must survive a
power cut; the chain is only a public commitment to what the journal already holds.
Rows carry their anchoring state: `pending` until an anchored checkpoint covers them,
then `confirmed` (block); anchoring is per checkpoint, never per record.

Exactly-once: `task_id` is unique; appending a task_id that is already journaled is a
no-op returning False (first write wins), so a redelivered task is journaled once.

Transparency log (issue #12): every journaled record is also a leaf of an RFC 6962
Merkle tree (leaf = SHA-256(0x00 || canonical record JSON)); its position is the row's
`log_index`, and the tree's complete-subtree hashes live in `tlog_node`, written in
the SAME transaction as the row, so no crash can leave a journaled record outside the
log. Signed checkpoints of the tree (`tlog_checkpoint`) are what goes on chain; a row
is `confirmed` once an anchored checkpoint covers its log index.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ledger.record import RECORD_FIELDS, ExecutionRecord
from ledger.sqlite_files import enable_wal, read_only
from ledger.tlog.merkle import MerkleLog, SQLiteNodeStore

NODE_TABLE = "tlog_node"

PENDING, SENT, CONFIRMED = "pending", "sent", "confirmed"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    task_name TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    signer_fingerprint TEXT,
    args_digest TEXT,
    result_digest TEXT,
    status TEXT NOT NULL,
    received_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    envelope_digest TEXT,
    digest TEXT NOT NULL,
    envelope BLOB,
    appended_at REAL NOT NULL,
    anchor_state TEXT NOT NULL DEFAULT '{PENDING}',
    tx_hash TEXT,
    chain_id INTEGER,
    contract TEXT,
    block_number INTEGER,
    block_hash TEXT,
    anchored_at REAL
);
CREATE INDEX IF NOT EXISTS executions_anchor ON executions(anchor_state, id);
CREATE INDEX IF NOT EXISTS executions_agent ON executions(agent_id, received_at);
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_config (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS tlog_checkpoint (
    size INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    note TEXT NOT NULL,
    created_at REAL NOT NULL,
    anchor_state TEXT NOT NULL DEFAULT '{PENDING}',
    tx_hash TEXT,
    chain_id INTEGER,
    contract TEXT,
    block_number INTEGER,
    block_hash TEXT,
    anchored_at REAL
);
CREATE INDEX IF NOT EXISTS tlog_checkpoint_anchor ON tlog_checkpoint(anchor_state, size);
CREATE TABLE IF NOT EXISTS tlog_cosignature (
    size INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    vkey TEXT NOT NULL,
    line TEXT NOT NULL,
    task_id TEXT NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (size, agent_id)
);
CREATE INDEX IF NOT EXISTS tlog_cosignature_agent ON tlog_cosignature(agent_id, size);
CREATE TABLE IF NOT EXISTS record_salt (
    task_id TEXT PRIMARY KEY,
    salt BLOB NOT NULL
);
"""
# Columns added after the first release: (name, declaration). Old journals get them on open.
_LATE_COLUMNS = (("log_index", "INTEGER"), ("erased_at", "REAL"))

#: Columns of `Journal.audit_tuples`, in order: the record fields, then digest, log_index, erased_at, envelope.
AUDIT_COLUMNS = (*RECORD_FIELDS, "digest", "log_index", "erased_at", "envelope")

_INSERT = (
    f"INSERT OR IGNORE INTO executions ({', '.join(RECORD_FIELDS)}, digest, envelope, appended_at, log_index) "
    f"VALUES ({', '.join('?' * (len(RECORD_FIELDS) + 4))})"
)


class JournalError(RuntimeError):
    """The journal cannot be used as asked."""


@functools.lru_cache(maxsize=4096)
def certificate_fingerprint(certificate_pem: str) -> str:
    """SHA-256 hex of the certificate's DER encoding (as security.signing reports it).

    Memoised (a pure function of the PEM text): every reading of an agent carries the same
    certificate, and parsing it again was ~3% of the coordinator's CPU in a flood.
    """
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    return cert.fingerprint(hashes.SHA256()).hex()


class Journal:
    """Journal(path): one SQLite file; safe to share between threads (one connection each)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._checkpoint_hook: tuple[int, Callable[[int, bytes], str]] | None = None
        conn = self._conn()
        conn.executescript(SCHEMA)
        self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Add late columns; put rows journaled before the log existed into it, in id order."""
        with self.transaction():
            have = {r[1] for r in conn.execute("PRAGMA table_info(executions)")}
            for name, decl in _LATE_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE executions ADD COLUMN {name} {decl}")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS executions_log_index ON executions(log_index)")
            log = self._log(conn)
            missing = list(self.rows("log_index IS NULL"))
            if missing:
                start = log.size
                log.extend(ExecutionRecord.from_mapping(r).canonical_json() for r in missing)
                conn.executemany("UPDATE executions SET log_index = ? WHERE id = ?",
                                 [(start + i, r["id"]) for i, r in enumerate(missing)])

    def _log(self, conn: sqlite3.Connection) -> MerkleLog:
        """This thread's MerkleLog, reloaded when another connection appended meanwhile.

        Call inside a write transaction (the size check is then race-free).
        """
        log: MerkleLog | None = getattr(self._local, "log", None)
        if log is None or log.store.size() != log.size:
            log = MerkleLog(SQLiteNodeStore(conn, NODE_TABLE))
            self._local.log = log
        return log

    def sign_checkpoints_every(self, every: int, sign: Callable[[int, bytes], str]) -> None:
        """Have `append` store a checkpoint `sign(size, root)` whenever the tree size reaches a
        multiple of `every`, in the same transaction (ledger.checkpointer.Checkpointer.attach)."""
        self._checkpoint_hook = (max(1, int(every)), sign)

    def merkle(self) -> MerkleLog:
        """A MerkleLog over the committed tree, for roots and proofs (a fresh view each call)."""
        return MerkleLog(SQLiteNodeStore(self._conn(), NODE_TABLE))

    # -- connections and transactions -------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
            enable_wal(conn, self.path, 60)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            self._local.db = sqlite_utils.Database(conn)
            with self._lock:
                self._connections.append(conn)
        return conn

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's sqlite-utils Database (autocommit outside `transaction()`)."""
        self._conn()
        return self._local.db

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One SQLite transaction (BEGIN IMMEDIATE); nested calls become savepoints."""
        conn = self._conn()
        db = self._local.db
        if conn.in_transaction:
            with db.atomic():
                yield db
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            self._local.log = None  # its in-memory frontier may hold rolled-back leaves
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass  # closed from its own thread already
            self._connections.clear()
        self._local = threading.local()

    # -- appending ------------------------------------------------------------------
    def append(
        self,
        record: ExecutionRecord,
        db: sqlite_utils.Database | None = None,
        envelope: bytes | None = None,
        certificate_pem: str | None = None,
        salt: bytes | None = None,
    ) -> bool:
        """Journal `record` as pending. Returns False (and changes nothing) if its task_id exists.

        Pass the `db` from `transaction()` to commit it together with other writes; the
        signed envelope bytes and signer certificate are kept so audits can re-verify.
        The record becomes the next leaf of the log in the same transaction. `salt` is
        the per-record salt of its args digest (kept until the record is erased).
        """
        if certificate_pem is not None:
            fingerprint = certificate_fingerprint(certificate_pem)
            if record.signer_fingerprint and fingerprint != record.signer_fingerprint:
                raise JournalError(
                    f"certificate fingerprint {fingerprint[:16]}.. does not match the record's "
                    f"signer_fingerprint {record.signer_fingerprint[:16]}..: pass the signer's certificate"
                )
        with self.transaction() if db is None else _nullcontext(db) as tx:
            conn = tx.conn
            log = self._log(conn)
            values = [getattr(record, name) for name in RECORD_FIELDS]
            entry = record.canonical_json()
            digest = hashlib.sha256(entry).hexdigest()
            cur = conn.execute(_INSERT, [*values, digest, envelope, time.time(), log.size])
            inserted = cur.rowcount == 1
            if not inserted:
                return False
            try:
                log.append(entry)
            except BaseException:
                self._local.log = None
                raise
            hook = self._checkpoint_hook
            if hook is not None and log.size % hook[0] == 0:
                # every N records, signed inside the appending transaction: never starved by
                # a busy writer, and the checkpoint commits with the record that completes it
                size, root = log.size, log.root()
                conn.execute("INSERT INTO tlog_checkpoint (size, root, note, created_at) SELECT ?, ?, ?, ? "
                             "WHERE NOT EXISTS (SELECT 1 FROM tlog_checkpoint WHERE size >= ?)",
                             (size, root.hex(), hook[1](size, root), time.time(), size))
            if salt is not None:
                conn.execute("INSERT OR REPLACE INTO record_salt (task_id, salt) VALUES (?, ?)",
                             (record.task_id, bytes(salt)))
            if certificate_pem is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO certificates (fingerprint, pem, added_at) VALUES (?, ?, ?)",
                    (fingerprint, certificate_pem, time.time()),
                )
            return inserted

    # -- reading --------------------------------------------------------------------
    def get(self, task_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM executions WHERE task_id = ?", (task_id,))
        return _one(row)

    def certificate(self, fingerprint: str) -> str | None:
        cur = self._conn().execute("SELECT pem FROM certificates WHERE fingerprint = ?", (fingerprint,))
        found = cur.fetchone()
        return found[0] if found else None

    def rows(self, where: str = "1=1", params: Iterable[Any] = (), order: str = "id",
             limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts. `where` is an SQL fragment with ? placeholders (internal use)."""
        sql = f"SELECT * FROM executions WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cur = self._conn().execute(sql, list(params))
        names = [d[0] for d in cur.description]
        for values in cur:
            yield dict(zip(names, values, strict=False))

    def find(self, *, agent_id: str | None = None, task_name: str | None = None, status: str | None = None,
             anchor_state: str | None = None, since: float | None = None, until: float | None = None,
             limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows matching every given criterion, in journal order (edge-audit list/export/bundle).

        status matches case-insensitively (SUCCESS, success and Success name the same
        status); since/until bound received_at (until exclusive).
        """
        where: list[str] = ["1=1"]
        params: list[Any] = []
        for column, value in (("agent_id", agent_id), ("task_name", task_name), ("anchor_state", anchor_state)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if status is not None:
            where.append("UPPER(status) = UPPER(?)")
            params.append(status)
        if since is not None:
            where.append("received_at >= ?")
            params.append(since)
        if until is not None:
            where.append("received_at < ?")
            params.append(until)
        return self.rows(" AND ".join(where), params, limit=limit)

    def task_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` journaled task ids starting with `prefix`."""
        return [r["task_id"] for r in self.rows("substr(task_id, 1, ?) = ?", (len(prefix), prefix), limit=limit)]

    def audit_tuples(self) -> sqlite3.Cursor:
        """Every row as a tuple of AUDIT_COLUMNS, in id order: the audit's hot path (no dicts)."""
        return self._conn().execute(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM executions ORDER BY id")

    def counts(self) -> dict[str, int]:
        """Execution rows by anchoring state."""
        return self._state_counts("executions")

    # Rows and checkpoints carry the same anchoring columns: one query each for both tables.
    def _state_counts(self, table: str) -> dict[str, int]:
        out = {PENDING: 0, SENT: 0, CONFIRMED: 0}
        for state, n in self._conn().execute(f"SELECT anchor_state, COUNT(*) FROM {table} GROUP BY 1"):
            out[state] = n
        return out

    def _newest_confirmed_block(self, table: str) -> tuple[int, str] | None:
        cur = self._conn().execute(
            f"SELECT block_number, block_hash FROM {table} WHERE anchor_state = ? "
            "ORDER BY block_number DESC LIMIT 1", (CONFIRMED,))
        found = cur.fetchone()
        return (int(found[0]), found[1]) if found else None

    # -- the transparency log: tree size, checkpoints and their anchoring --------------------
    def tree_size(self) -> int:
        return SQLiteNodeStore(self._conn(), NODE_TABLE).size()

    def add_checkpoint(self, size: int, root: bytes, note: str) -> bool:
        """Store a signed checkpoint; False (nothing stored) unless it is larger than every stored one.

        Why refuse smaller ones: checkpoints are anchored in size order and the contract
        refuses a size below one already anchored; a checkpoint signed from an older
        view of the tree and stored late must not wedge the writer.
        """
        with self.transaction() as db:
            cur = db.conn.execute(
                "INSERT INTO tlog_checkpoint (size, root, note, created_at) SELECT ?, ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM tlog_checkpoint WHERE size >= ?)",
                (int(size), root.hex(), note, time.time(), int(size)))
            return cur.rowcount == 1

    def checkpoints(self, where: str = "1=1", params: Iterable[Any] = (), order: str = "size",
                    limit: int | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM tlog_checkpoint WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cur = self._conn().execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, values, strict=False)) for values in cur]

    def checkpoints_in_state(self, *states: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Checkpoints in any of `states`, smallest first."""
        return self.checkpoints(f"anchor_state IN ({','.join('?' * len(states))})", states, limit=limit)

    def checkpoints_of_sizes(self, sizes: Iterable[int]) -> list[dict[str, Any]]:
        wanted = [int(s) for s in sizes]
        return self.checkpoints(f"size IN ({','.join('?' * len(wanted))})", wanted)

    def checkpoints_up_to(self, size: int) -> list[dict[str, Any]]:
        """Checkpoints of at most `size` leaves, smallest first."""
        return self.checkpoints("size <= ?", (int(size),))

    def first_anchored_checkpoint_above(self, index: int) -> dict[str, Any] | None:
        """The smallest anchored checkpoint covering log index `index`, or None."""
        found = self.checkpoints("size > ? AND anchor_state = ?", (int(index), CONFIRMED), limit=1)
        return found[0] if found else None

    def tree_nodes(self) -> sqlite3.Cursor:
        """Every stored (level, idx, hash) of the log's tree, in order (copied to memory by bundles)."""
        return self._conn().execute(f"SELECT level, idx, hash FROM {NODE_TABLE} ORDER BY level, idx")

    def latest_checkpoint(self, anchored: bool = False) -> dict[str, Any] | None:
        where = "anchor_state = ?" if anchored else "1=1"
        found = self.checkpoints(where, (CONFIRMED,) if anchored else (), order="size DESC", limit=1)
        return found[0] if found else None

    def checkpoint_counts(self) -> dict[str, int]:
        """Checkpoints by anchoring state."""
        return self._state_counts("tlog_checkpoint")

    def max_confirmed_checkpoint_block(self) -> tuple[int, str] | None:
        return self._newest_confirmed_block("tlog_checkpoint")

    def checkpoints_sent(self, flights: list[tuple[list[int], str]], chain_id: int, contract: str) -> None:
        """(sizes, tx_hash) per transaction just broadcast, in one commit."""
        with self.transaction() as db:
            for sizes, tx_hash in flights:
                db.conn.executemany(
                    "UPDATE tlog_checkpoint SET anchor_state = ?, tx_hash = ?, chain_id = ?, contract = ? "
                    "WHERE size = ? AND anchor_state = ?", [(SENT, tx_hash, chain_id, contract, s, PENDING) for s in sizes])

    def checkpoints_confirmed(self, found: list[tuple[int, int, str, str]], chain_id: int, contract: str) -> None:
        """Checkpoints seen on chain as (size, block, block_hash, tx_hash); rows they cover become
        confirmed with the anchoring of the first checkpoint that covers them. One commit."""
        if not found:
            return
        now = time.time()
        with self.transaction() as db:
            conn = db.conn
            conn.executemany(
                "UPDATE tlog_checkpoint SET anchor_state = ?, block_number = ?, block_hash = ?, tx_hash = ?, "
                "chain_id = ?, contract = ?, anchored_at = COALESCE(anchored_at, ?) WHERE size = ?",
                [(CONFIRMED, b, h, t, chain_id, contract, now, size) for size, b, h, t in found])
            for size, b, h, t in sorted(found):
                # rows below the next smaller confirmed checkpoint are confirmed already: an index
                # range per checkpoint, not a scan of the whole journal
                lower = conn.execute("SELECT COALESCE(MAX(size), 0) FROM tlog_checkpoint WHERE anchor_state = ? "
                                     "AND size < ?", (CONFIRMED, size)).fetchone()[0]
                conn.execute(
                    "UPDATE executions SET anchor_state = ?, block_number = ?, block_hash = ?, tx_hash = ?, "
                    "chain_id = ?, contract = ?, anchored_at = COALESCE(anchored_at, ?) "
                    "WHERE log_index >= ? AND log_index < ? AND anchor_state != ?",
                    (CONFIRMED, b, h, t, chain_id, contract, now, lower, size, CONFIRMED))

    def checkpoints_reset(self, sizes: list[int], state: str = PENDING) -> None:
        """Checkpoints the chain lost (back to pending, re-sent as they are) or parked in `state`;
        rows above the largest checkpoint still confirmed go back to pending."""
        with self.transaction() as db:
            conn = db.conn
            conn.executemany(
                "UPDATE tlog_checkpoint SET anchor_state = ?, tx_hash = NULL, block_number = NULL, "
                "block_hash = NULL WHERE size = ?", [(state, s) for s in sizes])
            top = conn.execute("SELECT COALESCE(MAX(size), 0) FROM tlog_checkpoint WHERE anchor_state = ?",
                               (CONFIRMED,)).fetchone()[0]
            conn.execute(
                "UPDATE executions SET anchor_state = ?, tx_hash = NULL, block_number = NULL, block_hash = NULL "
                "WHERE log_index >= ? AND anchor_state != ?", (PENDING, top, PENDING))

    # -- witness cosignatures (agent/witness.py -> edge.witness.cosign) --------------------
    def add_cosignature(self, db: sqlite_utils.Database, size: int, agent_id: str, vkey: str, line: str,
                        task_id: str) -> bool:
        """Inside the caller's transaction: keep an agent's verified cosignature line of the
        checkpoint of `size` (first one per agent and size wins). The checkpoint note itself
        is never rewritten: `cosigned_note` adds the lines when it is read."""
        cur = db.conn.execute(
            "INSERT OR IGNORE INTO tlog_cosignature (size, agent_id, vkey, line, task_id, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?)", (int(size), agent_id, vkey, line, task_id, time.time()))
        return cur.rowcount == 1

    def cosignatures(self, size: int) -> list[dict[str, Any]]:
        """The cosignatures stored for the checkpoint of `size`, by agent id."""
        cur = self._conn().execute("SELECT agent_id, vkey, line, task_id FROM tlog_cosignature WHERE size = ? "
                                   "ORDER BY agent_id", (int(size),))
        return [{"agent_id": a, "vkey": v, "line": ln, "task_id": t} for a, v, ln, t in cur]

    def cosigned_note(self, size: int, note: str) -> str:
        """The checkpoint note of `size` with its stored cosignature lines appended."""
        return with_cosignatures(note, [c["line"] for c in self.cosignatures(size)])

    def all_cosignatures(self) -> list[dict[str, Any]]:
        cur = self._conn().execute("SELECT size, agent_id, line FROM tlog_cosignature ORDER BY size, agent_id")
        return [{"size": int(z), "agent_id": a, "line": ln} for z, a, ln in cur]

    def last_cosigned_size(self, agent_id: str) -> int | None:
        found = self._conn().execute("SELECT MAX(size) FROM tlog_cosignature WHERE agent_id = ?", (agent_id,)).fetchone()
        return int(found[0]) if found and found[0] is not None else None

    def witness_keys(self) -> list[dict[str, Any]]:
        """Every (agent, witness vkey) that cosigned, with the task id of one cosignature
        whose signed envelope ties the key to the agent's certificate."""
        cur = self._conn().execute("SELECT agent_id, vkey, MIN(task_id) FROM tlog_cosignature GROUP BY agent_id, vkey "
                                   "ORDER BY agent_id")
        return [{"agent_id": a, "vkey": v, "task_id": t} for a, v, t in cur]

    # -- right to erasure ------------------------------------------------------------
    def erase_records(self, db: sqlite_utils.Database, agent_id: str, before: float | None = None) -> list[str]:
        """Inside the caller's transaction: drop envelopes and salts of the agent's rows (received
        before `before`, if given), mark them erased. The record fields (digests only) stay: they
        are log leaves and must keep verifying."""
        conn = db.conn
        where, params = "agent_id = ?", list[Any]([agent_id])
        if before is not None:
            where += " AND received_at < ?"
            params.append(before)
        ids = [r[0] for r in conn.execute(f"SELECT task_id FROM executions WHERE {where}", params)]
        now = time.time()
        conn.executemany("UPDATE executions SET envelope = NULL, erased_at = COALESCE(erased_at, ?) WHERE task_id = ?",
                         [(now, t) for t in ids])
        conn.executemany("DELETE FROM record_salt WHERE task_id = ?", [(t,) for t in ids])
        return ids

    def commands_answered(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """For `edge.command_result` rows: the command each one answered, by result task id
        ({"command", "command_task_id", "command_args_digest"}).

        Why from the coordinator's `command_results` table and not the record: the leaf
        format (ledger.record) is fixed for every record already in the log; the ingest
        worker writes that row in the same transaction as the record (the command name
        and the digest of the args the coordinator sent, checked against what it sent).
        Absent when the result was erased or the journal has no command results yet."""
        ids = list(task_ids)
        out: dict[str, dict[str, Any]] = {}
        conn = self._conn()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            try:
                cur = conn.execute(
                    "SELECT task_id, command, command_task_id, args_digest FROM command_results "
                    f"WHERE task_id IN ({', '.join('?' * len(chunk))})", chunk)
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc) or "no such column" in str(exc):
                    return out  # a journal written before commands were recorded
                raise
            for task_id, command, command_task_id, args_digest in cur:
                out[task_id] = {"command": command, "command_task_id": command_task_id,
                                "command_args_digest": args_digest}
        return out

    @contextmanager
    def secure_delete(self) -> Iterator[None]:
        """Erased content is overwritten in the file (secure_delete) and, on leaving, flushed out
        of the WAL into the main file (wal_checkpoint TRUNCATE), so no old page keeps it."""
        conn = self._conn()
        conn.execute("PRAGMA secure_delete = ON")
        yield
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def salt(self, task_id: str) -> bytes | None:
        found = self._conn().execute("SELECT salt FROM record_salt WHERE task_id = ?", (task_id,)).fetchone()
        return bytes(found[0]) if found else None

    # -- ledger config (rpc url, contract address, chain id, recorder) ------------------
    def get_config(self) -> dict[str, str]:
        return {k: v for k, v in self._conn().execute("SELECT key, value FROM ledger_config")}

    def set_config(self, **values: Any) -> None:
        with self.transaction() as db:
            db.conn.executemany(
                "INSERT INTO ledger_config (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, None if v is None else str(v)) for k, v in values.items()])


# -- read-only views for other processes and threads (metrics scrapes, the demo) -------------
class JournalReader:
    """Named read-only queries on a journal another process writes (one short-lived
    read-only connection: an HTTP request, an audit step, a demo progress line).

    The coordinator keeps its own tables in the journal file (`readings`,
    coordinator/ingest.py; `agents`, coordinator/registry.py); the audit reads them here
    because ledger must not import the coordinator. Tables that do not exist yet read
    as empty where a method says so.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def merkle(self) -> MerkleLog:
        return MerkleLog(SQLiteNodeStore(self.conn, NODE_TABLE))

    def checkpoint_note(self, size: int | None = None) -> tuple[int, str] | None:
        """(size, signed note) of the checkpoint of `size` leaves (None: the newest), or None."""
        if size is None:
            row = self.conn.execute("SELECT size, note FROM tlog_checkpoint ORDER BY size DESC LIMIT 1").fetchone()
        else:
            row = self.conn.execute("SELECT size, note FROM tlog_checkpoint WHERE size = ?", (int(size),)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def log_index(self, task_id: str) -> int | None:
        """The log index of a journaled task id, or None."""
        row = self.conn.execute("SELECT log_index FROM executions WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def state_counts(self) -> dict[str, int]:
        """Execution rows by anchoring state (only states that occur)."""
        return {s: int(n) for s, n in self.conn.execute("SELECT anchor_state, COUNT(*) FROM executions GROUP BY 1")}

    def counts_by_agent_and_task(self) -> list[tuple[str, str, int, int]]:
        """(agent_id, task_name, rows, rows confirmed) in agent, task order."""
        return [(a, t, int(n), int(c or 0)) for a, t, n, c in self.conn.execute(
            "SELECT agent_id, task_name, COUNT(*), SUM(anchor_state = ?) FROM executions GROUP BY 1, 2 ORDER BY 1, 2",
            (CONFIRMED,))]

    def config_value(self, key: str) -> str | None:
        """A `ledger_config` value (for example the log's `log_vkey`), or None."""
        row = self.conn.execute("SELECT value FROM ledger_config WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def newest_checkpoint_size(self) -> int:
        """Leaves under the newest signed checkpoint (0 before the first)."""
        return int(self.conn.execute("SELECT COALESCE(MAX(size), 0) FROM tlog_checkpoint").fetchone()[0])

    def largest_cosigned_size(self, agent_id: str, upto: int) -> int | None:
        """The largest checkpoint size <= `upto` that `agent_id` cosigned as a witness, or None."""
        row = self.conn.execute("SELECT MAX(size) FROM tlog_cosignature WHERE agent_id = ? AND size <= ?",
                                (agent_id, int(upto))).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def reading_leaf_inputs(self, agent_id: str, seqs: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What an agent needs, besides its own copy of each reading, to rebuild that
        reading's leaf: the record fields only the coordinator knows and the per-record salt,
        keyed by seq. Seqs not journaled, without a log index yet or erased (no salt) are
        absent. One query per 500 seqs: a receipt asks for up to 64 at once."""
        out: dict[int, dict[str, Any]] = {}
        wanted = [int(s) for s in dict.fromkeys(seqs)]
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self.conn.execute(
                "SELECT r.seq, e.log_index, e.signer_fingerprint, e.result_digest, e.received_at, e.started_at, "
                "e.finished_at, e.envelope_digest, s.salt FROM readings r JOIN executions e ON e.task_id = r.task_id "
                "LEFT JOIN record_salt s ON s.task_id = e.task_id "
                f"WHERE r.agent_id = ? AND r.seq IN ({','.join('?' * len(chunk))})",
                (agent_id, *chunk))
            for row in rows:
                if row[1] is None or row[8] is None:
                    continue
                out[int(row[0])] = {"index": int(row[1]), "signer_fingerprint": row[2], "result_digest": row[3],
                                    "received_at": row[4], "started_at": row[5], "finished_at": row[6],
                                    "envelope_digest": row[7], "salt": bytes(row[8])}
        return out

    def readings_per_agent(self) -> dict[str, int]:
        """Readings stored per agent (the coordinator's `readings` table)."""
        return {a: int(n) for a, n in self.conn.execute("SELECT agent_id, COUNT(*) FROM readings GROUP BY 1")}

    def reading_seq_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Per agent, its stored reading seqs as consecutive (first, last) ranges in order
        ({} without a `readings` table)."""
        if "readings" not in self.tables():
            return {}
        rows = self.conn.execute(
            "SELECT agent_id, MIN(seq), MAX(seq) FROM (SELECT agent_id, seq, "
            "seq - ROW_NUMBER() OVER (PARTITION BY agent_id ORDER BY seq) AS island FROM readings) "
            "GROUP BY agent_id, island ORDER BY agent_id, 2"
        ).fetchall()
        out: dict[str, list[tuple[int, int]]] = {}
        for agent, lo, hi in rows:
            out.setdefault(agent, []).append((int(lo), int(hi)))
        return out

    def reading_task_ids(self, agent_id: str, lo: int, hi: int) -> dict[int, str] | None:
        """The task id stored under each of `agent_id`'s seqs `lo`..`hi` (None when the
        `readings` table keeps no task ids)."""
        if "readings" not in self.tables():
            return {}
        if "task_id" not in {r[1] for r in self.conn.execute("PRAGMA table_info(readings)")}:
            return None
        return {int(seq): str(task) for seq, task in self.conn.execute(
            "SELECT seq, task_id FROM readings WHERE agent_id = ? AND seq BETWEEN ? AND ?", (agent_id, int(lo), int(hi)))}

    def agent_reports(self) -> dict[str, tuple[int | None, int | None]]:
        """Per agent, (dropped, unconfirmed) from its last heartbeat (the coordinator's
        `agents` table; {} without it or from before those columns existed)."""
        if "agents" not in self.tables():
            return {}
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(agents)")}
        if not {"dropped", "unconfirmed"} <= columns:
            return {}
        return {a: (d, u) for a, d, u in self.conn.execute("SELECT agent_id, dropped, unconfirmed FROM agents")}


@contextmanager
def open_reader(path: Path | str, timeout: float = 5.0) -> Iterator[JournalReader]:
    """A JournalReader on a read-only connection (never creates or writes), closed after use."""
    with read_only(path, timeout=timeout) as conn:
        yield JournalReader(conn)


def anchor_backlog(path: Path) -> dict[str, int]:
    """Rows not yet confirmed on chain, by state, read without disturbing the writer."""
    with read_only(path, timeout=5) as conn:
        rows = dict(conn.execute(
            "SELECT anchor_state, COUNT(*) FROM executions WHERE anchor_state != ? GROUP BY 1", (CONFIRMED,)))
    return {state: int(rows.get(state, 0)) for state in (PENDING, SENT)}


def oldest_unanchored(path: Path) -> float | None:
    """appended_at of the oldest row still pending or sent (the anchoring lag), None when all are anchored."""
    with read_only(path, timeout=5) as conn:
        found = conn.execute(
            "SELECT MIN(appended_at) FROM executions WHERE anchor_state IN (?, ?)", (PENDING, SENT)).fetchone()
    return None if found is None or found[0] is None else float(found[0])


def anchored_since(path: Path, after: float, from_id: int = 0) -> tuple[list[float], float, int]:
    """Append-to-confirmation seconds of rows confirmed after `after` with id >= `from_id`.

    Returns (latencies, new `after`, new `from_id`) for the next call: rows below the
    lowest still-unanchored id were confirmed already, so a scrape reads only the tail
    through the (anchor_state, id) index instead of the whole journal.
    """
    with read_only(path, timeout=5) as conn:
        conn.execute("BEGIN")  # one snapshot for the rows and the next low-water mark
        rows = conn.execute(
            "SELECT anchored_at, anchored_at - appended_at FROM executions "
            "WHERE anchor_state = ? AND id >= ? AND anchored_at > ?", (CONFIRMED, int(from_id), float(after))).fetchall()
        low = conn.execute("SELECT MIN(id) FROM executions WHERE anchor_state IN (?, ?)", (PENDING, SENT)).fetchone()[0]
        if low is None:
            low = (conn.execute("SELECT MAX(id) FROM executions").fetchone()[0] or 0) + 1
        conn.execute("COMMIT")
    newest = max([float(a) for a, _ in rows], default=float(after))
    return [float(lat) for _, lat in rows], newest, int(low)


RATE_SCAN_ROWS = 200_000  # rate queries look at the newest rows only (ids are in append order)


def activity_since(path: Path, since: float) -> tuple[int, int]:
    """(rows journaled, rows anchored) since the unix time `since`: the ingestion and anchoring rates."""
    with read_only(path, timeout=5) as conn:
        top = conn.execute("SELECT MAX(id) FROM executions").fetchone()[0] or 0
        journaled, anchored = conn.execute(
            "SELECT COALESCE(SUM(appended_at >= ?), 0), COALESCE(SUM(anchored_at >= ?), 0) FROM executions WHERE id > ?",
            (since, since, top - RATE_SCAN_ROWS)).fetchone()
    return int(journaled), int(anchored)


def agent_activity(path: Path, agent_id: str, since: float, task_name: str) -> list[float]:
    """received_at of the agent's successfully journaled `task_name` rows since `since` (indexed by agent)."""
    with read_only(path, timeout=5) as conn:
        return [float(r[0]) for r in conn.execute(
            "SELECT received_at FROM executions WHERE agent_id = ? AND received_at >= ? AND task_name = ? "
            "AND status = 'SUCCESS' ORDER BY received_at", (agent_id, since, task_name))]


def with_cosignatures(note: str, lines: Iterable[str]) -> str:
    """A signed note plus cosignature lines (each one "— name base64\\n"), without duplicates."""
    out = note if note.endswith("\n") else note + "\n"
    for line in lines:
        line = line if line.endswith("\n") else line + "\n"
        if line not in out.split("\n\n")[-1]:
            out += line
    return out


@contextmanager
def _nullcontext(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    yield db


def _one(cur: sqlite3.Cursor) -> dict[str, Any] | None:
    values = cur.fetchone()
    if values is None:
        return None
    return dict(zip([d[0] for d in cur.description], values, strict=False))
