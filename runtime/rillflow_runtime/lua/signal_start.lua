-- Signal an execution, starting it first if no run of it is running (client): one call,
-- so that the signal is never lost between a start and a signal, nor a second run
-- started by two callers at once. KEYS: timers, closed, the execution's wf hash, the
-- keys of its current run as signal takes them (protocol.py reads them first), then the
-- new run's keys and its task queue's workflow-task stream. ARGV: prefix, workflow_id,
-- the new run's id, workflow_type, task_queue, WorkflowExecutionStarted body, execution
-- timeout ms (as for start), the WorkflowExecutionSignaled body and a request id.
-- The request id makes a repeat (a client retry) deliver nothing twice: to a running
-- run, as for signal; the run this call started records it as its first signal's, and
-- a repeat finds that run (its id is the call's) and answers the same.
-- Returns {R.OK, run_id, '1' if this call started it else '0'}, {R.DUPLICATE, run_id,
-- '0' or '1'} (delivered before), {R.REROUTE} (another run became current since the
-- caller looked: nothing written, look again) or {R.INVALID, why} (nothing written).
local wid, run, wtype, tq, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local timeout, sbody, rid = tonumber(ARGV[7]), ARGV[8], ARGV[9]
local why = start_invalid(wid, run, wtype, tq, timeout) or (rid == '' and 'empty request id') or nil
if why then return { R.INVALID, why } end
if call('EXISTS', run_key(run)) == 1 then  -- a repeat: this call's run exists
  if call('HGET', run_key(run), 'wid') ~= wid then return { R.INVALID, 'run id already used' } end
  return { R.DUPLICATE, run, '1' }
end
local cur = call('HMGET', wf_key(wid), 'run', 'status')
if cur[2] == RS.RUNNING then
  local target = cur[1]
  if not DECLARED[run_key(target)] then return { R.REROUTE } end
  local running = call('HGET', run_key(target), 'wtype')
  if running ~= wtype then  -- its input and signal were checked against another workflow
    return { R.INVALID, 'execution ' .. wid .. ' is running workflow ' .. tostring(running) .. ', not ' .. wtype }
  end
  if not signal_is_new(wid, rid, target) then return { R.DUPLICATE, target, '0' } end
  note_messages(target)
  deliver(target, EV.WORKFLOW_EXECUTION_SIGNALED, sbody)
  return { R.OK, target, '0' }
end
-- delivered already, to a run that has closed since: nothing is started for it again
if not signal_is_new(wid, rid) then return { R.DUPLICATE, cur[1] or '', '0' } end
-- checked: nothing below can fail
create_run(wid, run, wtype, tq, body, timeout, cur[1] or cur[2], false)
note_messages(run)
deliver(run, EV.WORKFLOW_EXECUTION_SIGNALED, sbody)
return { R.OK, run, '1' }
