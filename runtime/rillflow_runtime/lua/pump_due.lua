-- What is due in the shard's timers zset (any worker), read-only: the first step of a
-- pump. protocol.py then reads the state of the runs these members name, to declare
-- every key the pump script may touch for them. KEYS: timers, closed. ARGV: prefix,
-- batch size. Returns {now ms, next due ms of what is not due yet (-1: nothing), due
-- member...}.
local limit = num(ARGV[2], 'batch size', 1)
local due = call('ZRANGEBYSCORE', TIMERS, '-inf', NOW, 'LIMIT', 0, limit)
local nxt = call('ZRANGEBYSCORE', TIMERS, '(' .. NOW, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local out = { NOW, nxt[2] and tonumber(nxt[2]) or -1 }
for _, m in ipairs(due) do out[#out + 1] = m end
return out
