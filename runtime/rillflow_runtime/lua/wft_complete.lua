-- Complete a batch of workflow tasks (worker). ARGV: prefix, task_queue, retention ms,
-- the worker's identity, its sticky schedule timeout ms (0 = no sticky queue), then per task: run_id, fence, number of commands, and per command three values:
-- a one-letter kind, the event body, an aux msgpack array the script reads.
-- Kinds: A schedule activity, T start timer, C cancel timer, X cancel activity,
-- U complete an update, D complete workflow, F fail workflow.
-- Per task returns {'ok', last command event id}, {'refused', why}, or {'again', why}
-- when the task would close the run but signals arrived while it ran: then nothing of
-- it is recorded, the signals join the history and the task runs again from a replay
-- (as Temporal does), so that no accepted signal is lost.
local tq, retention, worker, sticky_ms = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local out = {}
local i = 6
while i <= #ARGV do
  local run, fence, ncmd = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local cmds_at = i + 3
  i = cmds_at + ncmd * 3
  local rk = run_key(run)
  local r = redis.call('HMGET', rk, 'status', 'wft', 'wft_seq', 'wid', 'wft_msg', 'wft_start_ms', 'wft_q',
    'msgbuf')
  if r[1] ~= 'running' then
    out[#out + 1] = { 'refused', 'run is ' .. tostring(r[1] or 'gone') }
  elseif r[2] ~= 'started' or tonumber(r[3]) ~= fence then
    out[#out + 1] = { 'refused', 'workflow task was taken over' }
  else
    local wid = r[4]
    local closes = false
    for c = cmds_at, cmds_at + ncmd * 3 - 1, 3 do
      if ARGV[c] == 'D' or ARGV[c] == 'F' then closes = true end
    end
    redis.call('ZREM', TIMERS, 'W|' .. run .. '|' .. fence)
    if r[8] then redis.call('HDEL', rk, 'msgbuf') end
    if closes and r[8] and message_buffered(run) then
      drop_msg(r[7], r[5])
      flush_buffer(run, wid)
      redis.call('HSET', rk, 'sticky', '')
      schedule_wft(run, tq)
      out[#out + 1] = { 'again', 'signals or updates arrived before the run could close' }
    else
      redis.call('HDEL', rk, 'wft_failures', 'wft_failure')
      append(run, wid, 'WorkflowTaskCompleted',
        cmsgpack.pack({ t0 = tonumber(r[6]), fence = fence, worker = worker }))
      local closed = false
      for c = cmds_at, cmds_at + ncmd * 3 - 1, 3 do
        local kind, body = ARGV[c], ARGV[c + 1]
        local aux = cmsgpack.unpack(ARGV[c + 2])
        if kind == 'A' then
          -- aux: seq, task queue, start_to_close, schedule_to_close, heartbeat (ms; 0 = none),
          -- max attempts (0 = unlimited), initial interval ms, coefficient, max interval ms
          local seq = tostring(aux[1])
          append(run, wid, 'ActivityTaskScheduled', body)
          local s = { att = 1, tq = aux[2], stc = aux[3], s2c = aux[4], hbt = aux[5],
            max = aux[6], ii = aux[7], bc = aux[8], mi = aux[9], sched = NOW, due = NOW }
          redis.call('HSET', act_key(run), seq .. ':b', body)
          act_dispatch(run, seq, s)
          if s.s2c > 0 then
            redis.call('ZADD', TIMERS, NOW + s.s2c, 'S|' .. run .. '|' .. seq)
          end
        elseif kind == 'T' then
          append(run, wid, 'TimerStarted', body)
          redis.call('ZADD', TIMERS, NOW + aux[2], 'T|' .. run .. '|' .. aux[1])
        elseif kind == 'C' then
          redis.call('ZREM', TIMERS, 'T|' .. run .. '|' .. aux[1])
          append(run, wid, 'TimerCanceled', body)
        elseif kind == 'X' then
          local seq = tostring(aux[1])
          local s = act_get(run, seq)
          if s then
            drop_msg(queue_key(s.tq, 'act'), s.msg)
            act_forget(run, seq, s)
          end
          append(run, wid, 'ActivityTaskCancelRequested', body)
        elseif kind == 'U' then
          -- aux: update id
          append(run, wid, 'WorkflowExecutionUpdateCompleted', body)
          finish_update(run, aux[1], body)
        elseif kind == 'D' then
          close_run(run, 'completed', 'WorkflowExecutionCompleted', body, retention)
          closed = true
          break
        elseif kind == 'F' then
          close_run(run, 'failed', 'WorkflowExecutionFailed', body, retention)
          closed = true
          break
        end
      end
      local last = tonumber(redis.call('HGET', rk, 'last_eid'))
      drop_msg(r[7], r[5])
      if not closed then
        -- the next task of this run goes to this worker, which now holds it in cache
        if tonumber(sticky_ms) > 0 then
          redis.call('HSET', rk, 'sticky', worker, 'sticky_ms', sticky_ms)
        else
          redis.call('HSET', rk, 'sticky', '')
        end
        if flush_buffer(run, wid) > 0 then
          schedule_wft(run, tq)
        else
          redis.call('HSET', rk, 'wft', '', 'wft_msg', '')
        end
      end
      out[#out + 1] = { 'ok', last }
    end
  end
end
return out
