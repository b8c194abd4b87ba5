-- Shared prelude of the rillflow function library (see scripts.py): the generated
-- constant tables (EV, RS, WT, AS, CMD, TK, R: see model.py) and CHECK_KEYS come first,
-- then this, then each script's body as one registered function. All of it runs once,
-- when the library is loaded; a call runs only its function, which starts with
-- begin(KEYS, ARGV).
-- KEYS[1] is the shard's timers zset, KEYS[2] its closed-runs stream, ARGV[1] its key
-- prefix "rf:{ns:S}:". Every key a script touches is declared in KEYS by its caller
-- (protocol.py), as Redis asks, and carries the shard's hash tag, so a call stays in one
-- Redis Cluster slot. A key that depends on state the caller could not see (the sticky
-- stream of the worker that caches a run, the stream of a task message) is used only
-- when the caller declared it; otherwise the script takes a declared way (the shared
-- queue; a message left for the next reader, which finds it stale and drops it).
-- Rule for every script: check everything before the first write (Lua does not roll
-- back), and answer a repeated call (a client retry) as the first one was answered.
local GROUP = 'rf'
-- The largest payload a message carries along so that its reader needs no other read:
-- an outcome in a closed-runs entry (the stream keeps ~10,000 entries), a start event in
-- a run's first task message.
local INLINE_BYTES = 1024
-- A closed run's history of at most this many events and bytes is packed into one
-- value (see pack_history); a larger one stays a stream: packing it would hold Redis up,
-- and saves nothing that matters next to its size.
local PACK_HISTORY_EVENTS = 512
local PACK_HISTORY_BYTES = 65536

-- The state of the call in progress. Redis runs one call at a time, and begin() sets
-- all of it before anything reads it.
-- NOW: Redis's clock in ms, the only clock that decides anything. NOW_US: the same in
-- microseconds as a string, unique to this call (fences are made of it). NOW_MS: NOW as
-- a string, as event times are written.
local P, TIMERS, CLOSED, DECLARED, NOW, NOW_US, NOW_MS
-- LAST[run]: a run's last event id as this call knows it (read with the run's hash, or
-- counted by append); DIRTY[run]: the run hash does not have it yet. The next write of
-- the run hash through hset_run carries it, and finish() writes what no such write did:
-- a call writes it once, not once per event it appends. BYTES[run]: the bytes of its
-- events' bodies (`hbytes`, written with `last_eid`; false for a run from before it was
-- counted). FRESH_*: the last event this call appended (of any run), kept as plain
-- values (a table per event would cost more than the read it saves).
local LAST, DIRTY, BYTES
local FRESH_RUN, FRESH_ID, FRESH_TYPE, FRESH_T, FRESH_BODY

-- Every Redis command of the scripts goes through `call`. With CHECK_KEYS (the test
-- suite and the chaos run turn it on) a command on a key its caller did not declare is
-- an error, so a missing declaration cannot hide behind a single-node server.
-- (redis.call exists only while a function runs, not while the library loads.)
local call
local function checked_call(cmd, ...)
  local args = { ... }
  local first, last = 1, 1
  if cmd == 'XINFO' or cmd == 'MEMORY' then first, last = 2, 2
  elseif cmd == 'DEL' or cmd == 'EXISTS' then last = #args end
  for i = first, last do
    if not DECLARED[args[i]] then
      error('rillflow: ' .. cmd .. ' on a key the caller did not declare: ' .. tostring(args[i]))
    end
  end
  return redis.call(cmd, ...)
end

local function begin(keys, argv)
  call = CHECK_KEYS and checked_call or redis.call
  P, TIMERS, CLOSED = argv[1], keys[1], keys[2]
  LAST, DIRTY, BYTES = {}, {}, {}
  FRESH_RUN = nil
  DECLARED = {}
  for i = 1, #keys do DECLARED[keys[i]] = true end
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  NOW_US = t[1] .. string.format('%06d', tonumber(t[2]))
  NOW_MS = string.format('%.0f', NOW)
end

local function run_key(run) return P .. 'run:' .. run end
local function hist_key(wid, run) return P .. 'h:' .. wid .. ':' .. run end
local function hist_packed_key(run) return P .. 'hc:' .. run end
local function act_key(run) return P .. 'act:' .. run end
local function buf_key(run) return P .. 'buf:' .. run end
local function wf_key(wid) return P .. 'wf:' .. wid end
local function sig_key(wid) return P .. 'wsig:' .. wid end
-- a run's own signal ids, as releases before wsig kept them: read and expired while such
-- runs remain (see signal_is_new)
local function run_sig_key(run) return P .. 'sig:' .. run end
local function upd_key(run) return P .. 'upd:' .. run end
local function queue_key(tq, kind) return P .. 'q:' .. tq .. ':' .. kind end
-- effects on other executions, maybe of other shards (see outbox_apply and outbox_done)
local function outbox_key() return P .. 'outbox' end
-- what lists runs (client.list_workflows): every retained run by its start time, the
-- running ones by theirs, the closed ones by when their keys expire (see idx_trim)
local function idx_key(what) return P .. 'idx:' .. what end
-- the shard's schedules: `due` (when the evaluator looks at each next) and `fin` (the
-- executions of each that closed since it last looked), written when a scheduled run closes
local function sched_key(what) return P .. 'sched:' .. what end
-- one schedule's hash, and its `open`, `buf` and `log` (see keyspace.py)
local function schedule_key(sid, part) return P .. 'schedule:' .. sid .. (part and (':' .. part) or '') end
-- how many entries a schedule's log keeps (describe shows its last runs and skips)
local SCHEDULE_LOG = 200
-- a score of a schedule in `sched:due` that never comes: paused, or nothing ahead
local SCHEDULE_NEVER = 253402300800000  -- year 10000

-- Add an entry (a table: k, a ScheduleAction, and what it names) to a schedule's log.
local function schedule_log(sid, entry)
  call('LPUSH', schedule_key(sid, 'log'), cmsgpack.pack(entry))
  call('LTRIM', schedule_key(sid, 'log'), 0, SCHEDULE_LOG - 1)
end

-- An argument that must be a number of at least `min`: checked before a script's first
-- write, so a bad call fails whole (a script error after a write would leave half).
local function num(v, what, min)
  local n = tonumber(v)
  if not n or n ~= n or (min and n < min) then
    error('rillflow: ' .. what .. ' must be a number' .. (min and (' >= ' .. min) or '') .. ', got ' .. tostring(v))
  end
  return n
end

-- A member of the timers zset: "<kind>|<run>|..." (kinds in TK).
local function tmember(kind, run, a, b)
  local m = kind .. '|' .. run
  if a ~= nil then m = m .. '|' .. a end
  if b ~= nil then m = m .. '|' .. b end
  return m
end

-- ZREM in chunks: unpack() of a very long list would overflow Lua's C stack.
local function zrem_all(members)
  for i = 1, #members, 500 do
    call('ZREM', TIMERS, unpack(members, i, math.min(i + 499, #members)))
  end
end

local function split(s, sep)
  local parts = {}
  for p in string.gmatch(s, '[^' .. sep .. ']+') do parts[#parts + 1] = p end
  return parts
end

-- A workflow task's completion is remembered on the run hash as
-- wft_done = "<fence>|<reply>|<last event id>|<seqs>[|<call>]" (seqs: the activities it
-- handed to its worker, as seq_ranges writes them; call: a speculative task's, see
-- wft_complete, which has no fence of its own to be known by), so that a repeat of the
-- same completion (a client retry after a dropped connection) gets the same answer and
-- no second effect. Short: a run hash value over 64 bytes would cost the hash its
-- compact encoding for good.
local function done_fields(stored)
  local parts, from = {}, 1
  while true do
    local at = string.find(stored, '|', from, true)
    if not at then
      parts[#parts + 1] = string.sub(stored, from)
      return parts
    end
    parts[#parts + 1] = string.sub(stored, from, at - 1)
    from = at + 1
  end
end

-- Sequence numbers (ascending) as "<first>[-<last>],...": the activities a task
-- schedules are mostly consecutive. seq_list reads them back.
local function seq_ranges(seqs)
  local items, i = {}, 1
  while i <= #seqs do
    local j = i
    while seqs[j + 1] and tonumber(seqs[j + 1]) == tonumber(seqs[j]) + 1 do j = j + 1 end
    items[#items + 1] = (j == i) and tostring(seqs[i]) or (seqs[i] .. '-' .. seqs[j])
    i = j + 1
  end
  return table.concat(items, ',')
end

local function seq_list(text)
  local out = {}
  for _, item in ipairs(split(text or '', ',')) do
    local from, to = string.match(item, '^(%d+)%-?(%d*)$')
    from = tonumber(from)
    if from then
      for q = from, tonumber(to) or from do out[#out + 1] = tostring(q) end
    end
  end
  return out
end

local function done_string(fence, reply, last, seqs, call_id)
  local s = fence .. '|' .. reply .. '|' .. last .. '|' .. (seqs or '')
  if call_id then s = s .. '|' .. call_id end
  return s
end

-- Returns {reply, last, seqs, fence} when `stored` is the record of `fence`'s completion
-- (or, fence nil, of the speculative call `call_id`, see wft_complete: no other
-- worker's call, nor a later run of the same message, is taken for a repeat), else nil.
local function done_record(stored, fence, call_id)
  if not stored then return nil end
  if fence and string.sub(stored, 1, #fence + 1) ~= fence .. '|' then return nil end
  local p = done_fields(stored)
  if not fence and (not call_id or p[5] ~= call_id) then return nil end
  return { p[2], tonumber(p[3]) or 0, p[4] or '', p[1] }
end

-- The run a client names: the given run id, or ('' given) the execution's current run
-- ('' if there is none, or if the given run belongs to another execution). nil when its
-- keys are not the ones the caller declared (another run became current since the caller
-- looked): the script answers R.REROUTE then, having written nothing, and the caller
-- looks again.
local function client_run(wid, run)
  if run == '' then
    run = call('HGET', wf_key(wid), 'run') or ''
  elseif DECLARED[run_key(run)] then
    local owner = call('HGET', run_key(run), 'wid')
    if owner and owner ~= wid then return '' end
  end
  if run ~= '' and not DECLARED[run_key(run)] then return nil end
  return run
end

-- Remove a task message for good: XACK + XDEL keep a task stream's length equal to
-- its backlog plus tasks in flight. A message on a stream the caller did not declare is
-- dropped by the next pump instead: a member of the timers zset, due now, names it.
local function drop_msg(stream, id, run)
  if not (stream and stream ~= '' and id and id ~= '') then return end
  if DECLARED[stream] then
    call('XACK', stream, GROUP, id)
    call('XDEL', stream, id)
  elseif run and string.sub(stream, 1, #P) == P then
    call('ZADD', TIMERS, NOW, tmember(TK.MESSAGE_DROP, run, id, string.sub(stream, #P + 1)))
  end
end

-- What a read of the run hash said its last event id and history bytes are (unless this
-- call moved them on).
local function knew(run, last_eid, hbytes)
  if LAST[run] == nil and last_eid then
    LAST[run] = tonumber(last_eid)
    BYTES[run] = tonumber(hbytes) or false
  end
end

-- HSET on a run hash, with the run's last event id and history bytes if this call
-- appended to it.
local function hset_run(run, ...)
  if DIRTY[run] then
    DIRTY[run] = nil
    if BYTES[run] then return call('HSET', run_key(run), 'last_eid', LAST[run], 'hbytes', BYTES[run], ...) end
    return call('HSET', run_key(run), 'last_eid', LAST[run], ...)
  end
  return call('HSET', run_key(run), ...)
end

-- The end of every call (see scripts.py): what no hset_run carried.
local function finish()
  for run in pairs(DIRTY) do
    if BYTES[run] then
      call('HSET', run_key(run), 'last_eid', LAST[run], 'hbytes', BYTES[run])
    else
      call('HSET', run_key(run), 'last_eid', LAST[run])
    end
  end
end

-- Append one event to a run's history; the stream id is "<event_id>-0".
local function append(run, wid, etype, body, t)
  local eid = LAST[run]
  if eid == nil then
    local r = call('HMGET', run_key(run), 'last_eid', 'hbytes')
    eid = tonumber(r[1]) or 0
    BYTES[run] = tonumber(r[2]) or false
  end
  eid = eid + 1
  LAST[run], DIRTY[run] = eid, true
  if BYTES[run] then BYTES[run] = BYTES[run] + #body end
  local id = eid .. '-0'
  t = t or NOW_MS
  call('XADD', hist_key(wid, run), id, 'type', etype, 't', t, 'd', body)
  FRESH_RUN, FRESH_ID, FRESH_TYPE, FRESH_T, FRESH_BODY = run, id, etype, t, body
  return eid
end

-- Queue a workflow task: on the sticky stream of the worker that holds the run in its
-- cache, if there is one and the caller declared it (moved to the shared stream by a
-- sticky timer unless that worker starts it in time), else on the task queue's shared
-- stream (a cache miss costs a replay, never a lost task).
local function schedule_wft(run, tq)
  local rk = run_key(run)
  local st = call('HMGET', rk, 'sticky', 'sticky_ms', 'wid')
  local q = queue_key(tq, 'wft')
  local sticky = st[1] and st[1] ~= '' and queue_key(tq, 'wft@' .. st[1])
  local unstick = {}
  if sticky and DECLARED[sticky] then
    q = sticky
  elseif sticky then
    sticky = nil
    unstick = { 'sticky', '' }
  end
  local id = call('XADD', q, '*', 'run', run, 'wid', st[3])
  hset_run(run, 'wft', WT.SCHEDULED, 'wft_msg', id, 'wft_q', q, unpack(unstick))
  if sticky then
    call('ZADD', TIMERS, NOW + tonumber(st[2]), tmember(TK.STICKY_FALLBACK, run, id))
  end
  return id
end

-- Move events that arrived while a workflow task was in flight into the history.
local function flush_buffer(run, wid)
  local k = buf_key(run)
  local items = call('LRANGE', k, 0, -1)
  if #items == 0 then return 0 end
  for i = 1, #items, 3 do
    append(run, wid, items[i], items[i + 2], items[i + 1])
  end
  call('DEL', k)
  return #items / 3
end

-- Whether a signal, an update or a cancel request is waiting in the buffer: a run must
-- not close without seeing it. `updates_only`: for a run that continues as new, which
-- carries its signals over to the next run (an update is answered by the run that
-- accepted it, a cancel request by the run it was made to).
local function message_buffered(run, updates_only)
  local items = call('LRANGE', buf_key(run), 0, -1)
  for i = 1, #items, 3 do
    if items[i] == EV.WORKFLOW_EXECUTION_UPDATE_ACCEPTED or items[i] == EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED
        or (items[i] == EV.WORKFLOW_EXECUTION_SIGNALED and not updates_only) then
      return true
    end
  end
  return false
end

-- The run hash fields a workflow task's start reads (and deliver), in this order.
local TASK_FIELDS = { 'status', 'wft', 'wft_msg', 'wid', 'wtype', 'last_eid', 'start_ms', 'wft_failures',
  'wft_by', 'wft_fence', 'wft_start_ms', 'wft_done', 'wft_seq', 'tq', 'sticky', 'hbytes' }

-- What a speculative task's completion reads of its run: TASK_FIELDS, then what
-- close_run needs too (built here, once, when the library loads).
local SPEC_FIELDS = {}
for i = 1, #TASK_FIELDS do SPEC_FIELDS[i] = TASK_FIELDS[i] end
SPEC_FIELDS[#SPEC_FIELDS + 1] = 'wft_q'
SPEC_FIELDS[#SPEC_FIELDS + 1] = 'msgs'
SPEC_FIELDS[#SPEC_FIELDS + 1] = 'parent'
SPEC_FIELDS[#SPEC_FIELDS + 1] = 'sched'

-- Start the run's workflow task for `w.worker` (r: its TASK_FIELDS), or, `again`, answer
-- the start that worker already has the same way. The fence is "<attempt number>-<start
-- time in us>": after a Redis rollback the attempt number may repeat but the time does
-- not, so a fence from before the rollback is never current again. The events returned
-- follow `w.since`, the last event the worker's cached instance applied, if `w.seen` (the
-- fence of the completion that brought it there) is the completion Redis last recorded;
-- else (a rollback; another worker's completion) they follow 0: the whole history, from
-- which the instance must be rebuilt. Returns {R.OK, fence, start time, wid, wtype, last
-- event id, run start ms, events, attempt, since, history bytes (-1: not counted)}.
local function start_task(run, r, again, w)
  local fence, started = r[10], tonumber(r[11])
  if not again then
    local n = (tonumber(r[13]) or 0) + 1
    fence = n .. '-' .. NOW_US
    started = NOW
    hset_run(run, 'wft', WT.STARTED, 'wft_start_ms', NOW, 'wft_by', w.worker, 'wft_fence', fence, 'wft_seq', n)
    call('ZADD', TIMERS, NOW + w.timeout, tmember(TK.TASK_TIMEOUT, run, fence))
  end
  local last, since = LAST[run] or tonumber(r[6]), w.since
  local rec = w.seen ~= '' and done_record(r[12], w.seen)
  if since > last or not rec or rec[1] ~= R.OK then since = 0 end
  -- the one event the worker lacks is the one this call appended (an outcome that woke
  -- the run, in act_done): no need to read it back
  local events
  if since == last - 1 and FRESH_RUN == run and FRESH_ID == last .. '-0' then
    events = { { FRESH_ID, { 'type', FRESH_TYPE, 't', FRESH_T, 'd', FRESH_BODY } } }
  else
    events = call('XRANGE', hist_key(r[4], run), (since + 1) .. '-0', '+', 'COUNT', w.max_events)
  end
  local hbytes = BYTES[run]
  if hbytes == nil then hbytes = tonumber(r[16]) end
  return { R.OK, fence, started, r[4], r[5], last, tonumber(r[7]), events, (tonumber(r[8]) or 0) + 1, since,
    hbytes or -1 }
end

-- An event the workflow must see: buffered while a task is started, otherwise
-- appended, with a workflow task scheduled unless one already is (or is backing off).
-- `eager` (or nil): the worker reporting the event, which takes the workflow task at
-- once if it caches the run (it ran its last task), as {worker, timeout, max_events,
-- since, seen} (see start_task): then that task's start is returned, and no task message
-- is written. `r` (or nil): the run's TASK_FIELDS, if the caller read them (and changed
-- none since, but by append). Returns nil when the run is not running, else that start
-- or true.
local function deliver(run, etype, body, eager, r)
  r = r or call('HMGET', run_key(run), unpack(TASK_FIELDS))
  if r[1] ~= RS.RUNNING then return nil end
  knew(run, r[6], r[16])
  if r[2] == WT.STARTED then
    call('RPUSH', buf_key(run), etype, NOW, body)
    -- the task that closes the run looks for buffered messages only when this is set
    if etype == EV.WORKFLOW_EXECUTION_SIGNALED or etype == EV.WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        or etype == EV.WORKFLOW_EXECUTION_CANCEL_REQUESTED then
      hset_run(run, 'msgbuf', 1)
    end
  else
    append(run, r[4], etype, body)
    if r[2] ~= WT.SCHEDULED and r[2] ~= WT.BACKOFF then
      if eager and r[15] == eager.worker then return start_task(run, r, false, eager) end
      schedule_wft(run, r[14])
    end
  end
  return true
end

-- Why a start's arguments cannot make a run (nil: they can). Reads nothing.
local function start_invalid(wid, run, wtype, tq, timeout)
  -- NaN fails every comparison: `timeout ~= timeout` catches it before anything is written
  if not timeout or timeout ~= timeout or timeout <= 0 or timeout > MAX_DURATION_MS then
    return 'execution timeout must be a positive number of ms, at most ten years'
  end
  if wid == '' or run == '' or wtype == '' or tq == '' then return 'empty id, type or queue' end
  return nil
end

-- Make `run` its execution's current run, started with `body` (checked by the caller: no
-- run of the execution is running; `had_run`: the execution's hash exists, an earlier
-- run's bookkeeping, with its expiry: it goes, so the new run's record never expires),
-- and queue its first workflow task. A new run has no worker caching it: the task goes
-- to the shared stream. With `inline`, a small start event travels with it, so that a
-- worker can run the task at once and record its start and completion in one call (a
-- speculative task: see wft_complete); not when the caller appends more events at once.
local function create_run(wid, run, wtype, tq, body, timeout, had_run, inline)
  local wk = wf_key(wid)
  if had_run then
    call('DEL', wk)
    -- the execution's recent signal ids outlive its runs (see signal_is_new); this run's
    -- close expires them again
    if call('PERSIST', sig_key(wid)) == 1 then call('HSET', run_key(run), 'msgs', 1) end
  end
  call('HSET', wk, 'run', run, 'status', RS.RUNNING)
  call('ZADD', idx_key('start'), NOW, run)
  call('ZADD', idx_key('open'), NOW, run)
  knew(run, 0, 0)
  append(run, wid, EV.WORKFLOW_EXECUTION_STARTED, body)
  local q = queue_key(tq, 'wft')
  local msg
  if inline and #body <= INLINE_BYTES then
    msg = call('XADD', q, '*', 'run', run, 'wid', wid, 'wtype', wtype, 't', NOW, 'ev', body)
  else
    msg = call('XADD', q, '*', 'run', run, 'wid', wid)
  end
  hset_run(run, 'wid', wid, 'wtype', wtype, 'tq', tq, 'status', RS.RUNNING, 'start_ms', NOW, 'wft_seq', 0,
    'deadline_ms', NOW + timeout, 'wft', WT.SCHEDULED, 'wft_msg', msg, 'wft_q', q)
  call('ZADD', TIMERS, NOW + timeout, tmember(TK.EXECUTION_TIMEOUT, run))
end

-- Whether request id `rid` of a signal to execution `wid` is new (and now recorded): an
-- id the execution saw within the last hour (and among its last 10,000), whichever of its
-- runs got it, is not delivered twice, so a client may retry a signal (or a
-- signal_with_start) it is unsure of even after that run closed; older ids are
-- forgotten, so the record does not grow with every signal. '' (no id) is always new.
-- `run`: the run it goes to, whose own record (run_sig_key) a client of an earlier
-- release may have written the id to before retrying through this one.
-- Whether request id `rid` was delivered to execution `wid` lately (reads only).
local function signal_seen(wid, rid, run)
  if rid == '' then return false end
  if run and run ~= '' and call('ZSCORE', run_sig_key(run), rid) then return true end
  return call('ZSCORE', sig_key(wid), rid) ~= false
end

local function signal_is_new(wid, rid, run)
  if rid == '' then return true end
  if run and run ~= '' and call('ZSCORE', run_sig_key(run), rid) then return false end
  local sk = sig_key(wid)
  if call('ZADD', sk, 'NX', NOW, rid) == 0 then return false end
  call('ZREMRANGEBYSCORE', sk, '-inf', NOW - 3600000)
  call('ZREMRANGEBYRANK', sk, 0, -10001)
  return true
end

-- Record an update's outcome where its callers look: the run's update hash (for any
-- caller, while the run is retained), and an entry in the shard's closed stream that
-- wakes the callers' watchers.
local function finish_update(run, id, body)
  call('HSET', upd_key(run), id, R.DONE, id .. ':o', body)
  call('XADD', CLOSED, 'MAXLEN', '~', 10000, '*', 'update', run .. ':' .. id)
end

-- Set on the run hash when a signal or an update reaches it: only then does closing
-- the run touch their keys, so runs without messages pay nothing for them. `unseen`
-- stays until a completed workflow task has seen every message (record_task): an
-- update's validator must not run on a state that lacks one (update.lua).
local function note_messages(run)
  call('HSET', run_key(run), 'msgs', 1, 'unseen', 1)
end

-- (the packed history is written with its expiry; an act hash folded away is gone)
local function expire_run(run, wid, retention_ms, msgs, packed, folded)
  local keys = { run_key(run) }
  if not packed then keys[#keys + 1] = hist_key(wid, run) end
  if not folded then keys[#keys + 1] = act_key(run) end
  if msgs then
    keys[#keys + 1] = sig_key(wid)
    keys[#keys + 1] = run_sig_key(run)
    keys[#keys + 1] = upd_key(run)
  end
  for _, k in ipairs(keys) do
    call('PEXPIRE', k, retention_ms)
  end
  call('PEXPIRE', wf_key(wid), retention_ms)
end

-- Per-activity state lives in the run's act hash: field <seq> is a msgpack map of
-- numbers and short strings (never user payloads), <seq>:b the scheduled event body
-- (opaque to Lua), <seq>:hb the last heartbeat details, <seq>:f the last failure,
-- <seq>:d the answer given to the completion that ended it (so a repeat gets it too).
-- A pending workflow timer is field timer:<seq> (its due time), so closing a run can
-- remove every timer it still has.
local function act_get(run, seq)
  local raw = call('HGET', act_key(run), seq)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

local function act_put(run, seq, s)
  call('HSET', act_key(run), seq, cmsgpack.pack(s))
end

local function act_members(run, seq, s)
  return tmember(TK.ACTIVITY_DEADLINE, run, seq, s.att), tmember(TK.ACTIVITY_RETRY, run, seq, s.att),
    tmember(TK.SCHEDULE_TO_CLOSE, run, seq)
end

local function act_forget(run, seq, s)
  call('HDEL', act_key(run), seq, seq .. ':b', seq .. ':hb', seq .. ':f')
  call('ZREM', TIMERS, act_members(run, seq, s))
end

-- A closed run's history, packed into one msgpack value at hc:<run> in place of
-- its stream: a stream costs Redis about 4 KB however short it is (its first node is
-- allocated whole), the packed value what its events weigh. The value is {2, time of
-- event 1 (ms), {type code, ms after event 1, body, ...}}: event ids run 1, 2, 3, ...
-- (a history has no gaps), a type is its position in model.EVENT_CODES. (The first
-- packed form, {{event id, type, time, body}, ...}, is read as well.) Nothing is
-- appended to a closed run, so the value is final.
local function pack_history(run, wid, last_eid, retention_ms)
  if last_eid > PACK_HISTORY_EVENTS then return false end
  local hk = hist_key(wid, run)
  local size = BYTES[run] or call('MEMORY', 'USAGE', hk, 'SAMPLES', 0) or 0
  if size > PACK_HISTORY_BYTES then return false end
  local entries = call('XRANGE', hk, '-', '+')
  local flat, t0 = {}, nil
  for i, e in ipairs(entries) do
    local f = {}
    for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
    local t = tonumber(f.t)
    t0 = t0 or t
    -- (ids in order from 1, and known types: else the stream stays as it is)
    if tonumber(string.match(e[1], '^(%d+)')) ~= i or not EVCODE[f.type] then return false end
    flat[#flat + 1] = EVCODE[f.type]
    flat[#flat + 1] = t - t0
    flat[#flat + 1] = f.d
  end
  call('SET', hist_packed_key(run), cmsgpack.pack({ 2, t0 or 0, flat }), 'PX', retention_ms)
  return true  -- (the caller deletes the stream)
end

-- A closed run's act hash holds no state, only the answers act_done gave (<seq>:d), kept
-- so that a repeat of one gets it again. When they are few, they are folded into the run
-- hash as acts_d = "<seq>[-<last seq>].<attempt>.<answer>,..." (consecutive activities
-- with the same attempt and answer share one item; short, so the hash stays compact)
-- and the act hash goes: it costs more than its content. Returns the value or nil.
local FOLD_BYTES = 48
local function fold_answers(fields)
  local answers = {}
  for i = 1, #fields, 2 do
    local seq = tonumber(string.match(fields[i], '^(%d+):d$'))
    if not seq then return nil end
    local d = split(fields[i + 1], '|')
    answers[#answers + 1] = { seq, d[1] .. '.' .. d[2] }
  end
  table.sort(answers, function(x, y) return x[1] < y[1] end)
  local items, first = {}, 1
  for i = 1, #answers do
    local a, nxt = answers[i], answers[i + 1]
    if not (nxt and nxt[1] == a[1] + 1 and nxt[2] == a[2]) then
      local from = answers[first][1]
      items[#items + 1] = (from == a[1] and from or (from .. '-' .. a[1])) .. '.' .. a[2]
      first = i + 1
    end
  end
  local folded = table.concat(items, ',')
  if #folded > FOLD_BYTES then return nil end
  return folded
end

-- The answer act_done gave for attempt `att` of activity `seq` of a closed run whose
-- answers were folded, as {attempt, answer} (or {} if it gave none).
local function folded_answer(run, seq, att)
  local folded = call('HGET', run_key(run), 'acts_d')
  seq = tonumber(seq)
  for _, item in ipairs(split(folded or '', ',')) do
    local from, to, a, answer = string.match(item, '^(%d+)%-?(%d*)%.(%d+)%.(%a+)$')
    from = tonumber(from)
    to = tonumber(to) or from
    if from and seq >= from and seq <= to and tonumber(a) == att then return { a, answer } end
  end
  return {}
end

-- A parent run `run` of execution `wid` closes (`status`) while its child `seq` (the
-- record `s`, see record_task) runs: the parent close policy is applied through the
-- outbox. A child whose start is not answered yet is seen to by outbox_done instead.
local function apply_close_policy(wid, run, seq, s, status)
  if s.st ~= AS.STARTED or s.pol == PCP.ABANDON then return end
  local why = 'the parent ' .. wid .. ' closed (' .. status .. ') and its parent close policy is ' .. s.pol
  call('XADD', outbox_key(), '*', 'kind', s.pol == PCP.TERMINATE and OB.TERMINATE or OB.CANCEL, 'wid', wid,
    'run', run, 'seq', seq, 'cwid', s.wid, 'crun', s.run, 'd', cmsgpack.pack({ reason = why }))
end

-- The run hash fields close_run reads, in this order.
local CLOSE_FIELDS = { 'wid', 'wft_q', 'wft', 'wft_msg', 'msgs', 'wft_fence', 'last_eid', 'hbytes', 'parent',
  'sched' }

-- What a started task's completion reads of its run, in this order.
local COMPLETE_FIELDS = { 'status', 'wft', 'wft_fence', 'wid', 'wft_msg', 'wft_start_ms', 'wft_q', 'msgbuf',
  'wft_done', 'wft_failures', 'last_eid', 'msgs', 'hbytes', 'unseen', 'parent', 'sched' }

-- Where each of the fields `want` sits in an HMGET of the fields `have`, worked out when
-- the library loads (a field `have` lacks fails the load, not a call), so that a caller
-- hands close_run what it already read (pick) in close_run's order.
local function positions(have, want)
  local at, out = {}, {}
  for i = 1, #have do at[have[i]] = i end
  for i = 1, #want do
    out[i] = at[want[i]]
    if not out[i] then error('rillflow: ' .. want[i] .. ' is not among the fields read') end
  end
  return out
end
local CLOSE_FROM_SPEC = positions(SPEC_FIELDS, CLOSE_FIELDS)
local CLOSE_FROM_COMPLETE = positions(COMPLETE_FIELDS, CLOSE_FIELDS)

local function pick(r, at)
  local out = {}
  for i = 1, #at do out[i] = r[at[i]] end
  return out
end

-- Close a run: the closing event, the outcome for result-waiters, the closed-runs
-- stream they block on, the retention clock, and every timer it still had. `extra`:
-- more fields for the run hash (the caller's record of the call). `r` (or nil): the
-- run's CLOSE_FIELDS, if the caller read them in this call. Returns the closing event's
-- id.
local function close_run(run, status, etype, body, retention_ms, extra, r)
  local rk = run_key(run)
  r = r or call('HMGET', rk, unpack(CLOSE_FIELDS))
  local wid = r[1]
  -- A running run is its execution's current run: start refuses an id whose current run
  -- is running, and every run closes here (the suite and the chaos run check it, before
  -- anything is written).
  if CHECK_KEYS and call('HGET', wf_key(wid), 'run') ~= run then
    error('rillflow: closing run ' .. run .. ', which is not the current run of ' .. wid)
  end
  knew(run, r[7], r[8])
  local eid = append(run, wid, etype, body)
  if r[3] == WT.SCHEDULED or r[3] == WT.STARTED then drop_msg(r[2], r[4], run) end
  call('HSET', wf_key(wid), 'status', status)
  call('ZREM', idx_key('open'), run)
  call('ZADD', idx_key('exp'), NOW + retention_ms, run)
  local gone = { tmember(TK.EXECUTION_TIMEOUT, run), tmember(TK.TASK_RETRY, run) }
  if r[6] then gone[#gone + 1] = tmember(TK.TASK_TIMEOUT, run, r[6]) end
  if r[4] and r[4] ~= '' then gone[#gone + 1] = tmember(TK.STICKY_FALLBACK, run, r[4]) end
  local acts = call('HGETALL', act_key(run))
  -- what a closed run's act hash no longer needs (its activities and timers in flight)
  -- goes; what stays is act_done's answers and the records outbox_done still reads
  local stale, kept = {}, {}
  for i = 1, #acts, 2 do
    local f = acts[i]
    if string.sub(f, 1, 6) == 'timer:' then
      gone[#gone + 1] = tmember(TK.USER_TIMER, run, string.sub(f, 7))
      stale[#stale + 1] = f
    elseif not string.find(f, ':', 1, true) then
      local s = cmsgpack.unpack(acts[i + 1])
      local a, b, c = act_members(run, f, s)
      gone[#gone + 1] = a
      gone[#gone + 1] = b
      gone[#gone + 1] = c
      drop_msg(queue_key(s.tq, 'act'), s.msg, run)
      stale[#stale + 1] = f
    elseif string.find(f, '^%d+:h?[bf]$') then
      stale[#stale + 1] = f
    else
      if string.sub(f, 1, 6) == 'child:' then
        apply_close_policy(wid, run, string.sub(f, 7), cmsgpack.unpack(acts[i + 1]), status)
      end
      kept[#kept + 1] = f
      kept[#kept + 1] = acts[i + 1]
    end
  end
  local folded = #acts > 0 and (#kept == 0 and '' or fold_answers(kept))
  if #stale > 0 and not folded then
    for i = 1, #stale, 500 do call('HDEL', act_key(run), unpack(stale, i, math.min(i + 499, #stale))) end
  end
  zrem_all(gone)
  -- a child's execution tells its parent how it ended (the chain's last run does: a run
  -- that continues as new hands the link on to the next)
  if r[9] and status ~= RS.CONTINUED_AS_NEW then
    local p = split(r[9], '|')
    call('XADD', outbox_key(), '*', 'kind', OB.CHILD_CLOSED, 'wid', p[3], 'run', p[2], 'seq', p[1], 'cwid', wid,
      'crun', run, 'status', status, 'd', body)
  end
  -- a schedule's execution ended: its schedule looks again now (its overlap policy may
  -- start a waiting due time; pause_on_failure reads how it ended)
  -- (a schedule deleted since is not written to)
  if r[10] and status ~= RS.CONTINUED_AS_NEW and call('ZSCORE', sched_key('due'), r[10]) then
    local fin = call('HGET', sched_key('fin'), r[10])
    call('HSET', sched_key('fin'), r[10], fin and (fin .. ' ' .. wid) or wid)
    call('ZADD', sched_key('due'), 0, r[10])
  end
  -- updates still running will never finish: their callers are told now
  local upd = r[5] and call('HGETALL', upd_key(run)) or {}
  for i = 1, #upd, 2 do
    if upd[i + 1] == R.ACCEPTED then
      finish_update(run, upd[i], cmsgpack.pack({ update_id = upd[i], failure = {
        type = 'WorkflowClosed', non_retryable = true, stack = '',
        message = 'the run closed (' .. status .. ') before the update completed' } }))
    end
  end
  -- a small outcome travels with the entry, so that its waiter needs no read of the run
  if #body <= INLINE_BYTES then
    call('XADD', CLOSED, 'MAXLEN', '~', 10000, '*', 'run', run, 'wid', wid, 'status', status, 'outcome', body)
  else
    call('XADD', CLOSED, 'MAXLEN', '~', 10000, '*', 'run', run, 'wid', wid, 'status', status)
  end
  local packed = pack_history(run, wid, eid, retention_ms)
  local fields = { 'status', status, 'closed_ms', NOW, 'outcome', body }
  local gone_keys = { buf_key(run) }
  if packed then gone_keys[#gone_keys + 1] = hist_key(wid, run) end
  if folded then
    if folded ~= '' then
      fields[#fields + 1] = 'acts_d'
      fields[#fields + 1] = folded
    end
    gone_keys[#gone_keys + 1] = act_key(run)
  end
  call('DEL', unpack(gone_keys))
  -- what routed and fenced its workflow tasks, its deadline and its byte count are of no
  -- use to a closed run (a repeat of the completion that closed it is answered from
  -- wft_done). Removed before the closing fields are written: the hash is then never
  -- larger than its final form, and its allocation fits that form.
  call('HDEL', rk, 'wft', 'wft_msg', 'wft_q', 'wft_start_ms', 'wft_by', 'wft_fence', 'wft_seq', 'sticky',
    'sticky_ms', 'msgbuf', 'deadline_ms', 'hbytes', 'wtc', 'unseen')
  BYTES[run] = false
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  hset_run(run, unpack(fields))
  expire_run(run, wid, retention_ms, r[5], packed, folded)
  return eid
end

-- An attempt's deadline: the earliest of start-to-close, the next heartbeat and
-- schedule-to-close.
local function act_deadline(s)
  local dl = s.started + s.stc
  if s.hbt > 0 and NOW + s.hbt < dl then dl = NOW + s.hbt end
  if s.s2c > 0 and s.sched + s.s2c < dl then dl = s.sched + s.s2c end
  return dl
end

-- Queue an activity attempt; `scheduled` (its ActivityTaskScheduled body) is stored with
-- it the first time.
local function act_dispatch(run, seq, s, scheduled)
  s.msg = call('XADD', queue_key(s.tq, 'act'), '*', 'run', run, 'seq', seq, 'att', s.att)
  s.st = AS.SCHEDULED
  if scheduled then
    call('HSET', act_key(run), seq, cmsgpack.pack(s), seq .. ':b', scheduled)
  else
    act_put(run, seq, s)
  end
end

-- Hand an activity's first attempt straight to `worker`, recorded as started by it: the
-- worker that completed the workflow task scheduling it, which had a free slot. No task
-- message is written, so none is read, started or acknowledged; a worker that dies
-- holding it is found out by the attempt's deadline, as for any started attempt.
local function act_hand_over(run, seq, s, scheduled, worker)
  s.st, s.started, s.by, s.msg = AS.STARTED, NOW, worker, ''
  s.dl = act_deadline(s)
  call('HSET', act_key(run), seq, cmsgpack.pack(s), seq .. ':b', scheduled)
  call('ZADD', TIMERS, s.dl, tmember(TK.ACTIVITY_DEADLINE, run, seq, s.att))
end

-- The activities a completion handed to `worker` (seqs: as its done record has them) that
-- are still that worker's first attempts, as {seq, deadline, ...}: the answer to a repeat.
local function handed_over(run, seqs, worker)
  local out = {}
  for _, seq in ipairs(seq_list(seqs)) do
    local s = act_get(run, seq)
    if s and s.st == AS.STARTED and s.by == worker and s.att == 1 and s.msg == '' then
      out[#out + 1] = tonumber(seq)
      out[#out + 1] = s.dl
    end
  end
  return out
end

-- After a failed or timed-out attempt: retry with exponential backoff while the
-- policy allows and the schedule-to-close deadline is not passed, else fail for good
-- (delivered as deliver does, with `eager`). Returns true when a retry was scheduled,
-- else false and what deliver returned.
local function act_retry_or_fail(run, wid, seq, s, failure_body, non_retryable, final_type, eager, r)
  local ak = act_key(run)
  if failure_body then call('HSET', ak, seq .. ':f', failure_body) end
  local delay = s.ii * (s.bc ^ (s.att - 1))
  if s.mi > 0 and delay > s.mi then delay = s.mi end
  local due = NOW + math.floor(delay)
  local exhausted = (s.max > 0 and s.att >= s.max)
  local past_deadline = (s.s2c > 0 and due >= s.sched + s.s2c)
  call('ZREM', TIMERS, tmember(TK.ACTIVITY_DEADLINE, run, seq, s.att))
  if non_retryable or exhausted or past_deadline then
    act_forget(run, seq, s)
    return false, deliver(run, final_type, failure_body, eager, r)
  end
  append(run, wid, EV.ACTIVITY_TASK_RETRYING, failure_body)
  s.att = s.att + 1
  s.st = AS.BACKOFF
  s.due = due
  s.msg = ''
  act_put(run, seq, s)
  call('ZADD', TIMERS, due, tmember(TK.ACTIVITY_RETRY, run, seq, s.att))
  return true
end

local function timeout_failure(seq, att, kind)
  return cmsgpack.pack({ seq = tonumber(seq), att = att, failure = {
    type = 'ActivityTimeoutError', message = 'activity ' .. kind .. ' timeout',
    timeout_type = kind, non_retryable = false, stack = '' } })
end

-- A workflow task that failed or timed out: the first of a streak is recorded (as
-- `etype`), every one is kept for describe, and the task is retried after a backoff
-- (at once after a first timeout: a crashed worker; then 1 s doubling, capped at 60 s),
-- so a task that always fails or runs long neither spins nor grows the history.
local function wft_backoff(run, wid, etype, body, first_now)
  local rk = run_key(run)
  local n = call('HINCRBY', rk, 'wft_failures', 1)
  if n == 1 then append(run, wid, etype, body) end
  hset_run(run, 'wft_failure', body, 'wft', WT.BACKOFF, 'wft_msg', '', 'sticky', '')
  flush_buffer(run, wid)
  local delay = 1000 * (2 ^ (n - 1))
  if first_now then delay = (n == 1) and 0 or 1000 * (2 ^ (n - 2)) end
  if delay > 60000 then delay = 60000 end
  call('ZADD', TIMERS, NOW + delay, tmember(TK.TASK_RETRY, run))
end

-- The commands of one workflow task's completion, ARGV[at .. at + 4n - 1]: per command
-- its kind (CMD), the event body, an aux msgpack array the script reads, and '1' for an
-- activity the worker takes itself ('' otherwise: see act_hand_over):
--   schedule_activity: seq, task queue, start_to_close, schedule_to_close, heartbeat
--     (ms; 0 = none), max attempts (0 = unlimited), initial interval ms, coefficient,
--     max interval ms
--   start_timer: seq, duration ms; cancel_timer, cancel_activity: seq;
--   complete_update: update id; complete_workflow, fail_workflow, cancel_workflow:
--     nothing, and last;
--   continue_as_new: the next run's id (the body is that run's WorkflowExecutionStarted
--     body: Lua's cmsgpack reads no msgpack bin), and last; record_marker: the marker's
--     id (a MarkerRecorded event: a patch the code took, see workflow.patched());
--   start_child: seq, the child's execution id, its run id (made by the parent, so that
--     a repeated start is known as one), parent close policy (PCP);
--   signal_external: seq, the execution id, its run id ('' = its current run).
-- Reads only: returns the commands, whether they close the run, and why they cannot be
-- applied (nil when they can), so a caller checks a whole batch before its first write.
-- (built at the first call: a library's load has no `pairs`)
local KINDS

local function parse_commands(argv, at, n)
  if not KINDS then
    KINDS = {}
    for _, v in pairs(CMD) do KINDS[v] = true end
  end
  local cmds, closes, invalid = {}, false, nil
  for c = at, at + n * 4 - 1, 4 do
    local kind = argv[c]
    local ok, aux = pcall(cmsgpack.unpack, argv[c + 2])
    local why = nil
    if not KINDS[kind] then why = 'unknown command kind ' .. tostring(kind)
    elseif not ok or type(aux) ~= 'table' then why = 'undecodable command arguments'
    elseif closes then why = 'a command after the closing command'
    elseif kind == CMD.SCHEDULE_ACTIVITY then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'string' or aux[2] == '' then why = 'bad activity' end
      for k = 3, 9 do if type(aux[k]) ~= 'number' then why = 'bad activity options' end end
    elseif kind == CMD.START_TIMER then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'number' or not (aux[2] >= 1 and aux[2] <= MAX_DURATION_MS) then
        why = 'bad timer'
      end
    elseif kind == CMD.CANCEL_TIMER or kind == CMD.CANCEL_ACTIVITY then
      if type(aux[1]) ~= 'number' then why = 'bad sequence number' end
    elseif kind == CMD.COMPLETE_UPDATE then
      if type(aux[1]) ~= 'string' or aux[1] == '' then why = 'bad update id' end
    elseif kind == CMD.CONTINUE_AS_NEW then
      if type(aux[1]) ~= 'string' or aux[1] == '' then why = 'bad next run' end
    elseif kind == CMD.RECORD_MARKER then
      if type(aux[1]) ~= 'string' or aux[1] == '' then why = 'bad marker id' end
    elseif kind == CMD.START_CHILD then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'string' or aux[2] == '' or type(aux[3]) ~= 'string'
          or aux[3] == '' or not (aux[4] == PCP.TERMINATE or aux[4] == PCP.ABANDON or aux[4] == PCP.REQUEST_CANCEL) then
        why = 'bad child workflow'
      end
    elseif kind == CMD.SIGNAL_EXTERNAL then
      if type(aux[1]) ~= 'number' or type(aux[2]) ~= 'string' or aux[2] == '' or type(aux[3]) ~= 'string' then
        why = 'bad external signal'
      end
    end
    if kind == CMD.COMPLETE_WORKFLOW or kind == CMD.FAIL_WORKFLOW or kind == CMD.CONTINUE_AS_NEW
        or kind == CMD.CANCEL_WORKFLOW then
      closes = true
    end
    if why and not invalid then invalid = why end
    cmds[#cmds + 1] = { kind = kind, body = argv[c + 1], aux = aux, eager = argv[c + 3] == '1' }
  end
  return cmds, closes, invalid
end

-- Why the commands cannot be applied to the run as it is, or nil: an update id the run
-- never accepted (its completion would leave an update hash that nothing expires) or one
-- already completed; a next run whose id is taken. Reads only.
local function commands_not_applicable(run, cmds)
  for _, cmd in ipairs(cmds) do
    if cmd.kind == CMD.COMPLETE_UPDATE and call('HGET', upd_key(run), cmd.aux[1]) ~= R.ACCEPTED then
      return 'update ' .. tostring(cmd.aux[1]) .. ' is not an open update of the run'
    elseif cmd.kind == CMD.CONTINUE_AS_NEW and call('EXISTS', run_key(cmd.aux[1])) == 1 then
      return 'the next run id ' .. cmd.aux[1] .. ' is taken'
    end
  end
  return nil
end

-- The most a history may hold (Temporal's limits): a task of a run past either fails
-- the run, with this reason, in place of its commands, so that a history never grows
-- without bound. workflow.should_continue_as_new() turns true well before (executor.py).
local HISTORY_MAX_EVENTS, HISTORY_MAX_BYTES = 51200, 52428800
local function history_over(last_eid, hbytes)
  if (tonumber(last_eid) or 0) >= HISTORY_MAX_EVENTS or (tonumber(hbytes) or 0) >= HISTORY_MAX_BYTES then
    return cmsgpack.pack({ failure = { type = 'HistoryLimitExceeded', non_retryable = true, stack = '',
      message = 'the history reached ' .. tostring(last_eid) .. ' events / ' .. tostring(hbytes or '?')
        .. ' bytes, past the limit of ' .. HISTORY_MAX_EVENTS .. ' events or ' .. HISTORY_MAX_BYTES
        .. ' bytes: continue as new (workflow.continue_as_new) before it grows this long' } })
  end
  return nil
end

-- Close the run as CONTINUED_AS_NEW and start its execution's next run, `next_run`,
-- with `start_body`, in the same call: the execution is never without a running run (the
-- closing event names the next run, and so does the closed-runs entry: result-waiters
-- follow it). The
-- execution timeout covers the whole chain (the next run keeps this one's deadline);
-- the signals that arrived while the closing task ran, and the request ids of those
-- delivered lately, go on to the next run, after its start. `c`: record_task's. Returns
-- the closing event's id.
local function continue_as_new(run, wid, c, next_run, start_body)
  local rk = run_key(run)
  local body = cmsgpack.pack({ next_run_id = next_run })
  local st = call('HMGET', rk, 'deadline_ms', 'wtype', 'chain', 'parent', 'sched')
  local carried = {}
  local items = call('LRANGE', buf_key(run), 0, -1)
  for i = 1, #items, 3 do
    if items[i] == EV.WORKFLOW_EXECUTION_SIGNALED then
      carried[#carried + 1] = items[i + 1]
      carried[#carried + 1] = items[i + 2]
    end
  end
  local rec = { 'wft_done', done_string(c.fence, R.OK, LAST[run] + 1, '', c.call_id) }
  local eid = close_run(run, RS.CONTINUED_AS_NEW, EV.WORKFLOW_EXECUTION_CONTINUED_AS_NEW, body, c.retention, rec,
    c.known)
  local left = (tonumber(st[1]) or NOW) - NOW
  create_run(wid, next_run, st[2], c.tq, start_body, left > 0 and left or 1, true, #carried == 0)
  -- the chain's first run: a handle on it reaches the chain's current run (handle.py)
  -- (and a child's chain stays its parent's child: its last run reports to the parent)
  -- (and a schedule's run stays its schedule's)
  call('HSET', run_key(next_run), 'chain', st[3] or run)
  if st[4] then call('HSET', run_key(next_run), 'parent', st[4]) end
  if st[5] then call('HSET', run_key(next_run), 'sched', st[5]) end
  for i = 1, #carried, 2 do
    append(next_run, wid, EV.WORKFLOW_EXECUTION_SIGNALED, carried[i + 1], carried[i])
  end
  if #carried > 0 then note_messages(next_run) end
  return eid
end

-- Record a workflow task's completion (its commands checked by parse_commands):
-- WorkflowTaskCompleted (with the task's start time t0, fence, worker and `ord`: how the
-- worker ordered the task's events, ACTIVATION_ORDER, which its replay must follow),
-- one event per
-- command and what each starts, then, unless it closed the run, the events buffered
-- while the task ran (another task is scheduled for them) and the drop of its message.
-- c: {fence, t0, worker, tq, retention, sticky_ms, cmds, closes, stream and msg (the
-- task's message, if it has one), spec (a speculative first task: it never started, so
-- nothing of it was buffered or timed, its attempt is the run's first, and its
-- `call_id` goes in the record), known (the run's CLOSE_FIELDS as the caller read them,
-- for close_run, when the task closes the run), seen (the task saw every message the run
-- has: none came while it ran, so its completion clears `unseen`)}. Returns the last
-- event id of the commands and the activities handed to the worker as {seq, deadline, ...}.
local function record_task(run, wid, c)
  local fence = c.fence
  local last = append(run, wid, EV.WORKFLOW_TASK_COMPLETED,
    cmsgpack.pack({ t0 = c.t0, fence = fence, worker = c.worker, ord = ACTIVATION_ORDER }))
  local closed = false
  local ak = act_key(run)
  local handed, seqs = {}, {}
  for _, cmd in ipairs(c.cmds) do
    local kind, body, aux = cmd.kind, cmd.body, cmd.aux
    if kind == CMD.SCHEDULE_ACTIVITY then
      local seq = tostring(aux[1])
      last = append(run, wid, EV.ACTIVITY_TASK_SCHEDULED, body)
      local s = { att = 1, tq = aux[2], stc = aux[3], s2c = aux[4], hbt = aux[5],
        max = aux[6], ii = aux[7], bc = aux[8], mi = aux[9], sched = NOW, due = NOW }
      if cmd.eager and not c.closes then
        act_hand_over(run, seq, s, body, c.worker)
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
    elseif kind == CMD.COMPLETE_WORKFLOW or kind == CMD.FAIL_WORKFLOW or kind == CMD.CANCEL_WORKFLOW then
      -- the closing event comes next; the run hash records this completion with it
      -- (closing the run drops the task message)
      local rec = { 'wft_done', done_string(fence, R.OK, LAST[run] + 1, '', c.call_id) }
      if kind == CMD.COMPLETE_WORKFLOW then
        last = close_run(run, RS.COMPLETED, EV.WORKFLOW_EXECUTION_COMPLETED, body, c.retention, rec, c.known)
      elseif kind == CMD.CANCEL_WORKFLOW then
        last = close_run(run, RS.CANCELED, EV.WORKFLOW_EXECUTION_CANCELED, body, c.retention, rec, c.known)
      else
        last = close_run(run, RS.FAILED, EV.WORKFLOW_EXECUTION_FAILED, body, c.retention, rec, c.known)
      end
      closed = true
    elseif kind == CMD.CONTINUE_AS_NEW then
      last = continue_as_new(run, wid, c, aux[1], body)
      closed = true
    elseif kind == CMD.RECORD_MARKER then
      last = append(run, wid, EV.MARKER_RECORDED, body)
    elseif kind == CMD.START_CHILD then
      -- the child's record (st: scheduled until its start is answered, then started) and
      -- the outbox entry that starts it on its own shard (see outbox_apply)
      last = append(run, wid, EV.START_CHILD_WORKFLOW_EXECUTION_INITIATED, body)
      call('HSET', ak, 'child:' .. aux[1], cmsgpack.pack({ st = AS.SCHEDULED, wid = aux[2], run = aux[3], pol = aux[4] }))
      call('XADD', outbox_key(), '*', 'kind', OB.START_CHILD, 'wid', wid, 'run', run, 'seq', aux[1], 'cwid', aux[2],
        'crun', aux[3], 'pol', aux[4], 'd', body)
    elseif kind == CMD.SIGNAL_EXTERNAL then
      last = append(run, wid, EV.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED, body)
      call('HSET', ak, 'sigx:' .. aux[1], 1)
      call('XADD', outbox_key(), '*', 'kind', OB.SIGNAL, 'wid', wid, 'run', run, 'seq', aux[1], 'cwid', aux[2],
        'crun', aux[3], 'd', body)
    end
  end
  if not closed then
    drop_msg(c.stream, c.msg, run)
    -- the next task of this run goes to this worker, which now holds it in cache
    local sticky = c.sticky_ms > 0 and c.worker or ''
    local done = done_string(fence, R.OK, last, seq_ranges(seqs), c.call_id)
    -- wtc: the fence of the last task that changed the run's state (update.lua)
    if c.seen then call('HDEL', run_key(run), 'unseen') end
    if c.spec then  -- (never started: nothing was buffered; this was the run's first attempt)
      hset_run(run, 'sticky', sticky, 'sticky_ms', c.sticky_ms, 'wft_done', done, 'wtc', fence, 'wft', WT.NONE,
        'wft_msg', '', 'wft_seq', 1)
    elseif flush_buffer(run, wid) > 0 then
      hset_run(run, 'sticky', sticky, 'sticky_ms', c.sticky_ms, 'wft_done', done, 'wtc', fence)
      schedule_wft(run, c.tq)
    else
      hset_run(run, 'sticky', sticky, 'sticky_ms', c.sticky_ms, 'wft_done', done, 'wtc', fence, 'wft', WT.NONE,
        'wft_msg', '')
    end
  end
  return last, handed
end

-- Whether a speculative task's start `at` (ms: the time its workflow was given, the
-- worker's estimate of this clock) can be recorded: no earlier than `after` (what the
-- run's history had seen), no later than NOW, and less than a workflow task timeout ago.
local function spec_time_ok(at, after, timeout)
  return at >= after and at <= NOW and NOW - at < timeout
end

local DIGITS = '0123456789abcdefghijklmnopqrstuvwxyz'
local function base36(n)
  local sign, out = '', ''
  if n < 0 then sign, n = '-', -n end
  repeat
    local d = n % 36
    out = string.sub(DIGITS, d + 1, d + 1) .. out
    n = (n - d) / 36
  until n == 0
  return sign .. out
end
