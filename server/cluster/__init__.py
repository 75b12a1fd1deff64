"""Cluster mode: sessions and their event logs in Redis, so that any node serves any session.

Chosen by ``SLUICE_REDIS_URL``; without it nothing here is imported and a node keeps every session
in memory. `redis` is the connection and its health, `scripts` the key layout and the Lua that
changes several keys at once, `eventlog` the Redis-backed event log and its writer, `node` this
process as a node (lease, pub/sub, control messages), `session` one session as a node sees it,
`forwarded` what travels to a session's home, `homes` the store steps of making, claiming and
recovering homes, `sessions` the registry behind the transports' seam, `mode` the wiring.
"""
