"""The plain HTTP APIs (no session): `mount.install` adds them to the app.

Import the modules themselves; this package object imports nothing, so that a module of it never
imports its own package's routes (no cycle).
"""
