-- Signal a run (client). KEYS: timers, closed. ARGV: prefix, workflow_id, run_id
-- ('' = the current run), the WorkflowExecutionSignaled body, a request id ('' = none).
-- A request id this run saw within the last hour (and among its last 10,000) is not
-- delivered twice, so a client may retry a signal it is unsure of; older ids are
-- forgotten, so the record does not grow with every signal.
-- Returns {R.OK, run_id}, {R.DUPLICATE, run_id} or {R.NOT_RUNNING, run_id or ''}.
local wid, run, body, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = current_run(wid, run)
if run == '' or redis.call('HGET', run_key(run), 'status') ~= RS.RUNNING then
  return { R.NOT_RUNNING, run }
end
if rid ~= '' then
  local sk = sig_key(run)
  if redis.call('ZADD', sk, 'NX', NOW, rid) == 0 then return { R.DUPLICATE, run } end
  redis.call('ZREMRANGEBYSCORE', sk, '-inf', NOW - 3600000)
  redis.call('ZREMRANGEBYRANK', sk, 0, -10001)
end
note_messages(run)
deliver(run, EV.WORKFLOW_EXECUTION_SIGNALED, body)
return { R.OK, run }
