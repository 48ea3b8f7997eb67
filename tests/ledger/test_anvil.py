"""ManagedAnvil: real anvil child, crash-safe snapshots, fallback, clear errors."""

import os
import signal

import pytest

from ledger.anvil import PREVIOUS_STATE_FILE, STATE_FILE, AnvilError, ManagedAnvil, find_anvil, rpc_call


def _block(chain):
    return int(rpc_call(chain.rpc_url, "eth_blockNumber"), 16)


def test_fixture_chain_is_usable(anvil):
    assert anvil.rpc_url.startswith("http://127.0.0.1:")
    assert len(anvil.private_keys) == 10 and anvil.dev_key == anvil.private_keys[0]
    assert int(rpc_call(anvil.rpc_url, "eth_chainId"), 16) == 31337


def test_snapshot_restart_and_fallback_to_previous(tmp_path):
    chain = ManagedAnvil(tmp_path / "state").start()
    try:
        rpc_call(chain.rpc_url, "anvil_mine", ["0x3"])
        chain.snapshot()
        rpc_call(chain.rpc_url, "anvil_mine", ["0x2"])
        latest = chain.snapshot()
        assert (tmp_path / "state" / PREVIOUS_STATE_FILE).exists()
        genesis = rpc_call(chain.rpc_url, "eth_getBlockByNumber", ["0x0", False])["hash"]
        port = chain.port
        chain.kill()
        chain.start()
        assert chain.port == port and chain.loaded_from == latest
        assert _block(chain) == 5
        assert rpc_call(chain.rpc_url, "eth_getBlockByNumber", ["0x0", False])["hash"] == genesis
        chain.kill()
        latest.write_bytes(latest.read_bytes()[:100])  # a torn write
        chain.start()
        assert chain.loaded_from.name == PREVIOUS_STATE_FILE
        assert _block(chain) == 3
    finally:
        chain.stop(snapshot=False)
    assert not chain.running


def test_periodic_snapshots_and_stop_snapshot(tmp_path):
    chain = ManagedAnvil(tmp_path / "s", snapshot_interval=0.2).start()
    try:
        rpc_call(chain.rpc_url, "anvil_mine", ["0x1"])
        import time

        deadline = time.monotonic() + 30
        while not (tmp_path / "s" / STATE_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "s" / STATE_FILE).exists()
    finally:
        chain.stop()
    chain.start()
    try:
        assert _block(chain) == 1
    finally:
        chain.stop(snapshot=False)


def test_child_dies_with_parent(tmp_path):
    """The anvil child of a killed Python process does not linger (PDEATHSIG)."""
    import subprocess
    import sys
    import time

    script = (
        "from ledger.anvil import ManagedAnvil; import sys, time; "
        f"a = ManagedAnvil(r'{tmp_path}').start(); print(a.process.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(child):
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("anvil survived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid):
    """True unless the process is gone or a zombie (an orphan's zombie waits for init)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_missing_binary_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_ANVIL_BIN", str(tmp_path / "nope"))
    with pytest.raises(AnvilError, match="EDGE_ANVIL_BIN"):
        find_anvil()
    monkeypatch.delenv("EDGE_ANVIL_BIN")
    monkeypatch.setattr("ledger.anvil.Path.exists", lambda self: False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AnvilError, match="npm ci"):
        find_anvil()


def test_dump_consistency_check():
    from ledger.anvil import dump_is_consistent

    eoa, contract_addr = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266", "0x5fbdb2315678afecb367f032d93f642f64180aa3"
    txs = [{"info": {"from": eoa}}, {"info": {"from": eoa}}]
    accounts = {eoa: {"nonce": 2, "code": "0x"}, contract_addr: {"nonce": 1, "code": "0x6080"}}
    assert dump_is_consistent({"transactions": txs, "accounts": accounts})
    ahead = dict(accounts, **{eoa: {"nonce": 3, "code": "0x"}})  # a tx in state, not in blocks
    assert not dump_is_consistent({"transactions": txs, "accounts": ahead})
    assert not dump_is_consistent({"transactions": txs[:1], "accounts": accounts})


def test_a_picked_port_taken_before_anvil_binds_it_is_picked_again(tmp_path, monkeypatch) -> None:
    """free_port() races other processes: when the port it gave is bound before anvil
    binds it, ManagedAnvil picks another instead of failing."""
    import socket

    import ledger.anvil as anvil_module

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    real_free_port = anvil_module.free_port
    monkeypatch.setattr(anvil_module, "free_port", lambda: next(picks, None) or real_free_port())
    try:
        with ManagedAnvil(tmp_path) as chain:
            assert chain.port != taken
            assert int(rpc_call(chain.rpc_url, "eth_chainId"), 16) == 31337
    finally:
        squatter.close()


def test_a_configured_port_in_use_is_an_error_naming_it(tmp_path) -> None:
    import socket

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        with pytest.raises(AnvilError, match=f"port {port}.*Address already in use.*choose another port"):
            ManagedAnvil(tmp_path, port=port).start()
    finally:
        squatter.close()
