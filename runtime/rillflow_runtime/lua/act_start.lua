-- Start a batch of activity tasks (worker). ARGV: prefix, task_queue, worker identity,
-- then per task: run_id, seq, attempt, message id. A repeat of this call by the same worker
-- (a client retry after a dropped connection) answers the same. Per task returns
-- {'ok', scheduled body, heartbeat details, wid, wtype, now, deadline} or {'stale'} or {'running'}.
local aq, worker = queue_key(ARGV[2], 'act'), ARGV[3]
local out = {}
for i = 4, #ARGV, 4 do
  local run, seq, att, msg = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local r = redis.call('HMGET', run_key(run), 'status', 'wid', 'wtype')
  local s = (r[1] == 'running') and act_get(run, seq) or nil
  local again = s and s.att == att and s.msg == msg and s.st == 'started' and s.by == worker
  if s and s.att == att and s.msg == msg and (s.st == 'scheduled' or again) then
    if not again then
      s.st = 'started'
      s.started = NOW
      s.by = worker
      s.dl = act_deadline(s)
      act_put(run, seq, s)
      redis.call('ZADD', TIMERS, s.dl, 'A|' .. run .. '|' .. seq .. '|' .. att)
    end
    local ak = act_key(run)
    out[#out + 1] = { 'ok', redis.call('HGET', ak, seq .. ':b'),
      redis.call('HGET', ak, seq .. ':hb') or '', r[2], r[3], NOW, s.dl }
  elseif s and s.att == att and s.msg == msg and s.st == 'started' then
    out[#out + 1] = { 'running' }
  else
    drop_msg(aq, msg)
    out[#out + 1] = { 'stale' }
  end
end
return out
