-- Signal a run (client). KEYS: timers, closed, the execution's wf hash, the run's keys,
-- its task queue's shared workflow-task stream and the sticky one of the worker caching
-- it (protocol.py reads them first). ARGV: prefix, workflow_id, run_id
-- ('' = the current run), the WorkflowExecutionSignaled body, a request id ('' = none).
-- A request id the execution saw lately is not delivered twice (see signal_is_new).
-- Returns {R.OK, run_id}, {R.DUPLICATE, run_id}, {R.NOT_RUNNING, run_id or ''} or
-- {R.REROUTE} (another run became current: nothing written, look again).
local wid, run, body, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = client_run(wid, run)
if not run then return { R.REROUTE } end
-- a repeat is answered as delivered even once the run has closed since (a retry, or an
-- outbox entry applied again, must not hear "not running" for a signal that was delivered)
if signal_seen(wid, rid, run) then return { R.DUPLICATE, run } end
if run == '' or call('HGET', run_key(run), 'status') ~= RS.RUNNING then
  return { R.NOT_RUNNING, run }
end
if not signal_is_new(wid, rid) then return { R.DUPLICATE, run } end  -- (its run's own record was read above)
note_messages(run)
deliver(run, EV.WORKFLOW_EXECUTION_SIGNALED, body)
return { R.OK, run }
