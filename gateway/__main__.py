from gateway.cli import entry

raise SystemExit(entry())
