-- Signal a run (client). KEYS: timers, closed, the execution's wf hash, the run's keys,
-- its task queue's shared workflow-task stream and the sticky one of the worker caching
-- it (protocol.py reads them first). ARGV: prefix, workflow_id, run_id
-- ('' = the current run), the WorkflowExecutionSignaled body, a request id ('' = none).
-- A request id this run saw within the last hour (and among its last 10,000) is not
-- delivered twice, so a client may retry a signal it is unsure of; older ids are
-- forgotten, so the record does not grow with every signal.
-- Returns {R.OK, run_id}, {R.DUPLICATE, run_id}, {R.NOT_RUNNING, run_id or ''} or
-- {R.REROUTE} (another run became current: nothing written, look again).
local wid, run, body, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = client_run(wid, run)
if not run then return { R.REROUTE } end
if run == '' or call('HGET', run_key(run), 'status') ~= RS.RUNNING then
  return { R.NOT_RUNNING, run }
end
if rid ~= '' then
  local sk = sig_key(run)
  if call('ZADD', sk, 'NX', NOW, rid) == 0 then return { R.DUPLICATE, run } end
  call('ZREMRANGEBYSCORE', sk, '-inf', NOW - 3600000)
  call('ZREMRANGEBYRANK', sk, 0, -10001)
end
note_messages(run)
deliver(run, EV.WORKFLOW_EXECUTION_SIGNALED, body)
return { R.OK, run }
