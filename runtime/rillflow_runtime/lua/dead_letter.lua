-- Move an undeliverable task message to its queue's dead-letter stream (worker).
-- ARGV: prefix, task stream key, message id, reason. Returns 1 if moved.
local stream, id, reason = ARGV[2], ARGV[3], ARGV[4]
local entry = redis.call('XRANGE', stream, id, id)
if #entry == 0 then return 0 end
local fields = entry[1][2]
fields[#fields + 1] = 'dlq_reason'
fields[#fields + 1] = reason
fields[#fields + 1] = 'dlq_source'
fields[#fields + 1] = stream .. '/' .. id
redis.call('XADD', stream .. ':dlq', 'MAXLEN', '~', 10000, '*', unpack(fields))
drop_msg(stream, id)
return 1
