-- Fail a workflow task (worker): a bug or non-determinism in workflow code. The first
-- failure of a streak is recorded as WorkflowTaskFailed; every failure is kept for
-- describe; the task is retried after a backoff (1 s doubling, capped at 60 s).
-- KEYS: timers, closed, the stream the tasks came from, then each run's hash, history
-- and buffer. ARGV: prefix, then per task: run_id, fence, message id, failure body.
-- Per task returns R.OK, or R.REFUSED when the fence is no longer current (the message
-- is dropped then, unless it is still the run's task). A repeat (client retry) of a
-- failure already recorded answers R.OK.
if (#ARGV - 1) % 4 ~= 0 then error('rillflow: wft_fail takes 4 arguments per task') end
local out = {}
for i = 2, #ARGV, 4 do
  local run, fence, msg, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local rk = run_key(run)
  local r = call('HMGET', rk, 'status', 'wft', 'wft_fence', 'wid', 'wft_msg', 'wft_q', 'wft_done')
  if done_record(r[7], fence) then
    out[#out + 1] = R.OK
  elseif r[1] ~= RS.RUNNING or r[2] ~= WT.STARTED or r[3] ~= fence then
    if not (r[1] == RS.RUNNING and r[5] == msg) then drop_msg(KEYS[3], msg) end
    out[#out + 1] = R.REFUSED
  else
    call('ZREM', TIMERS, tmember(TK.TASK_TIMEOUT, run, fence))
    call('HSET', rk, 'wft_done', fence .. '|' .. R.OK .. '|0')
    drop_msg(r[6], r[5], run)
    wft_backoff(run, r[4], EV.WORKFLOW_TASK_FAILED, body, false)
    out[#out + 1] = R.OK
  end
end
return out
