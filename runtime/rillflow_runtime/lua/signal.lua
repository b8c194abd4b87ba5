-- Signal a run (client). ARGV: prefix, workflow_id, run_id ('' = the current run), the
-- WorkflowExecutionSignaled body, a request id ('' = none). A request id already seen
-- by this run is not delivered twice, so a client may retry a signal it is unsure of.
-- Returns {'ok', run_id}, {'duplicate', run_id} or {'not_running', run_id or ''}.
local wid, run, body, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = current_run(wid, run)
if run == '' or redis.call('HGET', run_key(run), 'status') ~= 'running' then
  return { 'not_running', run }
end
if rid ~= '' and redis.call('SADD', sig_key(run), rid) == 0 then
  return { 'duplicate', run }
end
note_messages(run)
deliver(run, 'WorkflowExecutionSignaled', body)
return { 'ok', run }
