-- Move what is due in the shard's timers zset (any worker; each due entry is handled
-- once because it is removed in the same script). ARGV: prefix, batch size, retention ms.
-- Members: T|run|seq timer, A|run|seq|att attempt deadline, S|run|seq schedule-to-close,
-- R|run|seq|att retry, X|run execution timeout, W|run|fence task timeout, B|run task retry,
-- K|run|msg a sticky task its worker did not start in time (moved to the shared queue).
-- Returns {handled, next due ms or -1, now ms}.
local limit, retention = tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', TIMERS, '-inf', NOW, 'LIMIT', 0, limit)
for _, m in ipairs(due) do
  redis.call('ZREM', TIMERS, m)
  local parts = {}
  for p in string.gmatch(m, '[^|]+') do parts[#parts + 1] = p end
  local kind, run = parts[1], parts[2]
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'status', 'wid', 'tq', 'wft', 'wft_seq', 'wft_msg', 'wft_q')
  if r[1] == 'running' then
    local wid = r[2]
    if kind == 'T' then
      deliver(run, 'TimerFired', cmsgpack.pack({ seq = tonumber(parts[3]) }))
    elseif kind == 'A' then
      local seq, att = parts[3], tonumber(parts[4])
      local s = act_get(run, seq)
      if s and s.att == att and s.st == 'started' then
        local which = 'start_to_close'
        if s.s2c > 0 and NOW >= s.sched + s.s2c then which = 'schedule_to_close'
        elseif s.hbt > 0 and s.dl < s.started + s.stc then which = 'heartbeat' end
        drop_msg(queue_key(s.tq, 'act'), s.msg)
        act_retry_or_fail(run, wid, seq, s, timeout_failure(seq, att, which), false,
          'ActivityTaskTimedOut')
      end
    elseif kind == 'S' then
      local seq = parts[3]
      local s = act_get(run, seq)
      if s then
        drop_msg(queue_key(s.tq, 'act'), s.msg)
        act_forget(run, seq, s)
        deliver(run, 'ActivityTaskTimedOut', timeout_failure(seq, s.att, 'schedule_to_close'))
      end
    elseif kind == 'R' then
      local seq, att = parts[3], tonumber(parts[4])
      local s = act_get(run, seq)
      if s and s.att == att and s.st == 'backoff' then act_dispatch(run, seq, s) end
    elseif kind == 'X' then
      close_run(run, 'timed_out', 'WorkflowExecutionTimedOut',
        cmsgpack.pack({ reason = 'execution timeout' }), retention)
    elseif kind == 'W' then
      if r[4] == 'started' and tonumber(r[5]) == tonumber(parts[3]) then
        drop_msg(r[7], r[6])
        redis.call('HSET', rk, 'sticky', '')
        append(run, wid, 'WorkflowTaskTimedOut', cmsgpack.pack({ fence = tonumber(parts[3]) }))
        flush_buffer(run, wid)
        schedule_wft(run, r[3])
      end
    elseif kind == 'K' then
      if r[4] == 'scheduled' and r[6] == parts[3] then
        drop_msg(r[7], r[6])
        -- a stream without a group is a departed worker's, recreated by this XADD
        if redis.call('EXISTS', r[7]) == 1 and redis.call('XLEN', r[7]) == 0
            and #redis.call('XINFO', 'GROUPS', r[7]) == 0 then
          redis.call('DEL', r[7])
        end
        redis.call('HSET', rk, 'sticky', '')
        schedule_wft(run, r[3])
      end
    elseif kind == 'B' then
      if r[4] == 'backoff' then schedule_wft(run, r[3]) end
    end
  end
end
local nxt = redis.call('ZRANGE', TIMERS, 0, 0, 'WITHSCORES')
return { #due, nxt[2] and tonumber(nxt[2]) or -1, NOW }
