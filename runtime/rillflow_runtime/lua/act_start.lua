-- Start a batch of activity tasks (worker). KEYS: timers, closed, the activity stream,
-- then each task's run hash and act hash.
-- ARGV: prefix, worker identity, then per task: run_id, seq, attempt, message id. A
-- repeat of this call by the same worker (a client retry) answers the same.
-- Per task returns {R.OK, scheduled body, heartbeat details, wid, wtype, now, deadline,
-- the run's task queue, the worker caching it ('' = none)} (the worker declares the last
-- two's streams when it reports the outcome)
-- or {R.STALE} (dropped) or {R.RUNNING} (another worker runs it).
local aq, worker = KEYS[3], ARGV[2]
if (#ARGV - 2) % 4 ~= 0 then error('rillflow: act_start takes 4 arguments per task') end
for i = 3, #ARGV, 4 do num(ARGV[i + 2], 'attempt', 1) end
local out = {}
for i = 3, #ARGV, 4 do
  local run, seq, att, msg = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local r = call('HMGET', run_key(run), 'status', 'wid', 'wtype', 'tq', 'sticky')
  local ak = act_key(run)
  local a = r[1] == RS.RUNNING and call('HMGET', ak, seq, seq .. ':b', seq .. ':hb') or {}
  local s = a[1] and cmsgpack.unpack(a[1]) or nil
  local mine = s and s.att == att and s.msg == msg
  local again = mine and s.st == AS.STARTED and s.by == worker
  if mine and (s.st == AS.SCHEDULED or again) then
    if not again then
      s.st = AS.STARTED
      s.started = NOW
      s.by = worker
      s.dl = act_deadline(s)
      act_put(run, seq, s)
      call('ZADD', TIMERS, s.dl, tmember(TK.ACTIVITY_DEADLINE, run, seq, att))
    end
    out[#out + 1] = { R.OK, a[2], a[3] or '', r[2], r[3], NOW, s.dl, r[4], r[5] or '' }
  elseif mine and s.st == AS.STARTED then
    out[#out + 1] = { R.RUNNING }
  else
    drop_msg(aq, msg)
    out[#out + 1] = { R.STALE }
  end
end
return out
