-- Fail a workflow task (worker): a bug or non-determinism in workflow code. The first
-- failure of a streak is recorded as WorkflowTaskFailed; every failure is kept for
-- describe; the task is retried after a backoff (1 s doubling, capped at 60 s).
-- ARGV: prefix, task_queue (unused, kept for the call's shape), run_id, fence, failure body. Returns 'ok' or 'refused'.
local run, fence, body = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local rk = run_key(run)
local r = redis.call('HMGET', rk, 'status', 'wft', 'wft_seq', 'wid', 'wft_msg', 'wft_q')
if r[1] ~= 'running' or r[2] ~= 'started' or tonumber(r[3]) ~= fence then return 'refused' end
redis.call('ZREM', TIMERS, 'W|' .. run .. '|' .. fence)
local n = redis.call('HINCRBY', rk, 'wft_failures', 1)
if n == 1 then append(run, r[4], 'WorkflowTaskFailed', body) end
redis.call('HSET', rk, 'wft_failure', body, 'wft', 'backoff', 'wft_msg', '', 'sticky', '')
drop_msg(r[6], r[5])
flush_buffer(run, r[4])
local delay = 1000 * (2 ^ (n - 1))
if delay > 60000 then delay = 60000 end
redis.call('ZADD', TIMERS, NOW + delay, 'B|' .. run)
return 'ok'
