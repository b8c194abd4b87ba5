-- Start a run (client). ARGV: prefix, workflow_id, run_id, workflow_type, task_queue,
-- WorkflowExecutionStarted body, execution timeout ms.
-- Returns {'ok', run_id} or {'running', current_run_id} when the id is taken.
local wid, run, wtype, tq, body = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local timeout = tonumber(ARGV[7])
local wk = wf_key(wid)
local cur = redis.call('HMGET', wk, 'run', 'status')
if cur[2] == 'running' then return { 'running', cur[1] } end
redis.call('DEL', wk)
redis.call('HSET', wk, 'run', run, 'status', 'running')
redis.call('HSET', run_key(run), 'wid', wid, 'wtype', wtype, 'tq', tq, 'status', 'running',
  'last_eid', 0, 'start_ms', NOW, 'wft_seq', 0, 'deadline_ms', NOW + timeout)
append(run, wid, 'WorkflowExecutionStarted', body)
schedule_wft(run, tq)
redis.call('ZADD', TIMERS, NOW + timeout, 'X|' .. run)
return { 'ok', run }
