"""Fleet provisioning: `storyscan provision` writes one folder per device (identity, broker
credentials, TLS client certificate, device config, systemd units, Jetson set-up script) and
the broker's password, ACL and listener files. See provisioning/README.md."""
