-- Complete a batch of workflow tasks (worker). KEYS: timers, closed, the stream the
-- tasks came from, the task queue's shared workflow-task stream and this worker's sticky
-- one, then each run's keys (hash, history, act, buffer, signals, updates, wf hash) and
-- the activity stream of each activity scheduled. ARGV: prefix, task_queue, retention
-- ms, the worker's identity, its sticky schedule timeout ms (0 = no sticky queue), its
-- workflow task timeout ms, the most events a task start returns, then per task:
-- run_id, fence, message id, speculative start ('' = none: see below), number of
-- commands, and per command four values (see parse_commands).
-- Every task's commands are checked before anything is written, so a bad command
-- never leaves a batch half applied. Per task returns {R.OK, last command event id,
-- now, {seq, deadline, ...} of the activities handed to the worker, fence},
-- {R.REFUSED, why} (the fence is not current: its message is dropped, unless it is still
-- the run's task), {R.INVALID, why} (nothing written), or
-- {R.AGAIN, why} when the task would close the run but signals or updates arrived
-- while it ran: then nothing of it is recorded, they join the history and the task runs
-- again from a replay (as Temporal does), so that no accepted message is lost. A repeat
-- of a completion (client retry) gets the answer the first one got.
--
-- A speculative task is a run's first task, run by the worker from its message (which
-- carries the start event: see start) without a wft_start call: its fence is '' and
-- its start the time the worker gave its workflow (workflow.now()), an estimate of
-- Redis's clock. It is started and completed here at once, with that start time, if
-- nothing happened to the run since it was scheduled and the time lies between the
-- run's start and NOW, less than a workflow task timeout ago. Otherwise it is started
-- for the worker the way wft_start starts it, with the whole history: {R.STARTED,
-- start_task's answer}; or answered {R.BUSY} (another worker has it) or {R.STALE}.
local tq, retention, worker = ARGV[2], num(ARGV[3], 'retention', 1), ARGV[4]
local sticky_ms, timeout = num(ARGV[5], 'sticky ms', 0), num(ARGV[6], 'timeout', 1)
local max_events = num(ARGV[7], 'max events', 1)

local AGAIN_WHY = 'signals, updates or a cancel request arrived before the run could close'

-- First pass: split the batch into tasks and check every command.
local tasks = {}
local i = 8
while i <= #ARGV do
  local t = { run = ARGV[i], fence = ARGV[i + 1], msg = ARGV[i + 2], n = tonumber(ARGV[i + 4]), at = i + 5 }
  if not t.n or t.n < 0 or t.at + t.n * 4 - 1 > #ARGV then
    return redis.error_reply('wft_complete: malformed arguments at ' .. i)
  end
  if ARGV[i + 3] ~= '' then t.spec = num(ARGV[i + 3], 'speculative start', 0) end
  i = t.at + t.n * 4
  t.cmds, t.closes, t.invalid = parse_commands(ARGV, t.at, t.n)
  tasks[#tasks + 1] = t
end

-- Why task `t`'s commands cannot be recorded (false: they can): parse_commands's
-- checks, then those that read the run (kept in t.invalid).
local function invalid(t)
  if t.invalid == nil then t.invalid = commands_not_applicable(t.run, t.cmds) or false end
  return t.invalid
end

-- The speculative task `t` of a run whose SPEC_FIELDS are `r`.
local function complete_speculative(t, r)
  local run = t.run
  -- The run's first message is the only one a speculative task runs from, so the call is
  -- its start (as ms after the run's, in base 36) and its worker (4 hex digits of its
  -- digest; handed_over checks the whole identity): short, for the run hash to stay
  -- compact (see done_string).
  local call_id = base36(t.spec - (tonumber(r[7]) or 0)) .. '.' .. string.sub(redis.sha1hex(worker), 1, 4)
  local rec = done_record(r[12], nil, call_id)
  local current = r[1] == RS.RUNNING and r[3] == t.msg
  if not rec and current then invalid(t) end
  if rec then
    return { rec[1], rec[2], NOW, handed_over(run, rec[3], worker), rec[4] }
  elseif current and r[2] == WT.SCHEDULED and tonumber(r[6]) == 1 and (tonumber(r[13]) or 0) == 0
      and not t.invalid and spec_time_ok(t.spec, tonumber(r[7]), timeout) then
    local fence = '1-' .. NOW_US
    local last, handed = record_task(run, r[4], { fence = fence, t0 = t.spec, worker = worker, tq = tq,
      retention = retention, sticky_ms = sticky_ms, cmds = t.cmds, closes = t.closes, stream = KEYS[3],
      msg = t.msg, spec = true, call_id = call_id, known = t.closes and pick(r, CLOSE_FROM_SPEC) })
    return { R.OK, last, NOW, handed, fence }
  elseif current and (r[2] == WT.SCHEDULED or (r[2] == WT.STARTED and r[9] == worker)) then
    return { R.STARTED, start_task(run, r, r[2] == WT.STARTED, { worker = worker, timeout = timeout,
      max_events = max_events, since = 0, seen = '' }) }
  elseif current and r[2] == WT.STARTED then
    return { R.BUSY }
  end
  drop_msg(KEYS[3], t.msg)
  return { R.STALE }
end

local out = {}
for _, t in ipairs(tasks) do
  local run, fence = t.run, t.fence
  local rk = run_key(run)
  if t.spec then
    local r = call('HMGET', rk, unpack(SPEC_FIELDS))
    knew(run, r[6], r[16])
    out[#out + 1] = complete_speculative(t, r)
  else
    local r = call('HMGET', rk, unpack(COMPLETE_FIELDS))
    knew(run, r[11], r[13])
    local rec = done_record(r[9], fence)
    if rec and rec[1] == R.AGAIN then
      out[#out + 1] = { R.AGAIN, AGAIN_WHY }
    elseif rec then
      out[#out + 1] = { rec[1], rec[2], NOW, handed_over(run, rec[3], worker), fence }
    elseif r[1] ~= RS.RUNNING then
      drop_msg(KEYS[3], t.msg)
      out[#out + 1] = { R.REFUSED, 'run is ' .. tostring(r[1] or 'missing') }
    elseif r[2] ~= WT.STARTED or r[3] ~= fence then
      if r[5] ~= t.msg then drop_msg(KEYS[3], t.msg) end
      out[#out + 1] = { R.REFUSED, 'workflow task was taken over' }
    elseif invalid(t) then
      out[#out + 1] = { R.INVALID, t.invalid }
    else
      local wid = r[4]
      -- a history at its limit: the run fails in place of the task's commands
      local over = not t.closes and history_over(r[11], r[13])
      if over then t.cmds, t.closes = { { kind = CMD.FAIL_WORKFLOW, body = over, aux = {} } }, true end
      -- a run failing at its limit fails even with signals waiting: another task for them
      -- would only grow the history further, and they could keep it open for ever
      local again = not over and t.closes and r[8]
        and message_buffered(run, t.cmds[#t.cmds].kind == CMD.CONTINUE_AS_NEW)
      -- (closing the run removes its task's timeout with its other timers)
      if again or not t.closes then call('ZREM', TIMERS, tmember(TK.TASK_TIMEOUT, run, fence)) end
      if r[8] then call('HDEL', rk, 'msgbuf') end
      if again then
        drop_msg(r[7], r[5], run)
        flush_buffer(run, wid)
        hset_run(run, 'sticky', '', 'wft_done', done_string(fence, R.AGAIN, 0))
        schedule_wft(run, tq)
        out[#out + 1] = { R.AGAIN, AGAIN_WHY }
      else
        if r[10] then call('HDEL', rk, 'wft_failures', 'wft_failure') end
        local last, handed = record_task(run, wid, { fence = fence, t0 = tonumber(r[6]), worker = worker,
          tq = tq, retention = retention, sticky_ms = sticky_ms, cmds = t.cmds, closes = t.closes,
          stream = r[7], msg = r[5], known = t.closes and pick(r, CLOSE_FROM_COMPLETE), seen = r[14] and not r[8] })
        out[#out + 1] = { R.OK, last, NOW, handed, fence }
      end
    end
  end
end
return out
