-- Send an update to a run (client). KEYS: as signal's. ARGV: prefix, workflow_id,
-- run_id ('' = the current run), update id, the WorkflowExecutionUpdateAccepted body.
-- An update id the run already knows is not accepted twice: its caller waits for (or
-- reads) the outcome. Returns {R.ACCEPTED, run_id}, {R.DONE, run_id, outcome body} or
-- {R.NOT_RUNNING, run_id}, or {R.REROUTE} (look again).
local wid, run, id, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = client_run(wid, run)
if not run then return { R.REROUTE } end
if run == '' then return { R.NOT_RUNNING, '' } end
local st = call('HMGET', upd_key(run), id, id .. ':o')
if st[1] == R.DONE then return { R.DONE, run, st[2] } end
if st[1] == R.ACCEPTED then return { R.ACCEPTED, run } end
if call('HGET', run_key(run), 'status') ~= RS.RUNNING then return { R.NOT_RUNNING, run } end
note_messages(run)
call('HSET', upd_key(run), id, R.ACCEPTED)
deliver(run, EV.WORKFLOW_EXECUTION_UPDATE_ACCEPTED, body)
return { R.ACCEPTED, run }
