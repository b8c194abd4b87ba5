-- Record a heartbeat (worker): keep the details for the next attempt and move the
-- attempt's deadline. ARGV: prefix, run_id, seq, attempt, details.
-- Returns 'ok', or 'gone' when the attempt is no longer current (cancelled, timed out).
local run, seq, att, details = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if redis.call('HGET', run_key(run), 'status') ~= 'running' then return 'gone' end
local s = act_get(run, seq)
if not s or s.att ~= att or s.st ~= 'started' then return 'gone' end
redis.call('HSET', act_key(run), seq .. ':hb', details)
s.dl = act_deadline(s)
act_put(run, seq, s)
redis.call('ZADD', TIMERS, s.dl, 'A|' .. run .. '|' .. seq .. '|' .. att)
return 'ok'
