-- Start a run (client). KEYS: timers, closed, the execution's wf hash, the run's hash and
-- history, the task queue's workflow-task stream. ARGV: prefix, workflow_id, run_id,
-- workflow_type, task_queue, WorkflowExecutionStarted body, execution timeout ms.
-- The run id is the request's identity: a repeat of this call (a client retry) finds
-- the run it created and answers the same, whatever became of it since.
-- Returns {R.OK, run_id}, {R.RUNNING, current_run_id} when the id is taken, or
-- {R.INVALID, why} (nothing written).
local wid, run, wtype, tq, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local timeout = tonumber(ARGV[7])
if not timeout or timeout <= 0 then return { R.INVALID, 'execution timeout must be a positive number of ms' } end
if wid == '' or run == '' or wtype == '' or tq == '' then return { R.INVALID, 'empty id, type or queue' } end
local rk, wk = run_key(run), wf_key(wid)
local cur = call('HMGET', wk, 'run', 'status')
if cur[1] == run then return { R.OK, run } end  -- a repeat
if call('EXISTS', rk) == 1 then  -- a repeat after another run took the id, or a stray run id
  if call('HGET', rk, 'wid') ~= wid then return { R.INVALID, 'run id already used' } end
  return { R.OK, run }
end
if cur[2] == RS.RUNNING then return { R.RUNNING, cur[1] } end
-- checked: nothing below can fail
if cur[1] then call('DEL', wk) end  -- (an earlier run's bookkeeping)
call('HSET', wk, 'run', run, 'status', RS.RUNNING)
knew(run, 0, 0)
append(run, wid, EV.WORKFLOW_EXECUTION_STARTED, body)
-- its first workflow task (a new run has no worker caching it: the shared stream); a
-- small start event travels with it, so a worker can run the task at once and record
-- its start and completion in one call (a speculative task: see wft_complete)
local q = queue_key(tq, 'wft')
local msg
if #body <= INLINE_BYTES then
  msg = call('XADD', q, '*', 'run', run, 'wid', wid, 'wtype', wtype, 't', NOW, 'ev', body)
else
  msg = call('XADD', q, '*', 'run', run, 'wid', wid)
end
hset_run(run, 'wid', wid, 'wtype', wtype, 'tq', tq, 'status', RS.RUNNING, 'start_ms', NOW, 'wft_seq', 0,
  'deadline_ms', NOW + timeout, 'wft', WT.SCHEDULED, 'wft_msg', msg, 'wft_q', q)
call('ZADD', TIMERS, NOW + timeout, tmember(TK.EXECUTION_TIMEOUT, run))
return { R.OK, run }
