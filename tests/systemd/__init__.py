"""The systemd tier: our units under a real systemd in a throw-away container."""
