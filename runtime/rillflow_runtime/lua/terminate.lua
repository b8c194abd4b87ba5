-- Terminate a run (client). ARGV: prefix, workflow_id, run_id ('' = current), body,
-- retention ms. Returns {'ok', run_id} or {'not_running', run_id or ''}.
local wid, run, body, retention = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
run = current_run(wid, run)
if run == '' or redis.call('HGET', run_key(run), 'status') ~= 'running' then
  return { 'not_running', run }
end
close_run(run, 'terminated', 'WorkflowExecutionTerminated', body, retention)
return { 'ok', run }
