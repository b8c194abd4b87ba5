-- Ask a run to cancel (client): a WorkflowExecutionCancelRequested event, which the
-- workflow's next task raises as asyncio.CancelledError at the code's current await
-- point (it may clean up and end as canceled, or complete). KEYS: timers, closed, the
-- execution's wf hash, the run's keys, its task queue's shared workflow-task stream and
-- the sticky one of the worker caching it (protocol.py reads them first). ARGV: prefix,
-- workflow_id, run_id ('' = the current run), the event's body, a request id. A run is
-- asked once: a later request (a retry, or another caller) answers R.DUPLICATE.
-- Returns {R.OK, run_id}, {R.DUPLICATE, run_id}, {R.NOT_RUNNING, run_id or ''} or
-- {R.REROUTE} (another run became current: nothing written, look again).
local wid, run, body, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = client_run(wid, run)
if not run then return { R.REROUTE } end
if run == '' then return { R.NOT_RUNNING, '' } end
local r = call('HMGET', run_key(run), 'status', 'cancel_req')
if r[1] ~= RS.RUNNING then return { R.NOT_RUNNING, run } end
if r[2] then return { R.DUPLICATE, run } end
call('HSET', run_key(run), 'cancel_req', rid)
deliver(run, EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED, body)
return { R.OK, run }
