-- Fail a workflow task (worker): a bug or non-determinism in workflow code. The first
-- failure of a streak is recorded as WorkflowTaskFailed; every failure is kept for
-- describe; the task is retried after a backoff (1 s doubling, capped at 60 s).
-- KEYS: timers, closed. ARGV: prefix, then per task: run_id, fence, failure body.
-- Per task returns R.OK, or R.REFUSED when the fence is no longer current. A repeat
-- (client retry) of a failure already recorded answers R.OK.
if (#ARGV - 1) % 3 ~= 0 then error('rillflow: wft_fail takes 3 arguments per task') end
local out = {}
for i = 2, #ARGV, 3 do
  local run, fence, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'status', 'wft', 'wft_fence', 'wid', 'wft_msg', 'wft_q', 'wft_done')
  if done_record(r[7], fence) then
    out[#out + 1] = R.OK
  elseif r[1] ~= RS.RUNNING or r[2] ~= WT.STARTED or r[3] ~= fence then
    out[#out + 1] = R.REFUSED
  else
    redis.call('ZREM', TIMERS, tmember(TK.TASK_TIMEOUT, run, fence))
    redis.call('HSET', rk, 'wft_done', fence .. '|' .. R.OK .. '|0')
    drop_msg(r[6], r[5])
    wft_backoff(run, r[4], EV.WORKFLOW_TASK_FAILED, body, false)
    out[#out + 1] = R.OK
  end
end
return out
