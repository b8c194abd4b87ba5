-- Move what is due in the shard's timers zset (any worker; each due entry is handled
-- once because it is removed in the same script). KEYS: timers, closed. ARGV: prefix,
-- batch size, retention ms. Members are "<kind>|<run>|..." with the kinds of TK (see
-- model.py and docs/keyspace.md). Returns {handled, next due ms or -1, now ms}.
local limit, retention = num(ARGV[2], 'batch size', 1), num(ARGV[3], 'retention', 1)
local due = redis.call('ZRANGEBYSCORE', TIMERS, '-inf', NOW, 'LIMIT', 0, limit)
for _, m in ipairs(due) do
  redis.call('ZREM', TIMERS, m)
  local parts = split(m, '|')
  local kind, run = parts[1], parts[2]
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'status', 'wid', 'tq', 'wft', 'wft_fence', 'wft_msg', 'wft_q')
  if r[1] == RS.RUNNING then
    local wid = r[2]
    if kind == TK.USER_TIMER then
      redis.call('HDEL', act_key(run), 'timer:' .. parts[3])
      deliver(run, EV.TIMER_FIRED, cmsgpack.pack({ seq = tonumber(parts[3]) }))
    elseif kind == TK.ACTIVITY_DEADLINE then
      local seq, att = parts[3], tonumber(parts[4])
      local s = act_get(run, seq)
      if s and s.att == att and s.st == AS.STARTED then
        local which = 'start_to_close'
        if s.s2c > 0 and NOW >= s.sched + s.s2c then which = 'schedule_to_close'
        elseif s.hbt > 0 and s.dl < s.started + s.stc then which = 'heartbeat' end
        drop_msg(queue_key(s.tq, 'act'), s.msg)
        act_retry_or_fail(run, wid, seq, s, timeout_failure(seq, att, which), false,
          EV.ACTIVITY_TASK_TIMED_OUT)
      end
    elseif kind == TK.SCHEDULE_TO_CLOSE then
      local seq = parts[3]
      local s = act_get(run, seq)
      if s then
        drop_msg(queue_key(s.tq, 'act'), s.msg)
        act_forget(run, seq, s)
        deliver(run, EV.ACTIVITY_TASK_TIMED_OUT, timeout_failure(seq, s.att, 'schedule_to_close'))
      end
    elseif kind == TK.ACTIVITY_RETRY then
      local seq, att = parts[3], tonumber(parts[4])
      local s = act_get(run, seq)
      if s and s.att == att and s.st == AS.BACKOFF then act_dispatch(run, seq, s) end
    elseif kind == TK.EXECUTION_TIMEOUT then
      close_run(run, RS.TIMED_OUT, EV.WORKFLOW_EXECUTION_TIMED_OUT,
        cmsgpack.pack({ reason = 'execution timeout' }), retention)
    elseif kind == TK.TASK_TIMEOUT then
      local fence = parts[3]
      if r[4] == WT.STARTED and r[5] == fence then
        drop_msg(r[7], r[6])
        local body = cmsgpack.pack({ fence = fence, failure = { type = EV.WORKFLOW_TASK_TIMED_OUT,
          message = 'the workflow task did not complete within the workflow task timeout',
          non_retryable = false, stack = '' } })
        wft_backoff(run, wid, EV.WORKFLOW_TASK_TIMED_OUT, body, true)
      end
    elseif kind == TK.STICKY_FALLBACK then
      if r[4] == WT.SCHEDULED and r[6] == parts[3] then
        drop_msg(r[7], r[6])
        -- a stream without a group is a departed worker's, recreated by an XADD
        if redis.call('EXISTS', r[7]) == 1 and redis.call('XLEN', r[7]) == 0
            and #redis.call('XINFO', 'GROUPS', r[7]) == 0 then
          redis.call('DEL', r[7])
        end
        redis.call('HSET', rk, 'sticky', '')
        schedule_wft(run, r[3])
      end
    elseif kind == TK.TASK_RETRY then
      if r[4] == WT.BACKOFF then schedule_wft(run, r[3]) end
    end
  end
end
local nxt = redis.call('ZRANGE', TIMERS, 0, 0, 'WITHSCORES')
return { #due, nxt[2] and tonumber(nxt[2]) or -1, NOW }
