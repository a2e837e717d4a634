"""The join-and-store Lua script: rate-limits a batch, joins it with the completion log inside Redis
and appends it, in one round trip.

Why in Lua: fetching the completion hashes into Python, parsing their token/logprob lists and
serialising them again dominated the cost of a batch. Here Redis splices the logged fields into
each record as text, so Python only sends each record's own (small) head and tail. The per-client
token bucket (rate limit) is the script's first step rather than a script of its own, so a
SubmitFeedback call costs one Redis round trip (the second round trip was ~7% of a batch's cost).

The spliced JSON is what ``FeedbackRecord.to_json`` would write for the same data (the Python join
in flywheel.feedback.join): strings escaped as ``json.dumps(ensure_ascii=False)`` escapes them, the
generator's ``json.dumps`` lists and messages compacted to ``separators=(",", ":")`` with their
``\\uXXXX`` escapes decoded, numbers as written (the generator writes ``repr``). A logged value the
script cannot reproduce exactly (a non-integer policy version, a non-float created_at, NaN or
Infinity in a list, a malformed string) makes it answer ``fallback`` before writing anything; the
caller then uses the Python join, so such values behave as they always did.

KEYS: stream, stats, rate-limit bucket, idempotency keys (one per event), completion keys (distinct).
ARGV: ttl, completion-key prefix, rate (events/s; 0 = no rate limit), burst, then 7 per event:
payload hash, kind, head, tail, index into KEYS of the first and second completion (0 = none),
corrected text ("" unless a correction). ``head`` is the whole record for an event without
completions; otherwise the record up to and including the comma before ``"prompt"``, and ``tail``
the rest from ``,"corrected_text"``.

Replies: {'ok', status, id-or-missing, ...} with status accepted | duplicate | unknown (the
missing completion ids, space-separated: ids contain no whitespace); {'rate_limited', ms} (ms
until the batch's tokens are available; nothing taken, nothing stored); {'conflict', i, id};
{'invalid', i, 'prompts' | 'identical'}; {'fallback'}. The rate limit is checked first and its
tokens taken for any batch that passes it (also one then rejected, as before the two were
merged); the checks (join, then idempotency) cover the whole batch before the first stream write,
so a rejected batch stores nothing.
"""

from __future__ import annotations

HEADER_KEYS = 3
"""KEYS before the idempotency keys: stream, stats, rate-limit bucket."""
HEADER_ARGS = 4
"""ARGV before the events: ttl, completion-key prefix, rate, burst."""
ARGS_PER_EVENT = 7

JOIN_STORE_SCRIPT = r"""
local ESC = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n',
             ['\r'] = '\\r', ['\t'] = '\\t'}
for c = 0, 31 do
  local ch = string.char(c)
  if not ESC[ch] then ESC[ch] = string.format('\\u%04x', c) end
end

-- cjson (C) escapes exactly as json.dumps(ensure_ascii=False) does except for '/' and DEL, which
-- it writes as \/ and \u007f; strings without them take it (~10x faster than the gsub, which
-- scans a long completion character by character through the pattern matcher).
local function jstr(s)
  if not string.find(s, '/', 1, true) and not string.find(s, '\127', 1, true) then
    return cjson.encode(s)
  end
  return '"' .. string.gsub(s, '[%z\1-\31"\\]', ESC) .. '"'
end

local function utf8(c)
  if c < 0x80 then return string.char(c) end
  if c < 0x800 then return string.char(0xC0 + math.floor(c / 0x40), 0x80 + c % 0x40) end
  if c < 0x10000 then
    return string.char(0xE0 + math.floor(c / 0x1000), 0x80 + math.floor(c / 0x40) % 0x40, 0x80 + c % 0x40)
  end
  return string.char(0xF0 + math.floor(c / 0x40000), 0x80 + math.floor(c / 0x1000) % 0x40,
                     0x80 + math.floor(c / 0x40) % 0x40, 0x80 + c % 0x40)
end

local function surrogate_pair(hi, lo)
  return utf8(0x10000 + (tonumber(hi, 16) - 0xD800) * 0x400 + tonumber(lo, 16) - 0xDC00)
end

-- \uXXXX as ensure_ascii=False writes it: raw UTF-8, except control characters, '"' and '\'.
local function unicode_escape(hex)
  local c = tonumber(hex, 16)
  if c < 32 or (c >= 0xD800 and c < 0xE000) then return nil end  -- nil keeps the escape
  if c == 34 then return '\\"' end
  if c == 92 then return '\\\\' end
  return utf8(c)
end

-- One JSON string literal (quotes included), its \u escapes decoded; nil when it has a lone
-- surrogate (the Python join cannot store those either) or a raw NUL.
local function decode_escapes(lit)
  if not string.find(lit, '\\u', 1, true) then return lit end
  if string.find(lit, '%z') then return nil end
  lit = string.gsub(lit, '\\\\', '\0')
  lit = string.gsub(lit, '\\u([dD][89abAB]%x%x)\\u([dD][c-fC-F]%x%x)', surrogate_pair)
  lit = string.gsub(lit, '\\u(%x%x%x%x)', unicode_escape)
  if string.find(lit, '\\u[dD][89a-fA-F]%x%x') then return nil end
  return (string.gsub(lit, '%z', '\\\\'))
end

-- JSON text without whitespace outside strings; nil when malformed or not reproducible.
local function compact(s)
  local out, i = {}, 1
  while true do
    local q = string.find(s, '"', i, true)
    out[#out + 1] = (string.gsub(string.sub(s, i, q and q - 1 or -1), '%s+', ''))
    if not q then break end
    local e = q + 1
    while true do
      local k = string.find(s, '["\\]', e)
      if not k then return nil end
      if string.sub(s, k, k) == '"' then e = k break end
      e = k + 2
    end
    local lit = decode_escapes(string.sub(s, q, e))
    if not lit then return nil end
    out[#out + 1] = lit
    i = e + 1
  end
  return table.concat(out)
end

-- A logged number list as json.dumps(separators=(",", ":")) writes it: the generator writes ", ".
-- (Plain finds and a literal gsub: a '%s' pattern scan costs ~4x more per character.) NaN and
-- Infinity (json.dumps writes them; the Python join refuses them) are left to the Python join.
local function number_list(v)
  if not v or v == '' then return '[]' end
  if string.find(v, 'N', 1, true) or string.find(v, 'I', 1, true) then return nil end
  if not string.find(v, ' ', 1, true) then return v end
  return (string.gsub(v, ', ', ','))
end

local function int_or_null(v)
  if not v or v == '' then return 'null' end
  if v == '0' or string.find(v, '^%-?[1-9]%d*$') then return v end
  return nil
end

local function float_or_null(v)
  if not v or v == '' then return 'null' end
  if string.find(v, '^%-?[1-9]%d*%.%d+$') or string.find(v, '^%-?0%.%d+$')
     or string.find(v, '^%-?[1-9]%.%d+e[%-%+]%d+$') or string.find(v, '^%-?[1-9]e[%-%+]%d+$') then
    return v
  end
  return nil
end

-- Token bucket of KEYS[3]: ARGV[3] tokens/s, ARGV[4] at most, `cost` taken when available.
-- Returns 0 (tokens taken) or the milliseconds until `cost` tokens will be. Redis' clock, so every
-- replica agrees.
local function take_tokens(cost)
  local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
  if rate <= 0 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local state = redis.call('HMGET', KEYS[3], 'tokens', 'ts')
  local tokens = tonumber(state[1]) or burst
  local ts = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < cost then
    return math.max(1, math.ceil((cost - tokens) * 1000 / rate))
  end
  redis.call('HSET', KEYS[3], 'tokens', tostring(tokens - cost), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[3], math.ceil(burst * 1000 / rate) + 1000)
  return 0
end

local prefix_len = #ARGV[2]
local n = (#ARGV - 4) / 7
local logged, blocks, messages = {}, {}, {}

-- The completion-log fields the join reads (HMGET: half the cost of HGETALL and a table build).
local FIELDS = {'prompt', 'prompt_messages', 'completion', 'prompt_token_ids', 'token_ids', 'logprobs',
                'policy_version', 'finish_reason', 'adapter_name', 'created_at'}

local function fetch(k)  -- completion hash as a table; false when missing
  if logged[k] == nil then
    local raw = redis.call('HMGET', KEYS[k], unpack(FIELDS))
    local t, found = {}, false
    for j = 1, #FIELDS do
      if raw[j] then t[FIELDS[j]] = raw[j]; found = true end
    end
    -- A hash with none of these fields still exists (the Python join treats it as logged).
    if not found and redis.call('EXISTS', KEYS[k]) == 0 then t = false end
    logged[k] = t
  end
  return logged[k]
end

local function prompt_messages(k)  -- compact JSON or 'null'; false when not reproducible
  if messages[k] == nil then
    local v = logged[k]['prompt_messages']
    messages[k] = (not v or v == '') and 'null' or compact(v) or false
  end
  return messages[k]
end

local function block(k)  -- the CompletionRecord JSON; false when not reproducible
  if blocks[k] == nil then
    local h = logged[k]
    local ids, lps = number_list(h['token_ids']), number_list(h['logprobs'])
    local version, at = int_or_null(h['policy_version']), float_or_null(h['created_at'])
    if ids and lps and version and at then
      blocks[k] = '{"text":' .. jstr(h['completion'] or '') .. ',"completion_id":'
        .. jstr(string.sub(KEYS[k], prefix_len + 1)) .. ',"token_ids":' .. ids
        .. ',"behaviour_logprobs":' .. lps .. ',"policy_version":' .. version
        .. ',"finish_reason":' .. jstr(h['finish_reason'] or '') .. ',"adapter_name":'
        .. jstr(h['adapter_name'] or '') .. ',"logged_at":' .. at .. '}'
    else
      blocks[k] = false
    end
  end
  return blocks[k]
end

local function joined(k1, k2)  -- the record's middle: prompt .. rejected; nil = fallback
  local h = logged[k1]
  local msgs, prompt_ids, first = prompt_messages(k1), number_list(h['prompt_token_ids']), block(k1)
  if not (msgs and prompt_ids and first) then return nil end
  local sides
  if k2 > 0 then
    local second = block(k2)
    if not second then return nil end
    sides = ',"completion":null,"chosen":' .. first .. ',"rejected":' .. second
  else
    sides = ',"completion":' .. first .. ',"chosen":null,"rejected":null'
  end
  return '"prompt":' .. jstr(h['prompt'] or '') .. ',"prompt_messages":' .. msgs
    .. ',"prompt_token_ids":' .. prompt_ids .. sides
end

local wait_ms = take_tokens(n)
if wait_ms > 0 then return {'rate_limited', tostring(wait_ms)} end

-- Pass 1: join, validate and check idempotency for the whole batch; nothing is stored yet.
local existing, batch_hash, records, missing = {}, {}, {}, {}
local conflict = nil
for i = 1, n do
  local b = 4 + 7 * (i - 1)
  local key, hash, kind = KEYS[i + 3], ARGV[b + 1], ARGV[b + 2]
  local k1, k2 = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6])
  if batch_hash[key] == nil then
    local v = redis.call('GET', key)
    if v then
      local sep = string.find(v, ' ', 1, true)
      batch_hash[key] = string.sub(v, 1, sep - 1)
      existing[key] = string.sub(v, sep + 1)
    else
      batch_hash[key] = hash
    end
  end
  if batch_hash[key] ~= hash and not conflict then
    conflict = {'conflict', tostring(i), existing[key] or ''}
  end
  if k1 == 0 then
    records[i] = ARGV[b + 3]
  else
    local h1, h2 = fetch(k1), k2 > 0 and fetch(k2)
    if not h1 or (k2 > 0 and not h2) then
      local ids = {}
      if not h1 then ids[#ids + 1] = string.sub(KEYS[k1], prefix_len + 1) end
      if k2 > 0 and not h2 then ids[#ids + 1] = string.sub(KEYS[k2], prefix_len + 1) end
      missing[i] = table.concat(ids, ' ')
    else
      if k2 > 0 and ((h1['prompt'] or '') ~= (h2['prompt'] or '')
                     or prompt_messages(k1) ~= prompt_messages(k2)) then
        return {'invalid', tostring(i), 'prompts'}
      end
      if kind == 'correction' and ARGV[b + 7] == (h1['completion'] or '') then
        return {'invalid', tostring(i), 'identical'}
      end
      if not existing[key] then
        local middle = joined(k1, k2)
        if not middle then return {'fallback'} end
        records[i] = ARGV[b + 3] .. middle .. ARGV[b + 4]
      end
    end
  end
end
if conflict then return conflict end

-- Pass 2: append; a key repeated in the batch is stored once (later copies are duplicates).
local out, counts = {'ok'}, {}
for i = 1, n do
  local b = 4 + 7 * (i - 1)
  local key, hash, kind = KEYS[i + 3], ARGV[b + 1], ARGV[b + 2]
  local id = existing[key]
  if id then
    out[#out + 1] = 'duplicate'
    out[#out + 1] = id
  elseif missing[i] then
    out[#out + 1] = 'unknown'
    out[#out + 1] = missing[i]
  else
    id = redis.call('XADD', KEYS[1], '*', 'kind', kind, 'record', records[i])
    redis.call('SET', key, hash .. ' ' .. id, 'EX', ARGV[1])
    counts[kind] = (counts[kind] or 0) + 1
    existing[key] = id
    out[#out + 1] = 'accepted'
    out[#out + 1] = id
  end
end
for kind, count in pairs(counts) do
  redis.call('HINCRBY', KEYS[2], kind, count)
end
return out
"""
