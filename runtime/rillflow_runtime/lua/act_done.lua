-- Record a batch of activity outcomes (worker). KEYS: timers, closed, then per outcome
-- the run's hash, act hash, history and buffer, the activity stream its task came from
-- (none for an attempt handed over by wft_complete), and the run's shared and sticky
-- workflow-task streams as act_start named them.
-- ARGV: prefix, the worker's identity, its workflow task timeout ms, the most events a
-- task start returns, then per outcome: R.OK (completed) or 'fail', run_id, seq,
-- attempt, body, non_retryable ('1'/'0'), heartbeat details, the activity stream, the
-- message id, and the worker's cached position of the run (see start_task): the last
-- event id its instance applied (-1: the worker does not take the run's workflow task
-- here) and the fence that brought it there.
-- A completion for an attempt that is no longer current (timed out, retried, the run
-- closed) is refused, and its message dropped unless it is the attempt's current one.
-- When the outcome wakes the workflow and this worker caches the run (it ran its last
-- workflow task), that next task is started for it here, in place of a task message
-- (see deliver). The answer is remembered on the activity (<seq>:d = "<attempt>|<answer>
-- [|<fence of the task started>]"), so a repeat of the call (client retry) gets the same
-- answer, and the same started task while it is still that worker's (after the run
-- closed, the answers are kept folded on the run hash: see close_run).
-- Per outcome returns {R.OK, R.RETRY (failed, will be retried) or R.REFUSED, the
-- started workflow task as wft_start returns it, or nil}.
local worker, timeout, max_events = ARGV[2], num(ARGV[3], 'timeout', 1), num(ARGV[4], 'max events', 1)
if (#ARGV - 4) % 11 ~= 0 then error('rillflow: act_done takes 11 arguments per outcome') end
for i = 5, #ARGV, 11 do
  num(ARGV[i + 3], 'attempt', 1)
  num(ARGV[i + 9], 'since', -1)
end
local out = {}
for i = 5, #ARGV, 11 do
  local kind, run, seq, att = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local body, nonretry, hb = ARGV[i + 4], ARGV[i + 5] == '1', ARGV[i + 6]
  local stream, msg = ARGV[i + 7], ARGV[i + 8]
  local since = tonumber(ARGV[i + 9])
  local eager = since >= 0 and { worker = worker, timeout = timeout, max_events = max_events, since = since,
    seen = ARGV[i + 10] } or nil
  local ak = act_key(run)
  local r = call('HMGET', run_key(run), unpack(TASK_FIELDS))
  knew(run, r[6], r[16])
  local a = call('HMGET', ak, seq .. ':d', seq)
  local prev = a[1] and split(a[1], '|') or {}
  if not a[1] and r[1] and r[1] ~= RS.RUNNING then prev = folded_answer(run, seq, att) end
  local s = (r[1] == RS.RUNNING and a[2]) and cmsgpack.unpack(a[2]) or nil
  if tonumber(prev[1]) == att and (prev[2] == R.OK or prev[2] == R.RETRY) then
    local task = false
    if prev[3] and eager and r[1] == RS.RUNNING and r[2] == WT.STARTED and r[9] == worker and r[10] == prev[3] then
      task = start_task(run, r, true, eager)
    end
    out[#out + 1] = { prev[2], task }
  elseif not s or s.att ~= att or s.st ~= AS.STARTED then
    if not (s and s.msg == msg) then drop_msg(stream, msg) end
    out[#out + 1] = { R.REFUSED, false }
  else
    drop_msg(queue_key(s.tq, 'act'), s.msg, run)
    local answer, woke = R.OK, nil
    if kind == R.OK then
      act_forget(run, seq, s)
      woke = deliver(run, EV.ACTIVITY_TASK_COMPLETED, body, eager, r)
    else
      if hb ~= '' then call('HSET', ak, seq .. ':hb', hb) end
      local retrying
      retrying, woke = act_retry_or_fail(run, r[4], seq, s, body, nonretry, EV.ACTIVITY_TASK_FAILED, eager, r)
      if retrying then answer = R.RETRY end
    end
    local task = type(woke) == 'table' and woke or false
    call('HSET', ak, seq .. ':d', att .. '|' .. answer .. (task and ('|' .. task[2]) or ''))
    out[#out + 1] = { answer, task }
  end
end
return out
