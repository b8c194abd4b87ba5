-- Reset an execution to one of its workflow tasks (client): a new run of the same id,
-- whose history is the old run's events before that task's WorkflowTaskCompleted, then
-- a WorkflowTaskFailed saying why (the task runs again, with the code deployed now),
-- then the signals and updates re-applied from after that point. The old run, if still
-- running, ends terminated with the reason. What the copied history leaves pending is
-- pending again: activities are scheduled anew (attempt 1), timers due when they were.
-- The caller (client.reset_workflow) reads the old run's history and builds all that.
-- KEYS: timers, closed, the execution's wf hash, the old run's keys and its workflow-task
-- streams, the new run's keys, the task queue's workflow-task stream, the activity
-- streams of what is pending again. ARGV: prefix, workflow_id, old run, new run, the old
-- run's last event id as the caller read it, retention ms, the old run's
-- WorkflowExecutionTerminated body, workflow type, task queue, execution timeout ms, the
-- new WorkflowExecutionStarted body, n events then (type, time ms or 0 for now, body) each, n
-- activities then (packed aux as wft_complete takes a schedule_activity's, the
-- ActivityTaskScheduled body) each, n timers then (seq, due ms) each, n updates then
-- (id, outcome body, or '' for one still open) each: the UpdateAccepted events among
-- the events.
-- Returns {R.OK, new run}, {R.STALE, why} (the old run is no longer the execution's
-- current run, or its history grew since it was read: nothing written; read again) or
-- {R.INVALID, why} (nothing written). A repeat of the call (the new run exists) is OK.
local wid, old, new = ARGV[2], ARGV[3], ARGV[4]
local seen, retention = num(ARGV[5], 'last event id', 0), num(ARGV[6], 'retention', 1)
local term_body, wtype, tq, timeout, start_body = ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11]
local why = start_invalid(wid, new, wtype, tq, timeout)
if why then return { R.INVALID, why } end
if call('EXISTS', run_key(new)) == 1 then
  if call('HGET', run_key(new), 'wid') ~= wid then return { R.INVALID, 'run id already used' } end
  return { R.OK, new }  -- a repeat
end
local cur = call('HGET', wf_key(wid), 'run')
if cur ~= old then
  return { R.STALE, 'run ' .. old .. ' is not the current run of ' .. wid .. ' (' .. tostring(cur) .. ' is)' }
end
local st = call('HMGET', run_key(old), 'status', 'last_eid', 'wft')
if not st[1] then return { R.STALE, 'run ' .. old .. ' is gone' } end
if (tonumber(st[2]) or 0) ~= seen then
  return { R.STALE, 'run ' .. old .. ' has events it did not have when its history was read' }
end
-- (what a task in flight buffers would be lost with the old run)
if st[1] == RS.RUNNING and st[3] == WT.STARTED then
  return { R.STALE, 'a workflow task of run ' .. old .. ' is in flight' }
end
-- the lists, checked whole before anything is written
local at, events, acts, timers, updates = 12, {}, {}, {}, {}
local n = num(ARGV[at], 'event count', 0)
local function str(v) return type(v) == 'string' and v ~= '' end
for i = 1, n do
  local b = at + (i - 1) * 3
  if not (str(ARGV[b + 1]) and EVCODE[ARGV[b + 1]] and tonumber(ARGV[b + 2]) and str(ARGV[b + 3])) then
    return { R.INVALID, 'bad event ' .. i }
  end
  -- (kept as the caller's string: Lua would print a large number as 1.7e+12)
  events[i] = { ARGV[b + 1], ARGV[b + 2] ~= '0' and ARGV[b + 2] or nil, ARGV[b + 3] }
end
at = at + n * 3 + 1
n = num(ARGV[at], 'activity count', 0)
for i = 1, n do
  local b = at + (i - 1) * 2
  local ok, aux = pcall(cmsgpack.unpack, ARGV[b + 1])
  if not ok or type(aux) ~= 'table' or type(aux[1]) ~= 'number' or type(aux[2]) ~= 'string'
      or not DECLARED[queue_key(aux[2], 'act')] then
    return { R.INVALID, 'bad pending activity' }
  end
  for k = 3, 9 do
    if type(aux[k]) ~= 'number' then return { R.INVALID, 'bad pending activity' } end
  end
  if not str(ARGV[b + 2]) then return { R.INVALID, 'bad pending activity' } end
  acts[i] = { aux, ARGV[b + 2] }
end
at = at + n * 2 + 1
n = num(ARGV[at], 'timer count', 0)
for i = 1, n do
  local b = at + (i - 1) * 2
  timers[i] = { num(ARGV[b + 1], 'timer seq', 1), num(ARGV[b + 2], 'timer due', 0) }
end
at = at + n * 2 + 1
n = num(ARGV[at], 'update count', 0)
for i = 1, n do
  local id, outcome = ARGV[at + i * 2 - 1], ARGV[at + i * 2]
  if not str(id) or type(outcome) ~= 'string' then return { R.INVALID, 'bad update ' .. i } end
  updates[i] = { id, outcome }
end
if #ARGV ~= at + n * 2 then return { R.INVALID, 'arguments past the lists' } end
-- the old run's open updates that go on in the new one: its close does not fail them,
-- their callers follow the record to the new run (handle._await_update)
local moved = {}
for _, u in ipairs(updates) do
  if u[2] == '' and call('HGET', upd_key(old), u[1]) == R.ACCEPTED then moved[#moved + 1] = u[1] end
end
-- checked: nothing below can fail
for _, id in ipairs(moved) do
  call('HSET', upd_key(old), id, R.MOVED, id .. ':o', new)
  call('XADD', CLOSED, 'MAXLEN', '~', 10000, '*', 'update', old .. ':' .. id)  -- (wakes its callers)
end
local link = call('HMGET', run_key(old), 'chain', 'parent', 'sched')
-- a child's execution stays its parent's child in the new run, and the old run's end is
-- not its end: the old run's link goes before it closes, so that its close reports nothing
if link[2] then call('HDEL', run_key(old), 'parent') end
if st[1] == RS.RUNNING then
  close_run(old, RS.TERMINATED, EV.WORKFLOW_EXECUTION_TERMINATED, term_body, retention)
end
create_run(wid, new, wtype, tq, start_body, timeout, true, false)
-- the chain the old run belonged to goes on in the new one: a handle on it follows
call('HSET', run_key(new), 'chain', link[1] or old)
if link[2] then call('HSET', run_key(new), 'parent', link[2]) end
if link[3] then call('HSET', run_key(new), 'sched', link[3]) end
for _, e in ipairs(events) do
  append(new, wid, e[1], e[3], e[2])
  if e[1] == EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED then call('HSET', run_key(new), 'cancel_req', 'reset') end
end
local ak = act_key(new)
for _, a in ipairs(acts) do
  local aux = a[1]
  local s = { att = 1, tq = aux[2], stc = aux[3], s2c = aux[4], hbt = aux[5],
    max = aux[6], ii = aux[7], bc = aux[8], mi = aux[9], sched = NOW, due = NOW }
  act_dispatch(new, tostring(aux[1]), s, a[2])
  if s.s2c > 0 then call('ZADD', TIMERS, NOW + s.s2c, tmember(TK.SCHEDULE_TO_CLOSE, new, tostring(aux[1]))) end
end
for _, t in ipairs(timers) do
  call('HSET', ak, 'timer:' .. t[1], t[2])
  call('ZADD', TIMERS, t[2], tmember(TK.USER_TIMER, new, t[1]))
end
for _, u in ipairs(updates) do
  if u[2] == '' then
    call('HSET', upd_key(new), u[1], R.ACCEPTED)
  else
    call('HSET', upd_key(new), u[1], R.DONE, u[1] .. ':o', u[2])
  end
end
note_messages(new)  -- (copied and re-applied signals and updates among its events)
return { R.OK, new }
