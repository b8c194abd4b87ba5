-- Apply one outbox entry on the shard of the execution it is for (a worker's outbox
-- poller: see rillflow_runtime/outbox.py). An entry is delivered at least once (its
-- poller may die between this call and outbox_done, and the entry is read again), so
-- each kind knows its own repeat and has its effect once. KEYS: timers, closed, then
-- what the kind touches (protocol.py):
--   start_child: the child's wf hash, run hash, history, its task queue's workflow-task
--     stream and its signal ids (as for start);
--   child_closed: the parent run's keys and its workflow-task streams;
--   terminate, cancel: the child's wf hash, its current run's keys and streams.
-- ARGV: prefix, retention ms, kind (OB), then:
--   start_child: child id, child run id, workflow type, task queue, the child's
--     WorkflowExecutionStarted body, execution timeout ms, its parent
--     ("<seq>|<parent run>|<parent id>", kept on the child's runs as `parent`);
--   child_closed: parent run, seq, child id, the ChildWorkflowExecutionStarted body (in
--     case the start's answer has not reached the parent yet), the closing event's type
--     and body;
--   terminate, cancel: child id, parent run, body ({reason}), request id.
-- Returns, for start_child, {R.OK, run} (started, now or by an earlier delivery),
-- {R.RUNNING, current run} (the id is taken by a running run) or {R.INVALID, why};
-- for child_closed, {R.OK} or {R.DUPLICATE} (delivered before, or the parent no longer
-- waits for it: closed, or it never had that child); for terminate and cancel, {R.OK,
-- run}, {R.NOT_RUNNING} (the child's execution closed, or its running run is not that
-- parent's child), {R.DUPLICATE} (a cancel asked before) or {R.REROUTE} (its current
-- run changed since the caller looked: nothing written, look again).
local retention, kind = num(ARGV[2], 'retention', 1), ARGV[3]

local CHILD_CLOSED = {
  [EV.CHILD_WORKFLOW_EXECUTION_COMPLETED] = true, [EV.CHILD_WORKFLOW_EXECUTION_FAILED] = true,
  [EV.CHILD_WORKFLOW_EXECUTION_CANCELED] = true, [EV.CHILD_WORKFLOW_EXECUTION_TIMED_OUT] = true,
  [EV.CHILD_WORKFLOW_EXECUTION_TERMINATED] = true,
}

if kind == OB.START_CHILD then
  local wid, run, wtype, tq, body, link = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[10]
  local timeout = tonumber(ARGV[9])
  local why = start_invalid(wid, run, wtype, tq, timeout) or ((link or '') == '' and 'no parent') or nil
  if why then return { R.INVALID, why } end
  if call('EXISTS', run_key(run)) == 1 then  -- a repeat
    if call('HGET', run_key(run), 'wid') ~= wid then return { R.INVALID, 'run id already used' } end
    return { R.OK, run }
  end
  local cur = call('HMGET', wf_key(wid), 'run', 'status')
  if cur[2] == RS.RUNNING then return { R.RUNNING, cur[1] } end
  -- checked: nothing below can fail
  create_run(wid, run, wtype, tq, body, timeout, cur[1] or cur[2], true)
  call('HSET', run_key(run), 'parent', link)
  return { R.OK, run }
elseif kind == OB.CHILD_CLOSED then
  local run, seq, cwid, started, etype, body = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
  if not CHILD_CLOSED[etype] then return { R.INVALID, 'not a child closing event: ' .. tostring(etype) } end
  if call('HGET', run_key(run), 'status') ~= RS.RUNNING then return { R.DUPLICATE } end
  local field = 'child:' .. seq
  local raw = call('HGET', act_key(run), field)
  local s = raw and cmsgpack.unpack(raw)
  if not s or s.wid ~= cwid then return { R.DUPLICATE } end
  call('HDEL', act_key(run), field)
  -- the parent learns of the start first, always: the answer to the start may still be
  -- on its way (outbox_done then finds the record gone and records nothing)
  if s.st == AS.SCHEDULED then deliver(run, EV.CHILD_WORKFLOW_EXECUTION_STARTED, started) end
  deliver(run, etype, body)
  return { R.OK }
elseif kind == OB.TERMINATE or kind == OB.CANCEL then
  local wid, parent_run, body, rid = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local run = client_run(wid, '')
  if not run then return { R.REROUTE } end
  if run == '' then return { R.NOT_RUNNING } end
  local r = call('HMGET', run_key(run), 'status', 'parent', 'cancel_req')
  if r[1] ~= RS.RUNNING or not r[2] or split(r[2], '|')[2] ~= parent_run then return { R.NOT_RUNNING } end
  if kind == OB.TERMINATE then
    close_run(run, RS.TERMINATED, EV.WORKFLOW_EXECUTION_TERMINATED, body, retention)
  else
    if r[3] then return { R.DUPLICATE } end
    call('HSET', run_key(run), 'cancel_req', rid)
    deliver(run, EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED, body)
  end
  return { R.OK, run }
end
return { R.INVALID, 'unknown outbox kind ' .. tostring(kind) }
