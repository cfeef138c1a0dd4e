"""kdumpling-agent: captures snapshots on demand or on a schedule through the shared writer."""
