"""zeroship's base: what the launcher, the exporter and the serving runtime share (errors, casing,
the command-line plumbing, Ray session and compatibility). It imports neither launcher nor export, nor torch."""
