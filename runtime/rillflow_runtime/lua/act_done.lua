-- Record a batch of activity outcomes (worker). ARGV: prefix, then per outcome:
-- 'ok' | 'fail', run_id, seq, attempt, body, non_retryable ('1'/'0'), heartbeat details.
-- A completion for an attempt that is no longer current (timed out, retried, the run
-- closed) is refused. Per outcome returns 'ok', 'retry' or 'refused'.
local out = {}
for i = 2, #ARGV, 7 do
  local kind, run, seq, att = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local body, nonretry, hb = ARGV[i + 4], ARGV[i + 5] == '1', ARGV[i + 6]
  local r = redis.call('HMGET', run_key(run), 'status', 'wid')
  local s = (r[1] == 'running') and act_get(run, seq) or nil
  if not s or s.att ~= att or s.st ~= 'started' then
    out[#out + 1] = 'refused'
  else
    drop_msg(queue_key(s.tq, 'act'), s.msg)
    if kind == 'ok' then
      act_forget(run, seq, s)
      deliver(run, 'ActivityTaskCompleted', body)
      out[#out + 1] = 'ok'
    else
      redis.call('ZREM', TIMERS, 'A|' .. run .. '|' .. seq .. '|' .. att)
      if hb ~= '' then redis.call('HSET', act_key(run), seq .. ':hb', hb) end
      if act_retry_or_fail(run, r[2], seq, s, body, nonretry, 'ActivityTaskFailed') then
        out[#out + 1] = 'retry'
      else
        out[#out + 1] = 'ok'
      end
    end
  end
end
return out
