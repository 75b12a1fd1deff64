"""The Redis key layout of cluster mode and the Lua scripts that change more than one key at once.

Every key of one session carries the session id as its hash tag (``sluice:{s_…}:meta``,
``sluice:{s_…}:log``) and the session's live feed is the channel ``sluice:{s_…}:feed``, so each
script touches one hash slot and runs unchanged on Redis Cluster. Per session:

- ``meta`` (hash): ``key`` (the owner key id), ``epoch`` (made when the session is created:
  a writer holding another epoch is writing to a session the store lost), ``seq`` (the newest
  logged seq), ``home`` (the node holding the live session; empty while none does), ``att``
  (the token of the transport attached last, wherever it is) and one ``r:<request id>`` field
  per request in flight on the home;
- ``log`` (stream): one entry per event, entry id ``<seq>-0``, field ``m`` = the event's JSON,
  trimmed with ``MINID ~`` below the oldest event of the home's replay window (which keeps at
  least that window).

Per node: ``sluice:node:<id>`` (heartbeat, with a TTL) and ``sluice:node:<id>:sessions`` (the
sessions it is home of), its control channel ``sluice:node:<id>:ctl``, and ``sluice:nodes``
(sorted set of every node by last heartbeat, so survivors find the dead).

This module only names keys and holds script text: it never talks to Redis.
"""

from __future__ import annotations

__all__ = [
    "APPEND",
    "CLAIM",
    "NODES",
    "control_channel",
    "feed_channel",
    "log_key",
    "meta_key",
    "node_key",
    "node_sessions_key",
]

NODES = "sluice:nodes"


def meta_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:meta"


def log_key(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:log"


def feed_channel(session_id: str) -> str:
    return f"sluice:{{{session_id}}}:feed"


def node_key(node_id: str) -> str:
    return f"sluice:node:{node_id}"


def node_sessions_key(node_id: str) -> str:
    return f"sluice:node:{node_id}:sessions"


def control_channel(node_id: str) -> str:
    return f"sluice:node:{node_id}:ctl"


# Append, for each of one or more sessions homed on one node, a batch of events numbered
# first..first+n-1, and publish each batch on its session's channel in the same step, so the live
# feed and the log always carry the same events with the same seqs. One call carries every
# session a node writes at once (on Redis Cluster a call would group the sessions of one slot).
#
# KEYS: meta and log of each session.  ARGV: node, ttl ms, then per session 8 values: epoch,
# first seq, the oldest seq to keep (older entries may go: the replay window, by count and by
# size, is the home's to compute), channel, release (1: the home lets go of the session after
# this batch, publishing ``!H``), the JSON list of request ids that started, the JSON list of
# those that ended, and the events' JSON joined by newlines (JSON text never holds a raw one).
#
# Returns one number per session: its new last seq (a batch already applied, a retry after a
# lost reply, returns it too); -1: no such session or another epoch (the store lost it),
# -2: seqs do not follow, -3: the node is not the session's home.
APPEND = """
local function ids(json)
  if json == '[]' then return {} end
  return cjson.decode(json)
end

local function lines(text)
  local out = {}
  for line in string.gmatch(text, '[^\\n]+') do out[#out + 1] = line end
  return out
end

local function append(meta, log, node, ttl, a)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch or epoch ~= ARGV[a] then return -1 end
  if redis.call('HGET', meta, 'home') ~= node then return -3 end
  local last = tonumber(redis.call('HGET', meta, 'seq'))
  local first = tonumber(ARGV[a + 1])
  local events = lines(ARGV[a + 7])
  local n = #events
  if n > 0 and last == first + n - 1 then return last end
  if last ~= first - 1 then return -2 end
  for _, id in ipairs(ids(ARGV[a + 5])) do redis.call('HSET', meta, 'r:' .. id, '1') end
  for j = 1, n do
    redis.call('XADD', log, 'MINID', '~', ARGV[a + 2], (first + j - 1) .. '-0', 'm', events[j])
  end
  for _, id in ipairs(ids(ARGV[a + 6])) do redis.call('HDEL', meta, 'r:' .. id) end
  if n > 0 then
    redis.call('HSET', meta, 'seq', first + n - 1)
    redis.call('PUBLISH', ARGV[a + 3], ARGV[a + 7])
  end
  if ARGV[a + 4] == '1' then
    redis.call('HSET', meta, 'home', '')
    redis.call('PUBLISH', ARGV[a + 3], '!H')
  end
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', log, ttl)
  return first + n - 1
end

local results = {}
for s = 1, #KEYS / 2 do
  results[s] = append(KEYS[2 * s - 1], KEYS[2 * s], ARGV[1], ARGV[2], 3 + (s - 1) * 8)
end
return results
"""

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
