-- Send an update to a run (client). ARGV: prefix, workflow_id, run_id ('' = the
-- current run), update id, the WorkflowExecutionUpdateAccepted body. An update id the
-- run already knows is not accepted twice: its caller waits for (or reads) the outcome.
-- Returns {'accepted', run_id}, {'done', run_id, outcome body} or {'not_running', run_id}.
local wid, run, id, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = current_run(wid, run)
if run == '' then return { 'not_running', '' } end
local st = redis.call('HMGET', upd_key(run), id, id .. ':o')
if st[1] == 'done' then return { 'done', run, st[2] } end
if st[1] == 'accepted' then return { 'accepted', run } end
if redis.call('HGET', run_key(run), 'status') ~= 'running' then return { 'not_running', run } end
note_messages(run)
redis.call('HSET', upd_key(run), id, 'accepted')
deliver(run, 'WorkflowExecutionUpdateAccepted', body)
return { 'accepted', run }
