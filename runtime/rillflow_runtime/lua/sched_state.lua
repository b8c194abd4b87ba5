-- Pause, unpause or delete a schedule (a client). KEYS: timers, closed, the schedule's
-- keys (as sched_put). ARGV: prefix, schedule id, op ('pause', 'unpause' or 'delete'),
-- now ms (the caller's clock), note ('' for a default), and for unpause the count of due
-- times the pause skipped (counted by the caller from the definition, which Lua cannot
-- read). Pause and unpause move `ver` (see sched_fire).
-- While paused, no due time runs, and none waits to: unpausing goes on from now, and
-- the due times in between are recorded as skipped (one log entry). Deleting removes
-- the schedule and what it keeps; its runs go on (they are executions like any other).
-- Returns {R.OK, 'paused' | 'unpaused' | 'deleted' | 'unchanged'} or {R.NOT_FOUND}.
local sid, op = ARGV[2], ARGV[3]
local now = num(ARGV[4], 'now', 0)
local note = ARGV[5]
local skipped = num(ARGV[6] ~= '' and ARGV[6] or '0', 'skipped count', 0)
local hk = schedule_key(sid)
local h = call('HMGET', hk, 'digest', 'paused_ms', 'cursor')
if not h[1] then return { R.NOT_FOUND } end
if op == 'delete' then
  call('DEL', hk, schedule_key(sid, 'open'), schedule_key(sid, 'buf'), schedule_key(sid, 'log'))
  call('ZREM', sched_key('due'), sid)
  call('HDEL', sched_key('fin'), sid)
  return { R.OK, 'deleted' }
elseif op == 'pause' then
  if h[2] then
    if note ~= '' then call('HSET', hk, 'note', note) end
    return { R.OK, 'unchanged' }
  end
  note = note ~= '' and note or 'paused by a client'
  call('HSET', hk, 'paused_ms', now, 'note', note)
  call('HINCRBY', hk, 'ver', 1)
  call('ZADD', sched_key('due'), SCHEDULE_NEVER, sid)
  schedule_log(sid, { k = SA.PAUSED, at = now, why = note })
  return { R.OK, SA.PAUSED }
elseif op == 'unpause' then
  if not h[2] then return { R.OK, 'unchanged' } end
  note = note ~= '' and note or 'unpaused by a client'
  call('HDEL', hk, 'paused_ms')
  call('HSET', hk, 'note', note)
  call('HINCRBY', hk, 'ver', 1)
  local cursor = tonumber(h[3])
  if cursor < now then
    if skipped > 0 then
      schedule_log(sid, { k = SA.SKIPPED, at = now, due = cursor, to = now, n = skipped, why = 'while paused' })
      call('HINCRBY', hk, 'n_skip', skipped)
    end
    call('HSET', hk, 'cursor', string.format('%.0f', now))
  end
  call('ZADD', sched_key('due'), 0, sid)
  schedule_log(sid, { k = SA.UNPAUSED, at = now, why = note })
  return { R.OK, SA.UNPAUSED }
end
return { R.INVALID, 'unknown op ' .. tostring(op) }
