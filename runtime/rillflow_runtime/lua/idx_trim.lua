-- Forget, in the shard's listing indexes, the closed runs whose keys have expired (their
-- retention passed: idx:exp says when), at most ARGV[2] of them (worker maintenance).
-- KEYS: timers, closed, the outbox, then the indexes (declared by every call). ARGV:
-- prefix, batch size. Returns how many were forgotten (the batch size: call again).
local limit = num(ARGV[2], 'batch size', 1)
local gone = call('ZRANGEBYSCORE', idx_key('exp'), '-inf', NOW, 'LIMIT', 0, limit)
for i = 1, #gone, 500 do
  local part = { unpack(gone, i, math.min(i + 499, #gone)) }
  call('ZREM', idx_key('start'), unpack(part))
  call('ZREM', idx_key('exp'), unpack(part))
end
return #gone
