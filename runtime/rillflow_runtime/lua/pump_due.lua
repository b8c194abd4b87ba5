-- What is due in the shard's timers zset: the first step of a pump (any worker). When
-- something is due, the caller takes the shard's pump lease (or is told another worker
-- holds it), then reads the state of the runs the members name, to declare every key the
-- pump script may touch for them; the pump script releases the lease. KEYS: timers,
-- closed, the pump lease. ARGV: prefix, batch size, the worker's identity, the lease's
-- life in ms (what a pump that died holds it for).
-- Returns {now ms, next due ms, due member...}: the next due is of what is not due yet
-- (-1: nothing), or, while another worker holds the lease, when the lease runs out (and
-- no member is returned).
local limit, worker, lease_ms = num(ARGV[2], 'batch size', 1), ARGV[3], num(ARGV[4], 'lease ms', 1)
local due = call('ZRANGEBYSCORE', TIMERS, '-inf', NOW, 'LIMIT', 0, limit)
local nxt = call('ZRANGEBYSCORE', TIMERS, '(' .. NOW, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local next_due = nxt[2] and tonumber(nxt[2]) or -1
if #due == 0 then return { NOW, next_due } end
local holder = call('GET', KEYS[3])
if holder and holder ~= worker then
  return { NOW, NOW + math.max(1, call('PTTL', KEYS[3])) }
end
call('SET', KEYS[3], worker, 'PX', lease_ms)
local out = { NOW, next_due }
for _, m in ipairs(due) do out[#out + 1] = m end
return out
