-- Shared prelude, prepended to every script: key names, clock, history append,
-- event delivery and run closing. Every key a script touches lives in one shard:
-- KEYS[1] is that shard's timers zset and ARGV[1] its key prefix "rf:{ns:S}:".
local P = ARGV[1]
local GROUP = 'rf'
local TIMERS = KEYS[1]

local NOW
do
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function run_key(run) return P .. 'run:' .. run end
local function hist_key(wid, run) return P .. 'h:' .. wid .. ':' .. run end
local function act_key(run) return P .. 'act:' .. run end
local function buf_key(run) return P .. 'buf:' .. run end
local function wf_key(wid) return P .. 'wf:' .. wid end
local function sig_key(run) return P .. 'sig:' .. run end
local function upd_key(run) return P .. 'upd:' .. run end
local function upd_reply(run, id) return P .. 'ur:' .. run .. ':' .. id end
local function queue_key(tq, kind) return P .. 'q:' .. tq .. ':' .. kind end

-- The run a client names: the given run id, or ('' given) the execution's current run
-- ('' if there is none).
local function current_run(wid, run)
  if run ~= '' then return run end
  return redis.call('HGET', wf_key(wid), 'run') or ''
end

-- Remove a task message for good: XACK + XDEL keep a task stream's length equal to
-- its backlog plus tasks in flight.
local function drop_msg(stream, id)
  if id and id ~= '' then
    redis.call('XACK', stream, GROUP, id)
    redis.call('XDEL', stream, id)
  end
end

-- Append one event to a run's history; the stream id is "<event_id>-0".
local function append(run, wid, etype, body, t)
  local eid = redis.call('HINCRBY', run_key(run), 'last_eid', 1)
  redis.call('XADD', hist_key(wid, run), eid .. '-0', 'type', etype, 't', t or NOW, 'd', body)
  return eid
end

-- Queue a workflow task: on the sticky stream of the worker that holds the run in its
-- cache, if there is one (moved to the shared stream by the K timer unless that worker
-- starts it in time), else on the task queue's shared stream.
local function schedule_wft(run, tq)
  local rk = run_key(run)
  local st = redis.call('HMGET', rk, 'sticky', 'sticky_ms')
  local q = queue_key(tq, 'wft')
  if st[1] and st[1] ~= '' then q = queue_key(tq, 'wft@' .. st[1]) end
  local id = redis.call('XADD', q, '*', 'run', run)
  redis.call('HSET', rk, 'wft', 'scheduled', 'wft_msg', id, 'wft_q', q)
  if st[1] and st[1] ~= '' then
    redis.call('ZADD', TIMERS, NOW + tonumber(st[2]), 'K|' .. run .. '|' .. id)
  end
  return id
end

-- Move events that arrived while a workflow task was in flight into the history.
local function flush_buffer(run, wid)
  local k = buf_key(run)
  local items = redis.call('LRANGE', k, 0, -1)
  if #items == 0 then return 0 end
  for i = 1, #items, 3 do
    append(run, wid, items[i], items[i + 2], items[i + 1])
  end
  redis.call('DEL', k)
  return #items / 3
end

-- Whether a signal or an update is waiting in the buffer: a run must not close
-- without seeing it.
local function message_buffered(run)
  local items = redis.call('LRANGE', buf_key(run), 0, -1)
  for i = 1, #items, 3 do
    if items[i] == 'WorkflowExecutionSignaled' or items[i] == 'WorkflowExecutionUpdateAccepted' then
      return true
    end
  end
  return false
end

-- An event the workflow must see: buffered while a task is started, otherwise
-- appended, with a workflow task scheduled unless one already is (or is backing off).
local function deliver(run, etype, body)
  local r = redis.call('HMGET', run_key(run), 'status', 'wft', 'wid', 'tq')
  if r[1] ~= 'running' then return false end
  if r[2] == 'started' then
    redis.call('RPUSH', buf_key(run), etype, NOW, body)
    -- the task that closes the run looks for buffered messages only when this is set
    if etype == 'WorkflowExecutionSignaled' or etype == 'WorkflowExecutionUpdateAccepted' then
      redis.call('HSET', run_key(run), 'msgbuf', 1)
    end
  else
    append(run, r[3], etype, body)
    if r[2] ~= 'scheduled' and r[2] ~= 'backoff' then schedule_wft(run, r[4]) end
  end
  return true
end

-- Record an update's outcome where its callers look: the run's update hash (for any
-- caller, while the run is retained) and a reply list the waiting caller blocks on.
local function finish_update(run, id, body)
  redis.call('HSET', upd_key(run), id, 'done', id .. ':o', body)
  redis.call('LPUSH', upd_reply(run, id), body)
  redis.call('PEXPIRE', upd_reply(run, id), 60000)
end

-- Set on the run hash when a signal or an update reaches it: only then does closing
-- the run touch their keys, so runs without messages pay nothing for them.
local function note_messages(run)
  redis.call('HSET', run_key(run), 'msgs', 1)
end

local function expire_run(run, wid, retention_ms, msgs)
  local keys = { run_key(run), hist_key(wid, run), act_key(run) }
  if msgs then
    keys[#keys + 1] = sig_key(run)
    keys[#keys + 1] = upd_key(run)
  end
  for _, k in ipairs(keys) do
    redis.call('PEXPIRE', k, retention_ms)
  end
  local wk = wf_key(wid)
  if redis.call('HGET', wk, 'run') == run then redis.call('PEXPIRE', wk, retention_ms) end
end

-- Close a run: the closing event, the outcome for result-waiters, the closed-runs
-- stream they block on, and the retention clock.
local function close_run(run, status, etype, body, retention_ms)
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'wid', 'wft_q', 'wft', 'wft_msg', 'msgs')
  local wid = r[1]
  append(run, wid, etype, body)
  if r[3] == 'scheduled' then drop_msg(r[2], r[4]) end
  redis.call('HSET', rk, 'status', status, 'closed_ms', NOW, 'wft', '', 'outcome', body,
    'outcome_type', etype)
  if redis.call('HGET', wf_key(wid), 'run') == run then
    redis.call('HSET', wf_key(wid), 'status', status)
  end
  redis.call('ZREM', TIMERS, 'X|' .. run)
  redis.call('DEL', buf_key(run))
  -- updates still running will never finish: their callers are told now
  local upd = r[5] and redis.call('HGETALL', upd_key(run)) or {}
  for i = 1, #upd, 2 do
    if upd[i + 1] == 'accepted' then
      finish_update(run, upd[i], cmsgpack.pack({ update_id = upd[i], failure = {
        type = 'WorkflowClosed', non_retryable = true, stack = '',
        message = 'the run closed (' .. status .. ') before the update completed' } }))
    end
  end
  redis.call('XADD', P .. 'closed', 'MAXLEN', '~', 10000, '*', 'run', run, 'wid', wid, 'status', status)
  expire_run(run, wid, retention_ms, r[5])
end

-- Per-activity state lives in the run's act hash: field <seq> is a msgpack map of
-- numbers and short strings (never user payloads), <seq>:b the scheduled event body
-- (opaque to Lua), <seq>:hb the last heartbeat details, <seq>:f the last failure.
local function act_get(run, seq)
  local raw = redis.call('HGET', act_key(run), seq)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

local function act_put(run, seq, s)
  redis.call('HSET', act_key(run), seq, cmsgpack.pack(s))
end

local function act_forget(run, seq, s)
  redis.call('HDEL', act_key(run), seq, seq .. ':b', seq .. ':hb', seq .. ':f')
  redis.call('ZREM', TIMERS, 'A|' .. run .. '|' .. seq .. '|' .. s.att,
    'R|' .. run .. '|' .. seq .. '|' .. s.att, 'S|' .. run .. '|' .. seq)
end

-- An attempt's deadline: the earliest of start-to-close, the next heartbeat and
-- schedule-to-close.
local function act_deadline(s)
  local dl = s.started + s.stc
  if s.hbt > 0 and NOW + s.hbt < dl then dl = NOW + s.hbt end
  if s.s2c > 0 and s.sched + s.s2c < dl then dl = s.sched + s.s2c end
  return dl
end

local function act_dispatch(run, seq, s)
  s.msg = redis.call('XADD', queue_key(s.tq, 'act'), '*', 'run', run, 'seq', seq, 'att', s.att)
  s.st = 'scheduled'
  act_put(run, seq, s)
end

-- After a failed or timed-out attempt: retry with exponential backoff while the
-- policy allows and the schedule-to-close deadline is not passed, else fail for good.
-- Returns true when a retry was scheduled.
local function act_retry_or_fail(run, wid, seq, s, failure_body, non_retryable, final_type)
  local rk_hb = act_key(run)
  if failure_body then redis.call('HSET', rk_hb, seq .. ':f', failure_body) end
  local delay = s.ii * (s.bc ^ (s.att - 1))
  if s.mi > 0 and delay > s.mi then delay = s.mi end
  local due = NOW + math.floor(delay)
  local exhausted = (s.max > 0 and s.att >= s.max)
  local past_deadline = (s.s2c > 0 and due >= s.sched + s.s2c)
  if non_retryable or exhausted or past_deadline then
    act_forget(run, seq, s)
    deliver(run, final_type, failure_body)
    return false
  end
  append(run, wid, 'ActivityTaskRetrying', failure_body)
  s.att = s.att + 1
  s.st = 'backoff'
  s.due = due
  s.msg = ''
  act_put(run, seq, s)
  redis.call('ZADD', TIMERS, due, 'R|' .. run .. '|' .. seq .. '|' .. s.att)
  return true
end

local function timeout_failure(seq, att, kind)
  return cmsgpack.pack({ seq = tonumber(seq), att = att, failure = {
    type = 'ActivityTimeoutError', message = 'activity ' .. kind .. ' timeout',
    timeout_type = kind, non_retryable = false, stack = '' } })
end
