from anomaly.probe.atlas.cli import entry

raise SystemExit(entry())
