-- Keep the shard's listing indexes true (worker maintenance, every few seconds): forget
-- the closed runs whose keys have expired (their retention passed: idx:exp says when),
-- at most ARGV[2] of them; then check the runs the caller read at the two sweep cursors
-- (idx:sweep: where in idx:open and idx:start the last check stopped) against their run
-- hashes: a run no longer running leaves idx:open (and goes into idx:exp, when it closed
-- plus the retention, unless it is there), a run whose hash is gone leaves all three.
-- What the sweep finds is what a worker of an earlier release left when it closed a run
-- it never indexed, or a start it indexed (a rolling upgrade). KEYS: timers, closed,
-- the outbox, the indexes, idx:sweep, then the run hash of each run named. ARGV:
-- prefix, batch size, retention ms, the open cursor the caller read, how many runs it
-- read there (the sweep size), then those runs, then the same for idx:start.
-- Returns how many expired runs were forgotten (the batch size: call again).
local limit, retention = num(ARGV[2], 'batch size', 1), num(ARGV[3], 'retention', 1)
local sweeps, i = {}, 4  -- (every argument checked before the first write)
for _, index in ipairs({ 'open', 'start' }) do
  local n = num(ARGV[i + 2], 'runs', 0)
  sweeps[#sweeps + 1] = { index = index, at = num(ARGV[i], 'cursor', 0), size = num(ARGV[i + 1], 'sweep size', 0),
    first = i + 3, n = n }
  i = i + 3 + n
end
local gone = call('ZRANGEBYSCORE', idx_key('exp'), '-inf', NOW, 'LIMIT', 0, limit)
for i = 1, #gone, 500 do
  local part = { unpack(gone, i, math.min(i + 499, #gone)) }
  call('ZREM', idx_key('start'), unpack(part))
  call('ZREM', idx_key('exp'), unpack(part))
end
for _, sw in ipairs(sweeps) do
  local index, at, size, n = sw.index, sw.at, sw.size, sw.n
  local left = 0
  for k = sw.first, sw.first + n - 1 do
    local run = ARGV[k]
    local r = DECLARED[run_key(run)] and call('HMGET', run_key(run), 'status', 'closed_ms')
    if r and not r[1] then
      call('ZREM', idx_key('open'), run)
      call('ZREM', idx_key('start'), run)
      call('ZREM', idx_key('exp'), run)
      left = left + 1
    elseif r and index == 'open' and r[1] ~= RS.RUNNING then
      call('ZREM', idx_key('open'), run)
      call('ZADD', idx_key('exp'), 'NX', (tonumber(r[2]) or NOW) + retention, run)
      left = left + 1
    end
  end
  -- (what left moved the rest down: the next check starts that much earlier)
  local nxt = n < size and 0 or at + n - left
  if nxt ~= at then call('HSET', idx_key('sweep'), index, nxt) end
end
return #gone
