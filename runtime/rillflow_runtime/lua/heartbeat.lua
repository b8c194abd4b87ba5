-- Record a heartbeat (worker): keep the details for the next attempt and move the
-- attempt's deadline. ARGV: prefix, run_id, seq, attempt, details.
-- Returns 'ok', or 'gone' when the attempt is no longer current (cancelled, timed out).
local run, seq, att, details = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if redis.call('HGET', run_key(run), 'status') ~= 'running' then return 'gone' end
local s = act_get(run, seq)
if not s or s.att ~= att or s.st ~= 'started' then return 'gone' end
redis.call('HSET', act_key(run), seq .. ':hb', details)
local dl = s.started + s.stc
if s.hbt > 0 and NOW + s.hbt < dl then dl = NOW + s.hbt end
if s.s2c > 0 and s.sched + s.s2c < dl then dl = s.sched + s.s2c end
s.dl = dl
act_put(run, seq, s)
redis.call('ZADD', TIMERS, dl, 'A|' .. run .. '|' .. seq .. '|' .. att)
return 'ok'
