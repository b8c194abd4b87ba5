-- Ask the workers of a run's task queue for a query (client). KEYS: timers, closed, the
-- execution's wf hash, the run's keys and its task queue's query stream.
-- ARGV: prefix, workflow_id, run_id ('' = the current run), the query body, the
-- caller's reply stream, the request id, the caller's deadline (ms, Redis clock offset:
-- ms from now). A query of a closed run is answered too, from its history, while it is
-- retained. Queries older than 10 minutes are trimmed from the stream, so a caller
-- that died leaves nothing behind for long.
-- Returns {R.OK, run_id, task_queue, stream, message id}, {R.NOT_FOUND, ''} or {R.REROUTE}.
local wid, run, body, reply, rid, wait = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
run = client_run(wid, run)
if not run then return { R.REROUTE } end
local r = run ~= '' and call('HMGET', run_key(run), 'tq', 'wtype') or { false, false }
if not r[1] then return { R.NOT_FOUND, '' } end
local q = queue_key(r[1], 'qry')
if not DECLARED[q] then return { R.REROUTE } end
local id = call('XADD', q, 'MINID', '~', NOW - 600000, '*', 'run', run, 'wid', wid, 'wtype', r[2],
  'reply', reply, 'rid', rid, 'until', NOW + (wait or 0), 'd', body)
return { R.OK, run, r[1], q, id }
