-- Complete a batch of workflow tasks (worker). KEYS: timers, closed, the stream the
-- tasks came from, the task queue's shared workflow-task stream and this worker's sticky
-- one, then each run's keys (hash, history, act, buffer, signals, updates, wf hash) and
-- the activity stream of each activity scheduled. ARGV: prefix, task_queue, retention
-- ms, the worker's identity, its sticky schedule timeout ms (0 = no sticky queue), then
-- per task: run_id, fence, message id, number of commands, and per command four
-- values: its kind (CMD), the event body, an aux msgpack array the script reads, and
-- '1' for an activity the worker takes itself ('' otherwise: see act_hand_over):
--   schedule_activity: seq, task queue, start_to_close, schedule_to_close, heartbeat
--     (ms; 0 = none), max attempts (0 = unlimited), initial interval ms, coefficient,
--     max interval ms
--   start_timer: seq, duration ms; cancel_timer, cancel_activity: seq;
--   complete_update: update id; complete_workflow, fail_workflow: nothing, and last.
-- Every task's commands are checked before anything is written, so a bad command
-- never leaves a batch half applied. Per task returns {R.OK, last command event id,
-- now, {seq, deadline, ...} of the activities handed to the worker}
-- {R.REFUSED, why} (the fence is not current: its message is dropped, unless it is still
-- the run's task), {R.INVALID, why} (nothing written), or
-- {R.AGAIN, why} when the task would close the run but signals or updates arrived
-- while it ran: then nothing of it is recorded, they join the history and the task runs
-- again from a replay (as Temporal does), so that no accepted message is lost. A repeat
-- of a completion (client retry) gets the answer the first one got.
local tq, retention, worker, sticky_ms = ARGV[2], num(ARGV[3], 'retention', 1), ARGV[4], num(ARGV[5], 'sticky ms', 0)

local AGAIN_WHY = 'signals or updates arrived before the run could close'
local KINDS = {}
for _, v in pairs(CMD) do KINDS[v] = true end

-- First pass: split the batch into tasks and check every command.
local tasks = {}
local i = 6
while i <= #ARGV do
  local t = { run = ARGV[i], fence = ARGV[i + 1], msg = ARGV[i + 2], n = tonumber(ARGV[i + 3]), at = i + 4,
    cmds = {} }
  if not t.n or t.n < 0 or t.at + t.n * 4 - 1 > #ARGV then
    return redis.error_reply('wft_complete: malformed arguments at ' .. i)
  end
  i = t.at + t.n * 4
  for c = t.at, t.at + t.n * 4 - 1, 4 do
    local kind = ARGV[c]
    local ok, aux = pcall(cmsgpack.unpack, ARGV[c + 2])
    local why = nil
    if not KINDS[kind] then why = 'unknown command kind ' .. tostring(kind)
    elseif not ok or type(aux) ~= 'table' then why = 'undecodable command arguments'
    elseif t.closes then why = 'a command after the closing command'
    elseif kind == CMD.SCHEDULE_ACTIVITY then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'string' or aux[2] == '' then why = 'bad activity' end
      for k = 3, 9 do if type(aux[k]) ~= 'number' then why = 'bad activity options' end end
    elseif kind == CMD.START_TIMER then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'number' or aux[2] < 1 then why = 'bad timer' end
    elseif kind == CMD.CANCEL_TIMER or kind == CMD.CANCEL_ACTIVITY then
      if type(aux[1]) ~= 'number' then why = 'bad sequence number' end
    elseif kind == CMD.COMPLETE_UPDATE then
      if type(aux[1]) ~= 'string' or aux[1] == '' then why = 'bad update id' end
    end
    if kind == CMD.COMPLETE_WORKFLOW or kind == CMD.FAIL_WORKFLOW then t.closes = true end
    if why and not t.invalid then t.invalid = why end
    t.cmds[#t.cmds + 1] = { kind = kind, body = ARGV[c + 1], aux = aux, eager = ARGV[c + 3] == '1' }
  end
  tasks[#tasks + 1] = t
end

local out = {}
for _, t in ipairs(tasks) do
  local run, fence = t.run, t.fence
  local rk = run_key(run)
  local r = call('HMGET', rk, 'status', 'wft', 'wft_fence', 'wid', 'wft_msg', 'wft_start_ms', 'wft_q',
    'msgbuf', 'wft_done', 'wft_failures', 'last_eid')
  knew(run, r[11])
  local rec = done_record(r[9], fence)
  if rec and rec[1] == R.AGAIN then
    out[#out + 1] = { R.AGAIN, AGAIN_WHY }
  elseif rec then
    out[#out + 1] = { rec[1], rec[2], NOW, handed_over(run, rec[3], worker) }
  elseif r[1] ~= RS.RUNNING then
    drop_msg(KEYS[3], t.msg)
    out[#out + 1] = { R.REFUSED, 'run is ' .. tostring(r[1] or 'missing') }
  elseif r[2] ~= WT.STARTED or r[3] ~= fence then
    if r[5] ~= t.msg then drop_msg(KEYS[3], t.msg) end
    out[#out + 1] = { R.REFUSED, 'workflow task was taken over' }
  elseif t.invalid then
    out[#out + 1] = { R.INVALID, t.invalid }
  else
    local wid = r[4]
    call('ZREM', TIMERS, tmember(TK.TASK_TIMEOUT, run, fence))
    if r[8] then call('HDEL', rk, 'msgbuf') end
    if t.closes and r[8] and message_buffered(run) then
      drop_msg(r[7], r[5], run)
      flush_buffer(run, wid)
      hset_run(run, 'sticky', '', 'wft_done', fence .. '|' .. R.AGAIN .. '|0')
      schedule_wft(run, tq)
      out[#out + 1] = { R.AGAIN, AGAIN_WHY }
    else
      if r[10] then call('HDEL', rk, 'wft_failures', 'wft_failure') end
      -- the id of the last event of this task's commands (the buffer's come after)
      local last = append(run, wid, EV.WORKFLOW_TASK_COMPLETED,
        cmsgpack.pack({ t0 = tonumber(r[6]), fence = fence, worker = worker }))
      local closed = false
      local ak = act_key(run)
      local handed, seqs = {}, {}
      for _, cmd in ipairs(t.cmds) do
        local kind, body, aux = cmd.kind, cmd.body, cmd.aux
        if kind == CMD.SCHEDULE_ACTIVITY then
          local seq = tostring(aux[1])
          last = append(run, wid, EV.ACTIVITY_TASK_SCHEDULED, body)
          local s = { att = 1, tq = aux[2], stc = aux[3], s2c = aux[4], hbt = aux[5],
            max = aux[6], ii = aux[7], bc = aux[8], mi = aux[9], sched = NOW, due = NOW }
          if cmd.eager and not t.closes then
            act_hand_over(run, seq, s, body, worker)
            handed[#handed + 1] = aux[1]
            handed[#handed + 1] = s.dl
            seqs[#seqs + 1] = seq
          else
            act_dispatch(run, seq, s, body)
          end
          if s.s2c > 0 then
            call('ZADD', TIMERS, NOW + s.s2c, tmember(TK.SCHEDULE_TO_CLOSE, run, seq))
          end
        elseif kind == CMD.START_TIMER then
          last = append(run, wid, EV.TIMER_STARTED, body)
          call('HSET', ak, 'timer:' .. aux[1], NOW + aux[2])
          call('ZADD', TIMERS, NOW + aux[2], tmember(TK.USER_TIMER, run, aux[1]))
        elseif kind == CMD.CANCEL_TIMER then
          call('ZREM', TIMERS, tmember(TK.USER_TIMER, run, aux[1]))
          call('HDEL', ak, 'timer:' .. aux[1])
          last = append(run, wid, EV.TIMER_CANCELED, body)
        elseif kind == CMD.CANCEL_ACTIVITY then
          local seq = tostring(aux[1])
          local s = act_get(run, seq)
          if s then
            drop_msg(queue_key(s.tq, 'act'), s.msg, run)
            act_forget(run, seq, s)
          end
          last = append(run, wid, EV.ACTIVITY_TASK_CANCEL_REQUESTED, body)
        elseif kind == CMD.COMPLETE_UPDATE then
          last = append(run, wid, EV.WORKFLOW_EXECUTION_UPDATE_COMPLETED, body)
          finish_update(run, aux[1], body)
        elseif kind == CMD.COMPLETE_WORKFLOW or kind == CMD.FAIL_WORKFLOW then
          -- the closing event comes next; the run hash records this completion with it
          -- (closing the run drops the task message)
          local rec = { 'wft_done', fence .. '|' .. R.OK .. '|' .. (LAST[run] + 1) .. '|' }
          if kind == CMD.COMPLETE_WORKFLOW then
            last = close_run(run, RS.COMPLETED, EV.WORKFLOW_EXECUTION_COMPLETED, body, retention, rec)
          else
            last = close_run(run, RS.FAILED, EV.WORKFLOW_EXECUTION_FAILED, body, retention, rec)
          end
          closed = true
        end
      end
      local done = fence .. '|' .. R.OK .. '|' .. last .. '|' .. table.concat(seqs, ',')
      if not closed then
        drop_msg(r[7], r[5], run)
        -- the next task of this run goes to this worker, which now holds it in cache
        local sticky = sticky_ms > 0 and worker or ''
        if flush_buffer(run, wid) > 0 then
          hset_run(run, 'sticky', sticky, 'sticky_ms', sticky_ms, 'wft_done', done)
          schedule_wft(run, tq)
        else
          hset_run(run, 'sticky', sticky, 'sticky_ms', sticky_ms, 'wft_done', done, 'wft', WT.NONE, 'wft_msg', '')
        end
      end
      out[#out + 1] = { R.OK, last, NOW, handed }
    end
  end
end
return out
