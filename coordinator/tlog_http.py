"""Transparency-log routes of the coordinator's HTTP server: checkpoint, proofs, log key.

Why served at all: auditors and (later) agent witnesses fetch what they verify from the
coordinator, but verify it themselves: everything served here is either signed by the
log key (checkpoints) or checkable against a signed checkpoint (proofs), so serving it
needs no trust. Reads use short-lived read-only SQLite connections (each request runs
in its own thread), never the writer's.

    GET /tlog/checkpoint                   newest signed checkpoint (signed note text)
    GET /tlog/log.pub                      the log's verifier key (vkey line)
    GET /tlog/proof?index=N[&size=S]       c2sp.org/tlog-proof for log index N
    GET /tlog/proof?task_id=ID[&size=S]    the same for a journaled task id
    GET /tlog/consistency?from=A&to=B      consistency proof between two checkpoint sizes:
                                           one base64 hash per line (RFC 9162 PROOF order)
`size` must be the size of a stored checkpoint (default: the newest one).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ledger.journal import JournalReader, open_reader
from ledger.tlog.errors import TlogError
from ledger.tlog.note import b64encode
from ledger.tlog.proof import ProofBundle

from .http import Request
from .http import Response as HttpResponse

Response = tuple[int, bytes, str]
TEXT = "text/plain; charset=utf-8"


class TlogRoutes:
    """The StatusServer handler of everything under `/tlog/`."""

    def __init__(self, journal_path: Path, log_pub: Path | None = None) -> None:
        self.journal_path = Path(journal_path)
        self.log_pub = log_pub

    def __call__(self, request: Request) -> HttpResponse:
        status, body, content_type = self._answer(request.path, {k: v[-1] for k, v in request.query.items()})
        return HttpResponse(status, body, content_type)

    def _answer(self, path: str, query: dict[str, str]) -> Response:
        try:
            if path == "/tlog/log.pub" and self.log_pub is not None and self.log_pub.exists():
                return 200, self.log_pub.read_bytes(), TEXT
            with open_reader(self.journal_path, timeout=5) as reader:
                if path == "/tlog/checkpoint":
                    return self._checkpoint(reader)
                if path == "/tlog/proof":
                    return self._proof(reader, query)
                if path == "/tlog/consistency":
                    return self._consistency(reader, query)
        except (TlogError, ValueError) as exc:
            return 400, f"{exc}\n".encode(), TEXT
        except sqlite3.Error as exc:
            return 503, f"journal unavailable: {exc}\n".encode(), TEXT
        return 404, b"not found: try /tlog/checkpoint, /tlog/proof?index=N, /tlog/consistency?from=A&to=B\n", TEXT

    @staticmethod
    def _checkpoint(reader: JournalReader) -> Response:
        found = reader.checkpoint_note()
        if found is None:
            return 404, b"no checkpoint signed yet\n", TEXT
        return 200, found[1].encode(), TEXT

    @staticmethod
    def _proof(reader: JournalReader, query: dict[str, str]) -> Response:
        if "task_id" in query:
            found_index = reader.log_index(query["task_id"])
            if found_index is None:
                return 404, f"no journaled task {query['task_id']}\n".encode(), TEXT
            index = found_index
        elif "index" in query:
            index = int(query["index"])
        else:
            return 400, b"give index=N or task_id=ID\n", TEXT
        size_arg = query.get("size")
        found = reader.checkpoint_note(int(size_arg) if size_arg is not None else None)
        if found is None:
            return 404, b"no such checkpoint\n", TEXT
        size, note = found
        if not 0 <= index < size:
            return 404, f"log index {index} is not covered by the checkpoint of size {size} (yet)\n".encode(), TEXT
        proof = reader.merkle().inclusion_proof(index, size)
        return 200, ProofBundle(index, tuple(proof), note).format().encode(), TEXT

    @staticmethod
    def _consistency(reader: JournalReader, query: dict[str, str]) -> Response:
        try:
            first, second = int(query["from"]), int(query["to"])
        except KeyError:
            return 400, b"give from=A&to=B (checkpoint sizes)\n", TEXT
        for size in (first, second):
            if reader.checkpoint_note(size) is None:
                return 404, f"no checkpoint of size {size}\n".encode(), TEXT
        proof = reader.merkle().consistency_proof(first, second)
        return 200, "".join(b64encode(h) + "\n" for h in proof).encode(), TEXT
