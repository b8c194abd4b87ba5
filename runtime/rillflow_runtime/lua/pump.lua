-- Act on due members of the shard's timers zset (the worker holding the shard's pump
-- lease, from pump_due; each member is handled once because it is removed in the same
-- script). KEYS: timers, closed, the pump lease, then for each run the members name: its
-- hash, act hash, buffer, signals, updates, and (read by protocol.py after pump_due) its
-- wf hash, history, task queue's shared and sticky workflow-task streams, the stream of
-- its task message, the activity stream of each activity a member names, and the stream
-- each msg_drop member names. ARGV: prefix, retention ms, the worker's identity, the
-- members (as pump_due returned them). Members are "<kind>|<run>|..." with the kinds of
-- TK (see model.py and docs/keyspace.md). A member no longer due is skipped; one whose
-- keys the caller could not declare (the run moved on since it read them) is left for
-- the next round. The lease is released at the end.
-- Returns {handled, next due ms or -1, now ms}.
local retention, worker = num(ARGV[2], 'retention', 1), ARGV[3]
local handled = 0

-- The stream a msg_drop member names: what follows its third '|'.
local function dropped_stream(m)
  local at = 0
  for _ = 1, 3 do at = string.find(m, '|', at + 1, true) end
  return P .. string.sub(m, at + 1)
end

-- Whether every key a due member's handling may touch was declared.
local function declared_for(kind, run, r, parts, m)
  if kind == TK.MESSAGE_DROP then return DECLARED[dropped_stream(m)] end
  if r[1] ~= RS.RUNNING then return true end
  if not (DECLARED[hist_key(r[2], run)] and DECLARED[wf_key(r[2])] and DECLARED[queue_key(r[3], 'wft')]) then
    return false
  end
  if r[7] and r[7] ~= '' and not DECLARED[r[7]] then return false end
  if kind == TK.ACTIVITY_DEADLINE or kind == TK.ACTIVITY_RETRY then
    local s = act_get(run, parts[3])
    if s and not DECLARED[queue_key(s.tq, 'act')] then return false end
  end
  return true
end

-- Drop a task message; a sticky stream left empty and without a group is a departed
-- worker's (recreated by an XADD): it goes too.
local function drop_and_sweep(stream, msg)
  drop_msg(stream, msg)
  if string.find(stream, '@', #P + 1, true) and call('EXISTS', stream) == 1 and call('XLEN', stream) == 0
      and #call('XINFO', 'GROUPS', stream) == 0 then
    call('DEL', stream)
  end
end

for i = 4, #ARGV do
  local m = ARGV[i]
  local score = call('ZSCORE', TIMERS, m)
  local parts = split(m, '|')
  local kind, run = parts[1], parts[2]
  local rk = run_key(run)
  local r = score and tonumber(score) <= NOW and DECLARED[rk]
    and call('HMGET', rk, 'status', 'wid', 'tq', 'wft', 'wft_fence', 'wft_msg', 'wft_q', 'last_eid', 'hbytes')
  if r then knew(run, r[8], r[9]) end
  if r and declared_for(kind, run, r, parts, m) then
    call('ZREM', TIMERS, m)
    handled = handled + 1
    if kind == TK.MESSAGE_DROP then
      drop_and_sweep(dropped_stream(m), parts[3])
    elseif r[1] == RS.RUNNING then
      local wid = r[2]
      if kind == TK.USER_TIMER then
        call('HDEL', act_key(run), 'timer:' .. parts[3])
        deliver(run, EV.TIMER_FIRED, cmsgpack.pack({ seq = tonumber(parts[3]) }))
      elseif kind == TK.ACTIVITY_DEADLINE then
        local seq, att = parts[3], tonumber(parts[4])
        local s = act_get(run, seq)
        if s and s.att == att and s.st == AS.STARTED then
          local which = 'start_to_close'
          if s.s2c > 0 and NOW >= s.sched + s.s2c then which = 'schedule_to_close'
          elseif s.hbt > 0 and s.dl < s.started + s.stc then which = 'heartbeat' end
          drop_msg(queue_key(s.tq, 'act'), s.msg, run)
          act_retry_or_fail(run, wid, seq, s, timeout_failure(seq, att, which), false,
            EV.ACTIVITY_TASK_TIMED_OUT)
        end
      elseif kind == TK.SCHEDULE_TO_CLOSE then
        local seq = parts[3]
        local s = act_get(run, seq)
        if s then
          drop_msg(queue_key(s.tq, 'act'), s.msg, run)
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
          drop_msg(r[7], r[6], run)
          local body = cmsgpack.pack({ fence = fence, failure = { type = EV.WORKFLOW_TASK_TIMED_OUT,
            message = 'the workflow task did not complete within the workflow task timeout',
            non_retryable = false, stack = '' } })
          wft_backoff(run, wid, EV.WORKFLOW_TASK_TIMED_OUT, body, true)
        end
      elseif kind == TK.STICKY_FALLBACK then
        if r[4] == WT.SCHEDULED and r[6] == parts[3] then
          drop_and_sweep(r[7], r[6])
          call('HSET', rk, 'sticky', '')
          schedule_wft(run, r[3])
        end
      elseif kind == TK.TASK_RETRY then
        if r[4] == WT.BACKOFF then schedule_wft(run, r[3]) end
      end
    end
  end
end
if call('GET', KEYS[3]) == worker then call('DEL', KEYS[3]) end
local nxt = call('ZRANGE', TIMERS, 0, 0, 'WITHSCORES')
return { handled, nxt[2] and tonumber(nxt[2]) or -1, NOW }
