-- Start a run (client). KEYS: timers, closed, the execution's wf hash, the run's hash and
-- history, the task queue's workflow-task stream, the execution's signal ids. ARGV: prefix, workflow_id, run_id,
-- workflow_type, task_queue, WorkflowExecutionStarted body, execution timeout ms.
-- The run id is the request's identity: a repeat of this call (a client retry) finds
-- the run it created and answers the same, whatever became of it since.
-- Returns {R.OK, run_id}, {R.RUNNING, current_run_id} when the id is taken, or
-- {R.INVALID, why} (nothing written).
local wid, run, wtype, tq, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local timeout = tonumber(ARGV[7])
local why = start_invalid(wid, run, wtype, tq, timeout)
if why then return { R.INVALID, why } end
local cur = call('HMGET', wf_key(wid), 'run', 'status')
if cur[1] == run then return { R.OK, run } end  -- a repeat
if call('EXISTS', run_key(run)) == 1 then  -- a repeat after another run took the id, or a stray run id
  if call('HGET', run_key(run), 'wid') ~= wid then return { R.INVALID, 'run id already used' } end
  return { R.OK, run }
end
if cur[2] == RS.RUNNING then return { R.RUNNING, cur[1] } end
-- checked: nothing below can fail
create_run(wid, run, wtype, tq, body, timeout, cur[1] or cur[2], true)
return { R.OK, run }
