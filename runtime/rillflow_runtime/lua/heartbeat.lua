-- Record a heartbeat (worker): keep the details for the next attempt and move the
-- attempt's deadline. KEYS: timers, closed, the run's hash and act hash. ARGV: prefix,
-- run_id, seq, attempt, details.
-- Returns {R.OK, now ms, new deadline ms}, or {R.GONE} when the attempt is no longer
-- current (cancelled, timed out, the run closed).
local run, seq, att, details = ARGV[2], ARGV[3], num(ARGV[4], 'attempt', 1), ARGV[5]
if call('HGET', run_key(run), 'status') ~= RS.RUNNING then return { R.GONE } end
local s = act_get(run, seq)
if not s or s.att ~= att or s.st ~= AS.STARTED then return { R.GONE } end
call('HSET', act_key(run), seq .. ':hb', details)
s.dl = act_deadline(s)
act_put(run, seq, s)
call('ZADD', TIMERS, s.dl, tmember(TK.ACTIVITY_DEADLINE, run, seq, att))
return { R.OK, NOW, s.dl }
