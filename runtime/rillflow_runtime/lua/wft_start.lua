-- Start a batch of workflow tasks (worker). ARGV: prefix, the stream read, task timeout ms,
-- max events returned, worker identity, then per task: run_id, message id, last event id
-- the worker has. A repeat of this call by the same worker (a client retry after a dropped
-- connection) answers the same, with the same fence.
-- Per task returns {'ok', fence, now, wid, wtype, last_eid, start_ms, events, attempt}
-- or {'stale'} (the message was dropped) or {'busy'} (started elsewhere, in flight).
local wq, timeout, max_events, worker = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local out = {}
for i = 6, #ARGV, 3 do
  local run, msg, since = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'status', 'wft', 'wft_msg', 'wid', 'wtype', 'last_eid',
    'start_ms', 'wft_failures', 'wft_by', 'wft_seq', 'wft_start_ms')
  local again = r[1] == 'running' and r[3] == msg and r[2] == 'started' and r[9] == worker
  if (r[1] == 'running' and r[3] == msg and r[2] == 'scheduled') or again then
    local fence, started = tonumber(r[10]), tonumber(r[11])
    if not again then
      fence = redis.call('HINCRBY', rk, 'wft_seq', 1)
      started = NOW
      redis.call('HSET', rk, 'wft', 'started', 'wft_start_ms', NOW, 'wft_by', worker)
      redis.call('ZREM', TIMERS, 'K|' .. run .. '|' .. msg)
      redis.call('ZADD', TIMERS, NOW + timeout, 'W|' .. run .. '|' .. fence)
    end
    local events = redis.call('XRANGE', hist_key(r[4], run), (since + 1) .. '-0', '+',
      'COUNT', max_events)
    out[#out + 1] = { 'ok', fence, started, r[4], r[5], tonumber(r[6]), tonumber(r[7]), events,
      (tonumber(r[8]) or 0) + 1 }
  elseif r[1] == 'running' and r[3] == msg and r[2] == 'started' then
    out[#out + 1] = { 'busy' }
  else
    drop_msg(wq, msg)
    out[#out + 1] = { 'stale' }
  end
end
return out
