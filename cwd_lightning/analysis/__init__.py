"""Inspection helpers: per-channel spatial distributions, rendering, run reports."""
