"""PyInstaller entry point of the one-file `edge-agent` binary."""

from agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
