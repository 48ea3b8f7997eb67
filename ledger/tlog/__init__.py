"""Transparency-log primitives: RFC 6962 Merkle trees and C2SP notes, checkpoints,
cosignatures and proof bundles. Library only: no I/O besides an optional SQLite store.
See ledger/tlog/README.md for the spec sections and test vectors behind each module.
"""
