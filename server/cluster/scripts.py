"""The Redis key layout of cluster mode and the Lua scripts that change more than one key at once.

Every key of one session carries the session id as its hash tag (``sluice:{s_…}:meta``,
``sluice:{s_…}:log``, ``sluice:{s_…}:subs``), so each script touches one hash slot and runs
unchanged on Redis Cluster. Per session:

- ``meta`` (hash): ``key`` (the owner key id), ``epoch`` (made when the session is created:
  a writer holding another epoch is writing to a session the store lost), ``seq`` (the newest
  logged seq), ``home`` (the node holding the live session; empty while none does), ``att``
  (the attach generation: one more for every transport attached, wherever it is) and one
  ``r:<request id>`` field per request in flight on the home;
- ``log`` (stream): one entry per event, entry id ``<seq>-0``, field ``m`` = the event's JSON,
  trimmed with ``MINID ~`` below the oldest event of the home's replay window (which keeps at
  least that window);
- ``subs`` (set): the nodes that hold (or are attaching) a transport of the session, so the
  session's live events and notices reach them;
- ``hist`` (string): the session's ``history: true`` conversation as its home last wrote it
  (`server.cluster.histories`), for the next home.

Per node: ``sluice:node:<id>`` (heartbeat, with a TTL), ``sluice:node:<id>:sessions`` (the
sessions it is home of) and ``sluice:node:<id>:subs`` (the sessions whose ``subs`` name it, so
that a survivor takes a dead node off them), its control channel ``sluice:node:<id>:ctl``, its feed channel
``sluice:node:<id>:feed``, and ``sluice:nodes`` (sorted set of every node by last heartbeat, so
survivors find the dead).

A feed payload carries any number of sessions' lines: ``#<session id>`` starts a session's run,
then its events' JSON (never holding a raw newline) and notices (``!…``), newline-joined. A home
publishes the events a write confirmed once per node per write, for all its sessions together
(`server.cluster.eventlog`); the scripts publish the notices, each to every node in ``subs``.

This module only names keys and holds script text: it never talks to Redis.
"""

from __future__ import annotations

__all__ = [
    "APPEND",
    "ATTACH",
    "CLAIM",
    "END",
    "HISTORY",
    "NODES",
    "control_channel",
    "history_key",
    "log_key",
    "meta_key",
    "node_feed_channel",
    "node_key",
    "node_sessions_key",
    "node_subs_key",
    "subs_key",
]

NODES = "sluice:nodes"


def meta_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:meta"


def log_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:log"


def subs_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:subs"


def history_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:hist"


def node_key(node_id: str) -> str:
    return f"sluice:node:{node_id}"


def node_sessions_key(node_id: str) -> str:
    return f"sluice:node:{node_id}:sessions"


def node_subs_key(node_id: str) -> str:
    return f"sluice:node:{node_id}:subs"


def control_channel(node_id: str) -> str:
    return f"sluice:node:{node_id}:ctl"


def node_feed_channel(node_id: str) -> str:
    """The channel a node hears its sessions' feeds on (the scripts build the same name)."""
    return f"sluice:node:{node_id}:feed"


# Lua: publish ARGV[sid] run ``payload`` to every node in the set KEYS[subs] (the nodes' feeds).
_NOTIFY = """
local function notify(subs, payload)
  for _, node in ipairs(subs) do redis.call('PUBLISH', 'sluice:node:' .. node .. ':feed', payload) end
end
"""


# Append a batch of events numbered first..first+n-1, written by the session's home. The home
# publishes them once this script confirmed them (never before: a node only ever hears of logged
# events), to the nodes this returns; a release publishes them here instead, followed by ``!H``
# (whoever holds the session's transport may claim it), so nothing of the old home's comes after.
#
# KEYS: meta, log, subs.  ARGV: node, epoch, first seq, the oldest seq to keep (older entries may
# go: the replay window, by count and by size, is the home's to compute), ttl ms, session id,
# release (1: the home lets go of the session after this batch), then a count and that many
# request ids that started, a count and that many that ended, then the events' JSON.
#
# Returns {the new last seq, the nodes in subs...}; the batch already applied (a retry after a
# lost reply) returns it too. -1: no such session or another epoch (the store lost it), -2: seqs
# do not follow, -3: the node is not the session's home.
APPEND = (
    _NOTIFY
    + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or epoch ~= ARGV[2] then return -1 end
if redis.call('HGET', KEYS[1], 'home') ~= ARGV[1] then return -3 end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local first = tonumber(ARGV[3])
local i = 8
local started = tonumber(ARGV[i])
local starts = {}
for j = 1, started do starts[j] = ARGV[i + j] end
i = i + started + 1
local ended = tonumber(ARGV[i])
local ends = {}
for j = 1, ended do ends[j] = ARGV[i + j] end
i = i + ended + 1
local n = #ARGV - i + 1
local subs = redis.call('SMEMBERS', KEYS[3])
if last == first + n - 1 and n > 0 then
  table.insert(subs, 1, last)
  return subs
end
if last ~= first - 1 then return -2 end
for j = 1, started do redis.call('HSET', KEYS[1], 'r:' .. starts[j], '1') end
for j = 0, n - 1 do
  redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[4], (first + j) .. '-0', 'm', ARGV[i + j])
end
for j = 1, ended do redis.call('HDEL', KEYS[1], 'r:' .. ends[j]) end
if n > 0 then redis.call('HSET', KEYS[1], 'seq', first + n - 1) end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'home', '')
  local lines = {'#' .. ARGV[6]}
  for j = i, #ARGV do lines[#lines + 1] = ARGV[j] end
  lines[#lines + 1] = '!H'
  notify(subs, table.concat(lines, '\\n'))
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
table.insert(subs, 1, first + n - 1)
return subs
"""
)

# Become the home of a session that has none (or whose home is ``expected``, a node known dead).
#
# KEYS: meta.  ARGV: node, expected old home ('' for none).
# Returns {epoch, seq, key} once claimed; nil when there is no such session; the current home (a
# string) when another node holds it.
CLAIM = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'key', 'home')
if not meta[1] then return nil end
local home = meta[4] or ''
if home ~= '' and home ~= ARGV[1] and home ~= ARGV[2] then return home end
redis.call('HSET', KEYS[1], 'home', ARGV[1])
return {meta[1], meta[2], meta[3]}
"""

# A transport is attaching to the session: number it, one more than any transport before it, and
# announce it to every node in subs (``!A <node>/<generation>``) in the same step, so that every
# node orders takeovers by the generation, never by when an announcement happens to reach it.
#
# KEYS: meta, subs.  ARGV: node, session id.
# Returns the transport's token, ``<node>/<generation>``; nil when there is no such session.
ATTACH = (
    _NOTIFY
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local token = ARGV[1] .. '/' .. redis.call('HINCRBY', KEYS[1], 'att', 1)
notify(redis.call('SMEMBERS', KEYS[2]), '#' .. ARGV[2] .. '\\n!A ' .. token)
return token
"""
)

# Forget a session: tell every node in subs (``!E``: its transports close), then delete its keys.
#
# KEYS: meta, log, subs.  ARGV: session id.
END = (
    _NOTIFY
    + """
notify(redis.call('SMEMBERS', KEYS[3]), '#' .. ARGV[1] .. '\\n!E')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""
)

# The home writes the session's conversation (`server.cluster.histories`): only while it is still
# the home of the same epoch, so a node that lost the session never overwrites a newer home's.
#
# KEYS: meta, hist.  ARGV: node, epoch, the conversation's JSON, ttl ms.
# Returns 1 when written, 0 when this node is not (or no longer) the session's home.
HISTORY = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'home')
if meta[1] ~= ARGV[2] or meta[2] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
"""
