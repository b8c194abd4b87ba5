-- Send an update to a run (client). KEYS: as signal's. ARGV: prefix, workflow_id,
-- run_id ('' = the current run), update id, the WorkflowExecutionUpdateAccepted body,
-- and what an update with a validator expects ('' = nothing): '=<fence>' accepts it only
-- while the run's last completed workflow task is still the one (wtc) whose state its
-- validator accepted it in, every message the run got has been seen by a completed task
-- (`unseen` unset) and no task is running; '!' only answers for an id known already.
-- An update id the run already knows is not accepted twice: its caller waits for (or
-- reads) the outcome. Returns {R.ACCEPTED, run_id}, {R.DONE, run_id, outcome body},
-- {R.NOT_RUNNING, run_id}, {R.STALE, run_id} (not what it expects: nothing written) or
-- {R.REROUTE} (look again).
local wid, run, id, body, expect = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] or ''
run = client_run(wid, run)
if not run then return { R.REROUTE } end
if run == '' then return { R.NOT_RUNNING, '' } end
local st = call('HMGET', upd_key(run), id, id .. ':o')
if st[1] == R.DONE then return { R.DONE, run, st[2] } end
if st[1] == R.ACCEPTED then return { R.ACCEPTED, run } end
local rs = call('HMGET', run_key(run), 'status', 'wtc', 'unseen', 'wft')
if rs[1] ~= RS.RUNNING then return { R.NOT_RUNNING, run } end
-- The state the validator ran on must be the run's: not before any task completed (the
-- entrypoint's first step has not run), not with a message no completed task has seen
-- (`unseen`), not while a task runs (it changes the state before the update applies).
if expect ~= '' and (expect == '!' or expect == '=' or expect ~= '=' .. (rs[2] or '') or rs[3]
    or rs[4] == WT.STARTED) then
  return { R.STALE, run }
end
note_messages(run)
call('HSET', upd_key(run), id, R.ACCEPTED)
deliver(run, EV.WORKFLOW_EXECUTION_UPDATE_ACCEPTED, body)
return { R.ACCEPTED, run }
