-- Act on a schedule's due times: the only script that starts a schedule's runs, so that
-- each due time starts one run at most, whichever workers call it and however often
-- (the evaluator of any worker, a client's trigger or backfill). A due time's run is the
-- execution "<schedule id>@<due time>" (on this shard: see keyspace.shard_of), and an
-- execution that exists is never started again; a scheduled due time at or before the
-- schedule's cursor has been acted on, and is passed over.
-- KEYS: timers, closed, the schedule's keys (as sched_put), then, declared by the caller
-- (protocol.py) from what it read: for each due time, and the first waiting one, its
-- execution's wf hash, run hash, history, signal ids and the task queue's workflow-task
-- stream; the wf hash of each execution in `fin`; with CANCEL_OTHER or TERMINATE_OTHER,
-- each open execution's current run's keys and streams; the shard's outbox and listing
-- indexes.
-- ARGV: prefix, schedule id, the definition's digest and the state's version (`ver`:
-- every pause, unpause and change moves it) as the caller read them, now ms (the
-- caller's clock: the evaluator's, which a test may set), mode ('tick': due times the
-- evaluator found; 'trigger' and 'backfill': the caller's, which neither move the cursor
-- nor count against max_executions), overlap ('' for the schedule's), retention ms, the
-- next score (when the evaluator looks next; -1: no due time ahead), the run id for the
-- first waiting due time ('' if none), skip-to ms and the count of due times skipped up
-- to it ('' and 0: none; the catch-up window), then n, then n of (due ms, start ms (the
-- due time with its jitter: what the catch-up window is measured by), execution id, run
-- id), ascending.
-- First, what happened since the last call: the schedule's executions that closed
-- (pause_on_failure reads how), then the first waiting due time starts if nothing is open.
-- Returns {R.OK, started, skipped, buffered, the first of the call's own due times that
-- started ('' none), why the last due time was skipped ('' none)}, {R.NOT_FOUND} (no such
-- schedule), {R.STALE} (the definition or the state changed since the caller read them:
-- it plans again) or {R.REROUTE} (an open execution's
-- keys were not declared): nothing written but by R.OK (and NOT_FOUND's drop of a
-- deleted schedule's due entry).
local sid, digest, version = ARGV[2], ARGV[3], ARGV[4]
local now = num(ARGV[5], 'now', 0)
local mode, override = ARGV[6], ARGV[7]
local retention = num(ARGV[8], 'retention', 1)
local next_score = num(ARGV[9], 'next score', -1)
local head_run = ARGV[10]
local skip_to = ARGV[11] ~= '' and num(ARGV[11], 'skip-to ms', 0) or nil
local skip_n = num(ARGV[12], 'skipped count', 0)
local n = num(ARGV[13], 'count', 0)
local hk, openk, bufk = schedule_key(sid), schedule_key(sid, 'open'), schedule_key(sid, 'buf')
local h = call('HMGET', hk, 'digest', 'paused_ms', 'cursor', 'remaining', 'wf', 'tq', 'tmo', 'tpl', 'tpl_n', 'overlap',
  'catchup', 'pof', 'ver')
if not h[1] then
  if call('ZREM', sched_key('due'), sid) == 1 then call('HDEL', sched_key('fin'), sid) end
  return { R.NOT_FOUND }
end
if h[1] ~= digest or (h[13] or '0') ~= version then return { R.STALE } end
if mode ~= 'tick' and mode ~= 'trigger' and mode ~= 'backfill' then return { R.INVALID, 'unknown mode ' .. mode } end
local paused, cursor, remaining = h[2] ~= false, tonumber(h[3]), tonumber(h[4])
local wf, tq, tmo, tpl, tpl_n = h[5], h[6], tonumber(h[7]), h[8], tonumber(h[9])
local pol = override ~= '' and override or h[10]
local catchup, pof = tonumber(h[11]), h[12] == '1'
local fires = {}
for i = 0, n - 1 do
  local at = 14 + 4 * i
  local due, start_ms, wid, run = num(ARGV[at], 'due ms', 0), num(ARGV[at + 1], 'start ms', 0), ARGV[at + 2], ARGV[at + 3]
  if not (DECLARED[wf_key(wid)] and DECLARED[run_key(run)]) then
    return { R.INVALID, 'the keys of ' .. wid .. ' were not declared' }
  end
  fires[#fires + 1] = { due, wid, run, start_ms }
end
local open = call('SMEMBERS', openk)
-- the current run of each open execution, when this call may cancel or terminate it
local others = {}
if n > 0 and (pol == OV.CANCEL_OTHER or pol == OV.TERMINATE_OTHER) then
  for _, wid in ipairs(open) do
    if not DECLARED[wf_key(wid)] then return { R.REROUTE } end
    local cur = call('HMGET', wf_key(wid), 'run', 'status')
    if cur[2] == RS.RUNNING then
      if not DECLARED[run_key(cur[1])] then return { R.REROUTE } end
      others[#others + 1] = { wid, cur[1] }
    end
  end
end
-- checked: nothing below can fail
local started, skipped, buffered, first, why = 0, 0, 0, '', ''

local function seed(run)
  local hex = string.sub(redis.sha1hex(run .. NOW_US), 1, 32)
  return (string.gsub(hex, '..', function(x) return string.char(tonumber(x, 16)) end))
end

local function start(due, wid, run, how)
  -- the template's entries, and the run's own: its seed, schedule and due time
  local body = string.char(0x80 + tpl_n + 3) .. tpl .. cmsgpack.pack('seed') .. '\196\16' .. seed(run)
    .. cmsgpack.pack('schedule_id') .. cmsgpack.pack(sid) .. cmsgpack.pack('scheduled_ms') .. cmsgpack.pack(due)
  create_run(wid, run, wf, tq, body, tmo, false, true)
  call('HSET', run_key(run), 'sched', sid)
  call('SADD', openk, wid)
  schedule_log(sid, { k = SA.STARTED, at = now, due = due, wid = wid, run = run, how = how })
  started = started + 1
  if first == '' and how ~= 'waited' then first = wid end
end

local function skip(due, wid, reason)
  schedule_log(sid, { k = SA.SKIPPED, at = now, due = due, wid = wid, why = reason })
  skipped = skipped + 1
  why = reason
end

-- executions that closed since the last call (those whose keys the caller declared;
-- the rest stay for the next); one still running went on in a new run (continue-as-new, reset)
local fin = call('HGET', sched_key('fin'), sid)
if fin then
  local left = {}
  for _, wid in ipairs(split(fin, ' ')) do
    if not DECLARED[wf_key(wid)] then
      left[#left + 1] = wid
    else
      local status = call('HGET', wf_key(wid), 'status')
      if status ~= RS.RUNNING and call('SREM', openk, wid) == 1 then
        schedule_log(sid, { k = SA.RUN_CLOSED, at = now, wid = wid, status = status or 'expired' })
        if pof and (status == RS.FAILED or status == RS.TIMED_OUT) and not paused then
          paused = true
          local note = 'paused: ' .. wid .. ' ' .. status .. ' (pause_on_failure)'
          call('HSET', hk, 'paused_ms', now, 'note', note)
          call('HINCRBY', hk, 'ver', 1)
          schedule_log(sid, { k = SA.PAUSED, at = now, why = note })
        end
      end
    end
  end
  if #left > 0 then call('HSET', sched_key('fin'), sid, table.concat(left, ' ')) else call('HDEL', sched_key('fin'), sid) end
end

-- the first waiting due time, once nothing is open ("<due ms> <execution id> <s|m>": m,
-- from a trigger or backfill, did not count against max_executions)
local function start_waiting()
  if paused or (pol ~= OV.ALLOW_ALL and call('SCARD', openk) > 0) then return end
  local head = call('LINDEX', bufk, 0)
  if not head then return end
  local p = split(head, ' ')
  if not DECLARED[wf_key(p[2])] then return end  -- (its caller did not see it: the next call)
  if call('EXISTS', wf_key(p[2])) == 1 then
    call('LPOP', bufk)
    skip(tonumber(p[1]), p[2], 'already ran: execution ' .. p[2] .. ' exists')
    return
  end
  if head_run == '' or not DECLARED[run_key(head_run)] then return end
  call('LPOP', bufk)
  start(tonumber(p[1]), p[2], head_run, 'waited')
end
start_waiting()

-- a due time that waited and was replaced gives its count back
local function unbuffer(entry, reason)
  local p = split(entry, ' ')
  if p[3] == 's' and remaining then remaining = remaining + 1 end
  skip(tonumber(p[1]), p[2], reason)
end

-- (with CANCEL_OTHER and TERMINATE_OTHER, of several due times in one call the last
-- one runs: each earlier one would be ended by the next at once)
local last_fire = fires[#fires] and fires[#fires][2]
local function act(due, wid, run, counted)
  if call('EXISTS', wf_key(wid)) == 1 then
    skip(due, wid, 'already ran: execution ' .. wid .. ' exists')
    return false
  end
  if (pol == OV.CANCEL_OTHER or pol == OV.TERMINATE_OTHER) and wid ~= last_fire then
    skip(due, wid, 'overlap: replaced by ' .. last_fire .. ', due by now too (' .. string.upper(pol) .. ')')
    return false
  end
  local busy = call('SCARD', openk) > 0
  local waiting = call('LLEN', bufk)
  local entry = due .. ' ' .. wid .. ' ' .. (counted and 's' or 'm')
  if pol == OV.ALLOW_ALL or not (busy or waiting > 0) then
    start(due, wid, run, mode == 'tick' and 'clock' or mode)
    return true
  end
  local running = busy and call('SRANDMEMBER', openk) or nil
  if pol == OV.SKIP then
    if not busy then start(due, wid, run, mode == 'tick' and 'clock' or mode) return true end
    skip(due, wid, 'overlap: ' .. running .. ' is still running (SKIP)')
    return false
  elseif pol == OV.BUFFER_ONE then
    if waiting > 0 then
      skip(due, wid, 'overlap: a due time already waits (BUFFER_ONE)')
      return false
    end
  elseif pol == OV.BUFFER_ALL then
    if waiting >= 1000 then
      skip(due, wid, 'overlap: 1000 due times already wait (BUFFER_ALL)')
      return false
    end
  elseif pol == OV.TERMINATE_OTHER then
    for _, o in ipairs(others) do
      if call('HGET', run_key(o[2]), 'status') == RS.RUNNING then
        local reason = 'schedule ' .. sid .. ': ' .. wid .. ' is due (TERMINATE_OTHER)'
        close_run(o[2], RS.TERMINATED, EV.WORKFLOW_EXECUTION_TERMINATED, cmsgpack.pack({ reason = reason }), retention)
        call('SREM', openk, o[1])
        schedule_log(sid, { k = SA.TERMINATED_OTHER, at = now, wid = o[1], why = reason })
      end
    end
    -- what waited (from an earlier policy) is replaced by this one
    for _, e in ipairs(call('LRANGE', bufk, 0, -1)) do unbuffer(e, 'overlap: replaced by ' .. wid .. ' (TERMINATE_OTHER)') end
    call('DEL', bufk)
    start(due, wid, run, mode == 'tick' and 'clock' or mode)
    return true
  elseif pol == OV.CANCEL_OTHER then
    for _, o in ipairs(others) do
      local r = call('HMGET', run_key(o[2]), 'status', 'cancel_req')
      if r[1] == RS.RUNNING and not r[2] then
        local reason = 'schedule ' .. sid .. ': ' .. wid .. ' is due (CANCEL_OTHER)'
        call('HSET', run_key(o[2]), 'cancel_req', 'schedule')
        deliver(o[2], EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED, cmsgpack.pack({ reason = reason }))
        schedule_log(sid, { k = SA.CANCEL_REQUESTED, at = now, wid = o[1], why = reason })
      end
    end
    -- the latest due time waits for the canceled run; an earlier waiting one is replaced
    for _, e in ipairs(call('LRANGE', bufk, 0, -1)) do unbuffer(e, 'overlap: replaced by ' .. wid .. ' (CANCEL_OTHER)') end
    call('DEL', bufk)
  end
  call('RPUSH', bufk, entry)
  schedule_log(sid, { k = SA.BUFFERED, at = now, due = due, wid = wid, why = running and ('waits for ' .. running) or 'waits for the runs before it' })
  buffered = buffered + 1
  return true
end

if mode == 'tick' then
  if not paused then
    if skip_to and skip_to > cursor then
      if skip_n > 0 then
        schedule_log(sid, { k = SA.SKIPPED, at = now, due = cursor, to = skip_to, n = skip_n,
          why = 'missed: outside the catch-up window' })
        call('HINCRBY', hk, 'n_skip', skip_n)
      end
      cursor = skip_to
    end
    for _, f in ipairs(fires) do
      if f[1] > cursor then
        if remaining and remaining <= 0 then break end
        cursor = f[1]
        if f[4] < now - catchup then
          skip(f[1], f[2], 'missed: outside the catch-up window')
        elseif act(f[1], f[2], f[3], true) and remaining then
          remaining = remaining - 1
        end
      end
    end
  end
else
  for _, f in ipairs(fires) do act(f[1], f[2], f[3], false) end
end
start_waiting()  -- (a TERMINATE_OTHER may have closed what a waiting one waited for)

if started > 0 then call('HINCRBY', hk, 'n_run', started) end
if skipped > 0 then call('HINCRBY', hk, 'n_skip', skipped) end
if mode == 'tick' then call('HSET', hk, 'cursor', string.format('%.0f', cursor)) end
if remaining then call('HSET', hk, 'remaining', string.format('%.0f', remaining)) end
local waiting_now = call('LLEN', bufk) > 0 and (pol == OV.ALLOW_ALL or call('SCARD', openk) == 0)
local score
if call('HEXISTS', sched_key('fin'), sid) == 1 then
  -- a close this call could not read (its caller looked before it) or made itself (a
  -- TERMINATE_OTHER): looked at again at once, so that no wake-up is lost
  score = 0
elseif paused then
  score = SCHEDULE_NEVER
elseif waiting_now then
  score = 0
elseif mode == 'tick' then
  score = (next_score < 0 or (remaining and remaining <= 0)) and SCHEDULE_NEVER or next_score
end
if score then call('ZADD', sched_key('due'), score, sid) end
return { R.OK, started, skipped, buffered, first, why }
