-- limits.lua: a prelude, prepended to acquire.lua, feedback.lua, settle.lua and snapshot.lua (see
-- redis_conn.rs), that works out the effective per-minute limits of one (key, family) budget.
--
-- The limits HASH of a (key, family) holds what was learnt, for every process:
--   lr, lt       limits the provider advertised (requests, tokens per minute)
--   ar, at       adaptive ceilings set by the last decrease (per minute); absent once recovered
--   dr, dt       when the last decrease happened (ms, Redis clock)
--   noadv        1: the provider answered without advertising its limits
--   probe        while nothing is known: when the one call sent to learn them expires (ms)
--   prober       that call's lease id
--
-- base = the learnt limit (or the configured starting value while nothing is learnt), never above
-- an explicit cap; effective = base, or the adaptive ceiling while it is lower. The ceiling
-- climbs back linearly after `quiet` ms without a decrease: from zero to base in `recovery` ms.

local function limits_of(lkey, now, start_r, start_t, cap_r, cap_t, learn, quiet, recovery)
  local v = redis.call('HMGET', lkey, 'lr', 'lt', 'ar', 'at', 'dr', 'dt', 'noadv', 'probe')
  local s = {
    learned = {tonumber(v[1]), tonumber(v[2])},
    ceiling = {tonumber(v[3]), tonumber(v[4])},
    decreased = {tonumber(v[5]) or 0, tonumber(v[6]) or 0},
    noadv = v[7] == '1',
    probe = tonumber(v[8]) or 0,
    base = {},
    eff = {},
  }
  local starts, caps = {start_r, start_t}, {cap_r, cap_t}
  for d = 1, 2 do
    local base = starts[d]
    if learn == 1 and s.learned[d] then
      base = s.learned[d]
    end
    if caps[d] > 0 then
      base = math.min(base, caps[d])
    end
    local eff = base
    if s.ceiling[d] then
      local c = s.ceiling[d] + math.max(0, now - s.decreased[d] - quiet) * base / recovery
      if c < base then
        eff = c
      end
    end
    s.base[d], s.eff[d] = base, math.max(eff, 1e-6)
  end
  -- Nothing learnt yet, and the provider has not been heard from: one call goes first.
  s.needs_probe = learn == 1 and not s.learned[1] and not s.learned[2] and not s.noadv
  return s
end

