"""The Redis key layout of cluster mode and the Lua scripts that change more than one key at once.

Every key of one session carries the session id as its hash tag (``sluice:{s_…}:meta``,
``sluice:{s_…}:log``, ``sluice:{s_…}:subs``), so every script but `APPEND` touches one hash
slot and runs unchanged on Redis Cluster (`APPEND` writes many sessions in one call: there, one
call per slot). Per session:

- ``meta`` (hash): ``key`` (the owner key id), ``epoch`` (made when the session is created:
  a writer holding another epoch is writing to a session the store lost), ``seq`` (the newest
  logged seq), ``home`` (the node holding the live session; empty while none does), ``att``
  (the attach generation: one more for every transport attached, wherever it is) and one
  ``r:<request id>`` field per request in flight on the home (or forwarded to it, not yet
  started there: `MARK`, whose value, the forward's id, starts with the forwarding node's id and
  a ``/``);
- ``log`` (stream): one entry per event, entry id ``<seq>-0``, field ``m`` = the event's JSON,
  trimmed with ``MINID ~`` below the oldest event of the home's replay window (which keeps at
  least that window), and exactly below the oldest event the client has not acknowledged;
- ``subs`` (set): the nodes that hold (or are attaching) a transport of the session, so the
  session's live events and notices reach them;
- ``hist`` (string): the session's ``history: true`` conversation as its home last wrote it
  (`server.cluster.histories`), for the next home.

Per node: ``sluice:node:<id>`` (heartbeat, with a TTL), ``sluice:node:<id>:sessions`` (the
sessions it is home of), ``sluice:node:<id>:marks`` (sorted set: the sessions it marked
forwarded requests in, by when, so that a survivor finds what it left untaken: `ORPHAN`) and
``sluice:node:<id>:subs`` (the sessions whose ``subs`` name it, so
that a survivor takes a dead node off them), its control channel ``sluice:node:<id>:ctl``, its feed channel
``sluice:node:<id>:feed``, and ``sluice:nodes`` (sorted set of every node by last heartbeat, so
survivors find the dead).

A feed payload carries any number of sessions' lines: ``#<session id>`` starts a session's run,
then its events' JSON (never holding a raw newline; each line exactly the text frame a client is
sent) and notices (``!…``), newline-joined. `APPEND` publishes the events it logged once per node
per call, for all the call's sessions together; the other scripts publish notices, each to every
node in ``subs``.

This module only names keys and holds script text: it never talks to Redis.
"""

from __future__ import annotations

__all__ = [
    "APPEND",
    "ATTACH",
    "CLAIM",
    "END",
    "HISTORY",
    "MARK",
    "NODES",
    "ORPHAN",
    "TAKE",
    "UNMARK",
    "control_channel",
    "history_key",
    "log_key",
    "meta_key",
    "node_feed_channel",
    "node_key",
    "node_marks_key",
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


def node_marks_key(node_id: str) -> str:
    return f"sluice:node:{node_id}:marks"


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


# Append a batch of events to each of any number of sessions, written by their home in one call
# (one round trip of the home's `LogWriter`: one command, one reply, whatever the number of
# sessions), and publish what it logged: per node in the sessions' ``subs`` one feed payload with
# every session's new events (``#<session id>`` then its events' JSON), the writing node itself
# left out (it sends its own transports what it wrote), so a node only ever hears of logged
# events. A release publishes its events to every node in ``subs``, followed by ``!H`` (whoever
# holds the session's transport may claim it), so nothing of the old home's comes after.
#
# KEYS: per session, its meta, log and subs.  ARGV: node, ttl ms, then per session (in the order
# of KEYS): session id, epoch, first seq, the oldest seq to keep (older entries may go: the
# replay window, by count and by size, is the home's to compute), the oldest seq the client has
# not acknowledged (0: no ack since the last write; otherwise every entry below it goes, exactly),
# release (1: the home lets go of the session after this batch), then a count and that many
# request ids that started, a count and that many that ended, a count and that many events' JSON.
# Every number is read with ``tonumber`` (the writer zero-pads them to one width).
#
# The keys' ttl is set as a log begins (first seq 1) and as the home lets go; while a session is
# homed, its home refreshes them (`server.cluster.homes.refresh`), not every write.
#
# Returns one integer per session: its new last seq (a batch already applied, a retry after a
# lost reply, returns it too, and publishes nothing again); -1: no such session or another epoch
# (the store lost it), -2: seqs do not follow, -3: the node is not the session's home. Every
# session's keys share a hash tag; a call spans several sessions, so on Redis Cluster a write
# would be one call per slot.
APPEND = """
local node = ARGV[1]
local feeds, order = {}, {}
local function feed(target, lines)
  local out = feeds[target]
  if not out then
    out = {}
    feeds[target] = out
    order[#order + 1] = target
  end
  for _, line in ipairs(lines) do out[#out + 1] = line end
end
local function append(meta, log, subs, a)
  local sid, epoch, first, keep = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local acked, release = tonumber(ARGV[a + 4]), ARGV[a + 5]
  local started = tonumber(ARGV[a + 6])
  local s0 = a + 7
  local ended = tonumber(ARGV[s0 + started])
  local e0 = s0 + started + 1
  local n = tonumber(ARGV[e0 + ended])
  local v0 = e0 + ended + 1
  local cur = redis.call('HMGET', meta, 'epoch', 'home', 'seq')
  if not cur[1] or cur[1] ~= epoch then return -1, v0 + n end
  if cur[2] ~= node then return -3, v0 + n end
  local last = tonumber(cur[3])
  if n > 0 and last == first + n - 1 then return last, v0 + n end
  if last ~= first - 1 then return -2, v0 + n end
  for j = 0, started - 1 do redis.call('HSET', meta, 'r:' .. ARGV[s0 + j], '1') end
  for j = 0, n - 1 do
    redis.call('XADD', log, 'MINID', '~', keep, (first + j) .. '-0', 'm', ARGV[v0 + j])
  end
  if acked > 0 then redis.call('XTRIM', log, 'MINID', acked) end
  for j = 0, ended - 1 do redis.call('HDEL', meta, 'r:' .. ARGV[e0 + j]) end
  if n > 0 then redis.call('HSET', meta, 'seq', first + n - 1) end
  if release == '1' or n > 0 then
    local lines = {'#' .. sid}
    for j = v0, v0 + n - 1 do lines[#lines + 1] = ARGV[j] end
    if release == '1' then
      redis.call('HSET', meta, 'home', '')
      lines[#lines + 1] = '!H'
    end
    for _, target in ipairs(redis.call('SMEMBERS', subs)) do
      if target ~= node or release == '1' then feed(target, lines) end
    end
  end
  if first == 1 or release == '1' then
    redis.call('PEXPIRE', meta, ARGV[2])
    redis.call('PEXPIRE', log, ARGV[2])
    redis.call('PEXPIRE', subs, ARGV[2])
  end
  return first + n - 1, v0 + n
end
local replies = {}
local a = 3
for k = 1, #KEYS, 3 do
  replies[#replies + 1], a = append(KEYS[k], KEYS[k + 1], KEYS[k + 2], a)
end
for _, target in ipairs(order) do
  redis.call('PUBLISH', 'sluice:node:' .. target .. ':feed', table.concat(feeds[target], '\\n'))
end
return replies
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

# Lua: per request id ARGV[first..], its mark ``r:<id>`` changed to ``to`` (false: deleted) when
# it holds ``from``; one integer per id: 1 changed, 0 it held another value (or none).
_SWAP = """
local function swap(meta, from, to, first)
  local out = {}
  for i = first, #ARGV do
    local field = 'r:' .. ARGV[i]
    if redis.call('HGET', meta, field) == from then
      if to then redis.call('HSET', meta, field, to) else redis.call('HDEL', meta, field) end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  return out
end
"""

# A node about to forward requests to the session's home marks each as forwarded there: the mark's
# value is the forward's id, and a request already marked (one of that id in flight) is left as it
# is. Before it runs them the home `TAKE`s the marks (they become ``1``, its own requests' value,
# which a survivor ends if the home dies); a mark still holding a forward's id was never run, and
# the node that forwarded it may take it back (`UNMARK`) and run it at the next home.
#
# KEYS: meta.  ARGV: the home the node forwards to, the forward's id, then the request ids.
# Returns one integer per request id: 1 marked, 0 already in flight; nil when ``home`` is not (or
# no longer) the session's home (nothing is marked).
MARK = """
if redis.call('HGET', KEYS[1], 'home') ~= ARGV[1] then return nil end
local out = {}
for i = 3, #ARGV do out[#out + 1] = redis.call('HSETNX', KEYS[1], 'r:' .. ARGV[i], ARGV[2]) end
return out
"""

# Take back marks (`MARK`) that still hold ``value``: a forward's id (the home never took them:
# the forward did not reach it, or it was not the home), or ``1`` (the home took them and refused
# the requests).
#
# KEYS: meta.  ARGV: the value, then the request ids.
# Returns one integer per request id: 1 taken back, 0 it held another value (or none).
UNMARK = (
    _SWAP
    + """
return swap(KEYS[1], ARGV[1], false, 2)
"""
)

# The home, about to run requests a node forwarded (`MARK`), takes their marks in one step with
# checking it is still the home: each still holding the forward's id becomes ``1``, the home's own,
# so from here on a survivor ends it if this node dies, and the forwarder can no longer take it back.
#
# KEYS: meta.  ARGV: the home, the forward's id, then the request ids.
# Returns one integer per request id: 1 taken, 0 not this forward's mark; nil when the node is not
# (or no longer) the session's home (the requests must not run here).
TAKE = (
    _SWAP
    + """
if redis.call('HGET', KEYS[1], 'home') ~= ARGV[1] then return nil end
return swap(KEYS[1], ARGV[2], '1', 3)
"""
)

# The home ends what a dead node forwarded it and it never took (the forwarder stopped between
# `MARK` and its forward reaching the home): every mark still holding one of that node's forward
# ids (``<node>/…``) becomes ``1``, the home's own, in one step with checking it is still the home,
# so it races `TAKE` atomically: a mark taken first ran here, one made the home's here is never
# taken (and never run) after; the home then logs each one's retryable ``error``.
#
# KEYS: meta.  ARGV: the home, the dead node's forward-id prefix (``<node>/``).
# Returns the request ids whose marks it made the home's; nil when the node is not (or no longer)
# the session's home.
ORPHAN = """
if redis.call('HGET', KEYS[1], 'home') ~= ARGV[1] then return nil end
local fields, prefix, out = redis.call('HGETALL', KEYS[1]), ARGV[2], {}
for i = 1, #fields, 2 do
  local field, value = fields[i], fields[i + 1]
  if string.sub(field, 1, 2) == 'r:' and string.sub(value, 1, #prefix) == prefix then
    redis.call('HSET', KEYS[1], field, '1')
    out[#out + 1] = string.sub(field, 3)
  end
end
return out
"""
