from anomaly.probe.cli import entry

raise SystemExit(entry())
