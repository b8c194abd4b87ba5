-- Record a batch of activity outcomes (worker). KEYS: timers, closed, then per outcome
-- the run's hash, act hash, history and buffer, the activity stream its task came from,
-- and the run's shared and sticky workflow-task streams as act_start named them.
-- ARGV: prefix, then per outcome: R.OK (completed) or 'fail', run_id, seq, attempt, body,
-- non_retryable ('1'/'0'), heartbeat details, the activity stream, the message id. A
-- completion for an attempt that is no longer current (timed out, retried, the run
-- closed) is refused, and its message dropped unless it is the attempt's current one.
-- The answer is remembered on the activity (<seq>:d), so a repeat of the call (client
-- retry) gets the same answer.
-- Per outcome returns R.OK, R.RETRY (failed, will be retried) or R.REFUSED.
if (#ARGV - 1) % 9 ~= 0 then error('rillflow: act_done takes 9 arguments per outcome') end
for i = 2, #ARGV, 9 do num(ARGV[i + 3], 'attempt', 1) end
local out = {}
for i = 2, #ARGV, 9 do
  local kind, run, seq, att = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local body, nonretry, hb = ARGV[i + 4], ARGV[i + 5] == '1', ARGV[i + 6]
  local stream, msg = ARGV[i + 7], ARGV[i + 8]
  local ak = act_key(run)
  local r = call('HMGET', run_key(run), 'status', 'wid')
  local a = call('HMGET', ak, seq .. ':d', seq)
  local prev = a[1]
  local s = (r[1] == RS.RUNNING and a[2]) and cmsgpack.unpack(a[2]) or nil
  if prev == att .. '|' .. R.OK or prev == att .. '|' .. R.RETRY then
    out[#out + 1] = split(prev, '|')[2]
  elseif not s or s.att ~= att or s.st ~= AS.STARTED then
    if not (s and s.msg == msg) then drop_msg(stream, msg) end
    out[#out + 1] = R.REFUSED
  else
    drop_msg(queue_key(s.tq, 'act'), s.msg, run)
    local answer = R.OK
    if kind == R.OK then
      act_forget(run, seq, s)
      deliver(run, EV.ACTIVITY_TASK_COMPLETED, body)
    else
      if hb ~= '' then call('HSET', ak, seq .. ':hb', hb) end
      if act_retry_or_fail(run, r[2], seq, s, body, nonretry, EV.ACTIVITY_TASK_FAILED) then
        answer = R.RETRY
      end
    end
    call('HSET', ak, seq .. ':d', att .. '|' .. answer)
    out[#out + 1] = answer
  end
end
return out
