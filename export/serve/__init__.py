"""Serving a bundle over HTTP: one app (service), two runners (local: in process; ray_serve: Ray Serve).
Imports no torch and nothing of the launcher."""
