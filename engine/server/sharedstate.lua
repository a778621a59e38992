-- dccsign's shared state: the quota windows and idempotency keys of every engine of one
-- deployment, in one Redis. engine/server/sharedstate.py is the only caller and documents the
-- argument layout; one call carries the work of many frames, so that an engine pays one
-- round trip per micro-batch rather than one per request or per certificate. Redis runs a
-- script atomically: no other engine's charge can come between a check and its charge.
--
-- The engine sends names, not key names: the script builds every key from KEYS[1], the
-- deployment's prefix, which carries a hash tag, so that all of them are in the slot KEYS[1]
-- routes the call to (Redis Cluster). The accounts of a frame come as three strings (names
-- concatenated, their lengths and their counts as little-endian u32), so that the engine
-- spends no interpreter time per account; only refusals come back.
--
-- ARGV: nr nf nq nc ng claim_ttl_ms result_ttl_ms node, then (in this order: units given
-- back and results stored were queued before, or with, the charges and claims that may
-- depend on them)
--   nr releases:      client account cq aq n
--   nf finishes:      client account key fp ok kid hc1
--   nq quota groups:  client cl1 cl2 cl3 al1 al2 al3 na names lengths counts
--   nc claims:        client account key fp
--   ng polls:         client account key fp
-- (cq/aq: 1 when the client has a client / an account quota; cl/al: limits per minute, hour,
-- day of the client and of its accounts, 0 = no such window; fp: the item's 32-byte
-- fingerprint).
-- Reply: a flat array: per group the number of accounts refused something, then for each
-- index granted who kind limit wait_ms (index 0-based in the group; who 1: the client's quota
-- refused the rest, 2: the account's); per claim and per poll, state kid hc1 (0 new, 1 done,
-- 2 in progress, 3 conflict, 4 gone).

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- The same windows as the engine's in-process tracker (engine/server/policy.py, which fills in
-- these two lines): per kind (minute, hour, day) buckets of WIDTH seconds, of which a unit
-- counts in SPAN (it expires once its bucket is SPAN buckets old).
local WIDTH = @WIDTH@
local SPAN = @SPAN@
local cur = {}
for k = 1, 3 do cur[k] = math.floor(now / WIDTH[k]) end

local PREFIX = KEYS[1]
-- Length-prefixed parts, so that no two (client, account, key) triples share a name.
local function key(...)
  local out = PREFIX
  for _, part in ipairs({...}) do out = out .. #part .. ':' .. part end
  return out
end

local a = 1
local function num()
  local v = tonumber(ARGV[a])
  a = a + 1
  return v
end
local function str()
  local v = ARGV[a]
  a = a + 1
  return v
end

-- A quota hash holds one field per (kind, bucket): "k:bucket" -> units. Per kind, its live
-- buckets as {bucket, units} in the order Redis returns them (sorted only where a refusal's
-- wait or a release needs it), and their total in u.total[k]; expired fields are dropped.
local function usage(key)
  local raw = redis.call('HGETALL', key)
  local u = {{}, {}, {}, total = {0, 0, 0}}
  local dead = {}
  for i = 1, #raw, 2 do
    local f = raw[i]
    local k = tonumber(string.sub(f, 1, 1))
    local b = tonumber(string.sub(f, 3))
    local c = tonumber(raw[i + 1])
    if k == nil or b == nil or c == nil or k < 1 or k > 3 or b <= cur[k] - SPAN[k] or c <= 0 then
      dead[#dead + 1] = f
    else
      u[k][#u[k] + 1] = {b, c}
      u.total[k] = u.total[k] + c
    end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  return u
end

local function ascending(list)
  table.sort(list, function(x, y) return x[1] < y[1] end)
  return list
end

-- Units that still fit in every window with a limit (a large number when none has one).
local function free(u, lim)
  local f = 1e15
  for k = 1, 3 do
    if lim[k] > 0 then
      local left = lim[k] - (u and u.total[k] or 0)
      if left < f then f = left end
    end
  end
  if f < 0 then f = 0 end
  return f
end

-- g more units in the current bucket of window kind k of the table u; true when that
-- bucket is new.
local function add(u, k, g)
  u.total[k] = u.total[k] + g
  for _, e in ipairs(u[k]) do
    if e[1] == cur[k] then
      e[2] = e[2] + g
      return false
    end
  end
  u[k][#u[k] + 1] = {cur[k], g}
  return true
end

-- Counts g more units in the current bucket of every window with a limit: in Redis, and in
-- the usage table u read before (a refusal's wait is worked out from it). The key expires
-- once its newest bucket has: its expiry is set when a bucket is added, not on every
-- charge (a PEXPIRE per certificate would cost Redis a fifth more).
local function charge(key, u, lim, g)
  local ttl, fresh = 0, false
  for k = 1, 3 do
    if lim[k] > 0 then
      redis.call('HINCRBY', key, k .. ':' .. cur[k], g)
      if add(u, k, g) then fresh = true end
      local ms = (SPAN[k] + 1) * WIDTH[k] * 1000
      if ms > ttl then ttl = ms end
    end
  end
  if fresh then redis.call('PEXPIRE', key, ttl) end
end

-- Seconds until one more unit fits in window kind k (the oldest units expire first).
local function wait(u, k, limit)
  local excess = u.total[k] + 1 - limit
  local freed = 0
  for _, e in ipairs(ascending(u[k])) do
    freed = freed + e[2]
    if freed >= excess then return (e[1] + SPAN[k]) * WIDTH[k] - now end
  end
  return 0
end

-- The window that frees up last among those where one more unit does not fit; the
-- client's on a tie. Returns who kind limit wait_ms.
local function refusal(cu, cl, au, al)
  local who, kind, limit, w = 0, 0, 0, -1
  for pass = 1, 2 do
    local u, lim = cu, cl
    if pass == 2 then u, lim = au, al end
    if u then
      for k = 1, 3 do
        if lim[k] > 0 and u.total[k] + 1 > lim[k] then
          local s = wait(u, k, lim[k])
          if s > w then who, kind, limit, w = pass, k - 1, lim[k], s end
        end
      end
    end
  end
  if w < 0 then w = 0 end
  return who, kind, limit, math.ceil(w * 1000)
end

local nr, nf, nq, nc, ng = num(), num(), num(), num(), num()
local claim_ttl, result_ttl, node = num(), num(), str()
local out = {}

-- Units reserved for items that were not signed go back first, newest buckets first.
for _ = 1, nr do
  local client, account, cq, aq, n = str(), str(), num(), num(), num()
  local keys = {}
  if cq == 1 then keys[#keys + 1] = key('qc', client) end
  if aq == 1 then keys[#keys + 1] = key('qa', client, account) end
  for _, name in ipairs(keys) do
    local u = usage(name)
    for k = 1, 3 do
      local left = n
      local list = ascending(u[k])
      for i = #list, 1, -1 do
        if left <= 0 then break end
        local d = math.min(left, list[i][2])
        local f = k .. ':' .. list[i][1]
        if d == list[i][2] then
          redis.call('HDEL', name, f)
        else
          redis.call('HINCRBY', name, f, -d)
        end
        left = left - d
      end
    end
  end
end

-- An idempotency record: "p" fp node while the first attempt is in progress (it expires
-- after claim_ttl, should that engine die), "d" fp kid hc1 once it succeeded. A failure
-- drops the claim only if it is this engine's own.
local function seen(v, fp)
  if not v then return 4, '', '' end
  if string.sub(v, 2, 33) ~= fp then return 3, '', '' end
  if string.sub(v, 1, 1) == 'd' then return 1, string.sub(v, 34, 41), string.sub(v, 42) end
  return 2, '', ''
end

for _ = 1, nf do
  local ik = key('ik', str(), str(), str())
  local fp, ok, kid, hc1 = str(), num(), str(), str()
  local v = redis.call('GET', ik)
  local mine = v and string.sub(v, 2, 33) == fp
  if ok == 1 and (not v or mine) then
    redis.call('SET', ik, 'd' .. fp .. kid .. hc1, 'PX', result_ttl)
  elseif ok == 0 and v == 'p' .. fp .. node then
    redis.call('DEL', ik)
  end
end

for _ = 1, nq do
  local client = str()
  local cl = {num(), num(), num()}
  local al = {num(), num(), num()}
  local na, names, lengths, counts = num(), str(), str(), str()
  local ck = nil
  if cl[1] + cl[2] + cl[3] > 0 then ck = key('qc', client) end
  local aq = al[1] + al[2] + al[3] > 0
  local cu = nil
  if ck then cu = usage(ck) end
  local cfree = free(cu, cl)
  local taken, counted = 0, 0  -- units granted in this group; of them, added to cu so far
  local refused = {}
  local at = 1
  local qa = key('qa', client)
  for j = 1, na do
    local len = struct.unpack('<I4', lengths, 4 * j - 3)
    local want = struct.unpack('<I4', counts, 4 * j - 3)
    local ak, au = nil, nil
    if aq then
      ak = qa .. len .. ':' .. string.sub(names, at, at + len - 1)
      au = usage(ak)
    end
    at = at + len
    local g = math.min(want, cfree - taken, free(au, al))
    if g < 0 then g = 0 end
    if g > 0 and ak then charge(ak, au, al, g) end
    taken = taken + g
    if g < want then
      if ck and taken > counted then
        -- the client's table learns the units granted so far (a refusal's wait counts
        -- them); in Redis they are counted once, below
        for k = 1, 3 do
          if cl[k] > 0 then add(cu, k, taken - counted) end
        end
        counted = taken
      end
      local who, kind, limit, ms = refusal(cu, cl, au, al)
      refused[#refused + 1] = {j - 1, g, who, kind, limit, ms}
    end
  end
  out[#out + 1] = #refused
  for _, r in ipairs(refused) do
    for _, v in ipairs(r) do out[#out + 1] = v end
  end
  if ck and taken > 0 then
    local ttl = 0
    for k = 1, 3 do
      if cl[k] > 0 then
        redis.call('HINCRBY', ck, k .. ':' .. cur[k], taken)
        local ms = (SPAN[k] + 1) * WIDTH[k] * 1000
        if ms > ttl then ttl = ms end
      end
    end
    redis.call('PEXPIRE', ck, ttl)
  end
end

for _ = 1, nc do
  local ik = key('ik', str(), str(), str())
  local fp = str()
  local v = redis.call('GET', ik)
  if not v then
    redis.call('SET', ik, 'p' .. fp .. node, 'PX', claim_ttl)
    out[#out + 1] = 0
    out[#out + 1] = ''
    out[#out + 1] = ''
  else
    local state, kid, hc1 = seen(v, fp)
    out[#out + 1] = state
    out[#out + 1] = kid
    out[#out + 1] = hc1
  end
end

for _ = 1, ng do
  local ik = key('ik', str(), str(), str())
  local fp = str()
  local state, kid, hc1 = seen(redis.call('GET', ik), fp)
  out[#out + 1] = state
  out[#out + 1] = kid
  out[#out + 1] = hc1
end

return out
