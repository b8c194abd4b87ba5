-- Start a batch of workflow tasks (worker). KEYS: timers, closed, the stream read, then
-- each task's run hash and history (the task message names the workflow id).
-- ARGV: prefix, task timeout ms, max events returned, worker identity, then per task:
-- run_id, message id, the last event id the worker's cached instance has applied (0 =
-- none) and the fence of the completion that brought it there ('' = none). The cache is
-- good only if that completion is the last one Redis recorded (wft_done): after a
-- rollback, new events may reuse the ids the cache has seen, and only the fence tells.
-- A repeat of this call by the same worker (a client retry) answers the same,
-- with the same fence. The fence is "<attempt number>-<start time in us>": after a Redis
-- rollback the attempt number may repeat but the time does not, so a fence from before
-- the rollback is never current again.
-- Per task returns {R.OK, fence, now, wid, wtype, last_eid, start_ms, events, attempt,
-- since} where events follow `since`: the worker's own value, or 0 when the history is
-- not the one the cached instance saw (a rollback; another worker's completion): the
-- instance must be replayed from these events;
-- or {R.STALE} (the message was dropped) or {R.BUSY} (started elsewhere, in flight).
local wq, timeout, max_events, worker = KEYS[3], num(ARGV[2], 'timeout', 1), num(ARGV[3], 'max events', 1), ARGV[4]
if (#ARGV - 4) % 4 ~= 0 then error('rillflow: wft_start takes 4 arguments per task') end
for i = 5, #ARGV, 4 do num(ARGV[i + 2], 'since', 0) end
local out = {}
for i = 5, #ARGV, 4 do
  local run, msg, since, seen = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]) or 0, ARGV[i + 3]
  local rk = run_key(run)
  local r = call('HMGET', rk, 'status', 'wft', 'wft_msg', 'wid', 'wtype', 'last_eid',
    'start_ms', 'wft_failures', 'wft_by', 'wft_fence', 'wft_start_ms', 'wft_done', 'wft_seq')
  local mine = r[1] == RS.RUNNING and r[3] == msg
  local again = mine and r[2] == WT.STARTED and r[9] == worker
  if (mine and r[2] == WT.SCHEDULED) or again then
    local fence, started = r[10], tonumber(r[11])
    if not again then
      local n = (tonumber(r[13]) or 0) + 1
      fence = n .. '-' .. NOW_US
      started = NOW
      call('HSET', rk, 'wft', WT.STARTED, 'wft_start_ms', NOW, 'wft_by', worker, 'wft_fence', fence,
        'wft_seq', n)
      call('ZREM', TIMERS, tmember(TK.STICKY_FALLBACK, run, msg))
      call('ZADD', TIMERS, NOW + timeout, tmember(TK.TASK_TIMEOUT, run, fence))
    end
    local last = tonumber(r[6])
    local rec = seen ~= '' and done_record(r[12], seen)
    if since > last or not rec or rec[1] ~= R.OK then since = 0 end
    local events = call('XRANGE', hist_key(r[4], run), (since + 1) .. '-0', '+',
      'COUNT', max_events)
    out[#out + 1] = { R.OK, fence, started, r[4], r[5], last, tonumber(r[7]), events,
      (tonumber(r[8]) or 0) + 1, since }
  elseif mine and r[2] == WT.STARTED then
    out[#out + 1] = { R.BUSY }
  else
    drop_msg(wq, msg)
    out[#out + 1] = { R.STALE }
  end
end
return out
