-- Terminate a run (client). KEYS: timers, closed, the execution's wf hash, the run's keys
-- (protocol.py reads which run is current first). ARGV: prefix, workflow_id, run_id
-- ('' = current), body, retention ms, request id. A repeat of the call that terminated
-- the run answers R.OK again. Returns {R.OK, run_id}, {R.NOT_RUNNING, run_id or ''}
-- or {R.REROUTE} (another run became current: nothing written, look again).
local wid, run, body, retention, rid = ARGV[2], ARGV[3], ARGV[4], num(ARGV[5], 'retention', 1), ARGV[6]
run = client_run(wid, run)
if not run then return { R.REROUTE } end
if run == '' then return { R.NOT_RUNNING, '' } end
local r = call('HMGET', run_key(run), 'status', 'term_req')
if r[1] == RS.TERMINATED and rid ~= '' and r[2] == rid then return { R.OK, run } end
if r[1] ~= RS.RUNNING then return { R.NOT_RUNNING, run } end
call('HSET', run_key(run), 'term_req', rid)
close_run(run, RS.TERMINATED, EV.WORKFLOW_EXECUTION_TERMINATED, body, retention)
return { R.OK, run }
