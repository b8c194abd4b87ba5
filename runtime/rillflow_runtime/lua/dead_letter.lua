-- Move an undeliverable task message to its queue's dead-letter stream (worker).
-- KEYS: timers, closed, the task stream, its dead-letter stream. ARGV: prefix, message
-- id, reason.
-- Returns 1 if moved, 0 if the message was gone already.
local stream, id, reason = KEYS[3], ARGV[2], ARGV[3]
local entry = call('XRANGE', stream, id, id)
if #entry == 0 then
  call('XACK', stream, GROUP, id)
  return 0
end
local fields = entry[1][2]
fields[#fields + 1] = 'dlq_reason'
fields[#fields + 1] = reason
fields[#fields + 1] = 'dlq_source'
fields[#fields + 1] = stream .. '/' .. id
call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', unpack(fields))
drop_msg(stream, id)
return 1
