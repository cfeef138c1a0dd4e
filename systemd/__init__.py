"""The systemd unit templates and the example config, installed with the package as data
(``kdumpling-agent service install`` reads them from here, not from a checkout)."""
