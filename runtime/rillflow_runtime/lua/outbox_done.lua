-- Finish one outbox entry on its own shard, after outbox_apply (or, for a signal, the
-- signal script) had its effect: record the answer its origin run waits for, if the
-- kind has one, and remove the entry (XACK + XDEL). A repeat (the entry read again)
-- records nothing twice: the origin's record of what it waits for is gone or changed.
-- Only the consumer the entry is pending for may finish it: one that stalled while
-- another took the entry over (and applied it again, maybe to another answer: the
-- child's id, taken then, was free by the second start) is refused, so that the answer
-- recorded is the one that holds. KEYS: timers, closed, the shard's outbox, the origin
-- run's keys and workflow-task streams. ARGV: prefix, entry id, the consumer (the
-- worker's identity), kind (OB), then:
--   start_child: parent run, seq, the answer (R.OK: started; else refused), the
--     answer's event body (ChildWorkflowExecutionStarted or
--     StartChildWorkflowExecutionFailed);
--   signal: origin run, seq, the answer (R.OK: delivered; else not), the event body
--     (ExternalWorkflowExecutionSignaled or SignalExternalWorkflowExecutionFailed);
--   other kinds: nothing.
-- A parent that closed before its child's start was answered has its parent close
-- policy applied to the child now (close_run could not: the child had no run yet).
-- Returns {R.OK}, or {R.STALE} (the entry is not this consumer's: nothing written).
local id, consumer, kind = ARGV[2], ARGV[3], ARGV[4]
local held = call('XPENDING', KEYS[3], GROUP, id, id, 1)
if not held[1] or held[1][2] ~= consumer then return { R.STALE } end
if kind == OB.START_CHILD or kind == OB.SIGNAL then
  local run, seq, answer, body = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local r = call('HMGET', run_key(run), 'status', 'wid')
  if kind == OB.SIGNAL then
    if r[1] == RS.RUNNING and call('HDEL', act_key(run), 'sigx:' .. seq) == 1 then
      deliver(run, answer == R.OK and EV.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED
        or EV.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED, body)
    end
  else
    local field = 'child:' .. seq
    local raw = call('HGET', act_key(run), field)
    local s = raw and cmsgpack.unpack(raw)
    if s and s.st == AS.SCHEDULED then
      if answer ~= R.OK then
        call('HDEL', act_key(run), field)
        deliver(run, EV.START_CHILD_WORKFLOW_EXECUTION_FAILED, body)
      else
        s.st = AS.STARTED
        call('HSET', act_key(run), field, cmsgpack.pack(s))
        if r[1] == RS.RUNNING then
          deliver(run, EV.CHILD_WORKFLOW_EXECUTION_STARTED, body)
        else
          apply_close_policy(r[2] or '', run, seq, s, r[1] or 'closed')
        end
      end
    end
  end
end
drop_msg(KEYS[3], id)
return { R.OK }
