-- Start a batch of workflow tasks (worker). KEYS: timers, closed, the stream read, then
-- each task's run hash and history (the task message names the workflow id).
-- ARGV: prefix, task timeout ms, max events returned, worker identity, then per task:
-- run_id, message id, the last event id the worker's cached instance has applied (0 =
-- none) and the fence of the completion that brought it there ('' = none). The cache is
-- good only if that completion is the last one Redis recorded (wft_done): after a
-- rollback, new events may reuse the ids the cache has seen, and only the fence tells
-- (see start_task). A repeat of this call by the same worker (a client retry) answers
-- the same, with the same fence.
-- Per task returns start_task's {R.OK, fence, now, wid, wtype, last_eid, start_ms,
-- events, attempt, since}, or {R.STALE} (the message was dropped) or {R.BUSY} (started
-- elsewhere, in flight).
local wq, timeout, max_events, worker = KEYS[3], num(ARGV[2], 'timeout', 1), num(ARGV[3], 'max events', 1), ARGV[4]
if (#ARGV - 4) % 4 ~= 0 then error('rillflow: wft_start takes 4 arguments per task') end
for i = 5, #ARGV, 4 do num(ARGV[i + 2], 'since', 0) end
local sticky_stream = string.find(wq, '@', #P + 1, true) ~= nil
local out = {}
for i = 5, #ARGV, 4 do
  local run, msg = ARGV[i], ARGV[i + 1]
  local r = call('HMGET', run_key(run), unpack(TASK_FIELDS))
  local mine = r[1] == RS.RUNNING and r[3] == msg
  local again = mine and r[2] == WT.STARTED and r[9] == worker
  if (mine and r[2] == WT.SCHEDULED) or again then
    -- (a message on a worker's own stream has a timer that would move it elsewhere)
    if not again and sticky_stream then call('ZREM', TIMERS, tmember(TK.STICKY_FALLBACK, run, msg)) end
    out[#out + 1] = start_task(run, r, again, { worker = worker, timeout = timeout, max_events = max_events,
      since = tonumber(ARGV[i + 2]), seen = ARGV[i + 3] })
  elseif mine and r[2] == WT.STARTED then
    out[#out + 1] = { R.BUSY }
  else
    drop_msg(wq, msg)
    out[#out + 1] = { R.STALE }
  end
end
return out
