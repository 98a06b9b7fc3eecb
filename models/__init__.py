"""Network definitions, weights and the preprocessing shared by trainer and kiosk."""
