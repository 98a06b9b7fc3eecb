"""The kiosk runtime: catalog, engines, matching and the commands a kiosk runs (no torch)."""
