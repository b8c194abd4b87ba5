-- Ask the workers of a run's task queue for a query (client). ARGV: prefix,
-- workflow_id, run_id ('' = the current run), the query body, the reply list key.
-- A query of a closed run is answered too, from its history, while it is retained.
-- Returns {'ok', run_id, task_queue, stream, message id} or {'not_found', ''}.
local wid, run, body, reply = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
run = current_run(wid, run)
local r = run ~= '' and redis.call('HMGET', run_key(run), 'tq', 'wtype') or { false, false }
if not r[1] then return { 'not_found', '' } end
local q = queue_key(r[1], 'qry')
local id = redis.call('XADD', q, '*', 'run', run, 'wid', wid, 'wtype', r[2], 'reply', reply, 'd', body)
return { 'ok', run, r[1], q, id }
