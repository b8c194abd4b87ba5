-- Create or change a schedule (a client; a worker, for the schedules its workflows
-- declare). KEYS: timers, closed, the schedule's hash, open, buf and log, the shard's
-- sched:due and sched:fin. ARGV: prefix, schedule id, mode ('create', 'update' or
-- 'declare': create, or change if it differs), workflow name, task queue, execution
-- timeout ms, the start template (its runs' WorkflowExecutionStarted body: a msgpack
-- map's entries without their header), the template's entry count, the definition
-- (JSON, read by the SDK only), its digest, origin ('client' or 'declared:<workflow>'),
-- overlap (OV), catch-up window ms, pause on failure ('1' or '0'), max executions (''
-- for no limit), now ms (a new schedule's due times are those after it), paused ('1',
-- '0', or '' to keep), note ('' to keep), the version the change was made on ('' for
-- any: a change made on another is refused, R.STALE, so that two concurrent changes do
-- not overwrite each other unseen), and the count of the old definition's due times the
-- move of the cursor passes over (due, but their jittered start not come yet: logged).
-- A change keeps what the schedule has done (its log, its open and waiting runs) and
-- applies from now on: the cursor (the due times acted on) moves up to now, so that a
-- new definition, a later end_at or a higher max_executions does not start the due
-- times of the past at once (the caller evaluates the old definition up to now first).
-- A changed max_executions starts its count again. Every change moves `ver`, which an
-- evaluation made before it is refused by. The evaluator looks at the schedule at once.
-- Returns {R.OK, 'created' | 'updated' | 'unchanged'}, {R.NOT_FOUND} (update of none),
-- {R.DUPLICATE} (create of an id taken) or {R.INVALID, why}; nothing is written but
-- with R.OK.
local sid, mode, wf, tq = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tmo = num(ARGV[6], 'execution timeout', 1)
local tpl, tpl_n = ARGV[7], num(ARGV[8], 'template entries', 0)
local def, digest, origin, overlap = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local catchup = num(ARGV[13], 'catch-up window', 1)
local pof, maxn = ARGV[14], ARGV[15]
local now = num(ARGV[16], 'now', 0)
local paused, note = ARGV[17], ARGV[18]
local expected = ARGV[19] or ''
local dropped = num(ARGV[20] ~= nil and ARGV[20] ~= '' and ARGV[20] or '0', 'dropped count', 0)
if maxn ~= '' then num(maxn, 'max executions', 1) end
if mode ~= 'create' and mode ~= 'update' and mode ~= 'declare' then return { R.INVALID, 'unknown mode ' .. mode } end
if tpl_n + 3 > 15 then return { R.INVALID, 'the start template has too many entries' } end
local known = false
for _, v in pairs(OV) do if v == overlap then known = true end end
if not known then return { R.INVALID, 'unknown overlap policy ' .. tostring(overlap) } end
if wf == '' or tq == '' or digest == '' then return { R.INVALID, 'empty workflow, task queue or digest' } end
local hk = schedule_key(sid)
local cur = call('HMGET', hk, 'digest', 'wf', 'max', 'cursor', 'ver', 'paused_ms')
if mode == 'create' and cur[1] then return { R.DUPLICATE } end
if mode == 'update' and not cur[1] then return { R.NOT_FOUND } end
if cur[1] and cur[2] ~= wf then
  return { R.INVALID, 'schedule ' .. sid .. ' runs workflow ' .. cur[2] .. ', not ' .. wf
    .. ': delete it first, or give this one another schedule_id' }
end
if mode == 'declare' and cur[1] == digest then return { R.OK, 'unchanged' } end
if cur[1] and expected ~= '' and (cur[5] or '0') ~= expected then return { R.STALE } end
-- checked: nothing below can fail
local fields = { 'wf', wf, 'tq', tq, 'tmo', tmo, 'tpl', tpl, 'tpl_n', tpl_n, 'def', def, 'digest', digest,
  'overlap', overlap, 'catchup', catchup, 'pof', pof, 'updated_ms', now }
if not cur[1] then
  for _, v in ipairs({ 'origin', origin, 'created_ms', now, 'cursor', now, 'n_run', 0, 'n_skip', 0 }) do
    fields[#fields + 1] = v
  end
elseif (tonumber(cur[4]) or 0) < now and not cur[6] then
  -- (while paused the cursor stays: unpausing counts the skipped time from it)
  fields[#fields + 1] = 'cursor'
  fields[#fields + 1] = string.format('%.0f', now)
  if dropped > 0 then
    schedule_log(sid, { k = SA.SKIPPED, at = now, due = tonumber(cur[4]), to = now, n = dropped,
      why = 'replaced: the definition changed before their start (jitter)' })
    call('HINCRBY', hk, 'n_skip', dropped)
  end
end
if not cur[1] or (cur[3] or '') ~= maxn then
  if maxn == '' then
    call('HDEL', hk, 'max', 'remaining')
  else
    fields[#fields + 1] = 'max'
    fields[#fields + 1] = maxn
    fields[#fields + 1] = 'remaining'
    fields[#fields + 1] = maxn
  end
end
if note ~= '' then
  fields[#fields + 1] = 'note'
  fields[#fields + 1] = note
end
call('HSET', hk, unpack(fields))
call('HINCRBY', hk, 'ver', 1)
if paused == '1' then call('HSET', hk, 'paused_ms', now)
elseif paused == '0' then call('HDEL', hk, 'paused_ms') end
local is_paused = call('HEXISTS', hk, 'paused_ms') == 1
call('ZADD', sched_key('due'), is_paused and SCHEDULE_NEVER or 0, sid)
schedule_log(sid, { k = cur[1] and SA.UPDATED or SA.CREATED, at = now })
return { R.OK, cur[1] and SA.UPDATED or SA.CREATED }
