-- upstreamd.peers: each worker's view of one upstream's servers and nginx's ways of picking
-- one (ngx_http_upstream_round_robin.c, _hash_module.c, _ip_hash_module.c), with the time
-- passed in so that the logic stays free of I/O.
--
-- A pool is rebuilt on every new generation; a server that stays (same address) keeps its
-- passive-failure state and its place in the smooth weighted round robin.
--
-- Where this differs from nginx: balancer_by_lua learns that a try failed only when nginx asks
-- for the next peer (`ngx.balancer.get_last_failure`), so the failure of a request's last try
-- is not counted; and it never hears of a success, so a server that was marked failed is
-- trusted again (its failures forgotten) when it is picked after `fail_timeout`, where nginx
-- forgets them once that request succeeds.

local chash = require "upstreamd.chash"

local floor, random = math.floor, math.random

local M = {}

--- Builds the pool of validated upstream `u` ({balance, servers}), carrying per-server state
--- from `old` (the previous pool, or nil).
function M.build(u, old)
    local before = {}
    if old then
        for _, p in ipairs(old.all) do
            before[p.address] = p
        end
    end
    local pool = { balance = u.balance, primary = {}, backup = {}, all = {}, by_id = {}, total_weight = 0 }
    for _, s in ipairs(u.servers) do
        local p = {
            address = s.address, host = s.host, port = s.port, weight = s.weight,
            down = s.down, max_fails = s.max_fails, fail_timeout = s.fail_timeout, id = s.id,
            current_weight = 0, effective_weight = s.weight, fails = 0, checked = 0, conns = 0,
        }
        local b = before[s.address]
        if b then
            p.fails, p.checked, p.conns = b.fails, b.checked, b.conns
            if b.weight == p.weight then
                p.current_weight, p.effective_weight = b.current_weight, b.effective_weight
            end
        end
        local list = s.backup and pool.backup or pool.primary
        list[#list + 1] = p
        pool.all[#pool.all + 1] = p
        if p.id then
            pool.by_id[p.id] = p
        end
        if not s.backup then
            pool.total_weight = pool.total_weight + p.weight
        end
    end
    if u.balance == "hash" or u.balance == "sticky" then
        pool.ring = chash.build(pool.primary)
    end
    return pool
end

--- How many tries a request gets: the servers not marked down (nginx's `peers->tries`).
function M.tries(pool)
    local n = 0
    for _, p in ipairs(pool.all) do
        if not p.down then
            n = n + 1
        end
    end
    return n
end

--- Whether `p` may take a request now: not down, not failed `max_fails` times within
--- `fail_timeout`.
function M.usable(p, now)
    if p.down then
        return false
    end
    return not (p.max_fails > 0 and p.fails >= p.max_fails and now - p.checked <= p.fail_timeout)
end

--- What nginx does to the peer it picked: remember it as tried, start a new failure window
--- once the last one has passed (and, see the header, forget old failures then).
function M.take(p, tried, now)
    tried[p.address] = true
    if now - p.checked > p.fail_timeout then
        p.checked = now
        p.fails = 0
    end
    return p
end

-- nginx's ngx_http_upstream_get_peer: smooth weighted round robin over `list`.
local function smooth(list, tried, now)
    local best, total = nil, 0
    for _, p in ipairs(list) do
        if not tried[p.address] and M.usable(p, now) then
            p.current_weight = p.current_weight + p.effective_weight
            total = total + p.effective_weight
            if p.effective_weight < p.weight then
                p.effective_weight = p.effective_weight + 1
            end
            if best == nil or p.current_weight > best.current_weight then
                best = p
            end
        end
    end
    if best then
        best.current_weight = best.current_weight - total
    end
    return best
end

--- Round robin: a primary if one is usable and untried, else a backup; nil when none is.
function M.round_robin(pool, tried, now)
    local p = smooth(pool.primary, tried, now) or smooth(pool.backup, tried, now)
    return p and M.take(p, tried, now)
end

--- Weighted random over usable, untried primaries (then backups).
function M.random(pool, tried, now)
    for _, list in ipairs({ pool.primary, pool.backup }) do
        local total, ok = 0, {}
        for _, p in ipairs(list) do
            if not tried[p.address] and M.usable(p, now) then
                ok[#ok + 1] = p
                total = total + p.weight
            end
        end
        if total > 0 then
            local w = random() * total
            for _, p in ipairs(ok) do
                w = w - p.weight
                if w < 0 then
                    return M.take(p, tried, now)
                end
            end
            return M.take(ok[#ok], tried, now)
        end
    end
    return nil
end

--- nginx's get_chash_peer: from the point of `key` (kept in `state.point` across the tries
--- of one request) to the first usable, untried server; round robin after 20 misses, for an
--- empty key, or with fewer than two servers.
function M.chash(pool, state, key, now)
    local ring = pool.ring
    if state.misses == nil then
        state.misses = 0
        if ring.n > 0 and key ~= "" then
            state.point = chash.find(ring, key)
        end
    end
    if state.point == nil or state.misses > 20 or #pool.primary < 2 then
        return M.round_robin(pool, state.tried, now)
    end
    while true do
        local p = chash.peer_at(ring, state.point)
        if not state.tried[p.address] and M.usable(p, now) then
            -- One server per name: nginx's weighted pick among equal names is this one.
            return M.take(p, state.tried, now)
        end
        state.point = state.point + 1
        state.misses = state.misses + 1
        if state.misses >= ring.n then
            return nil
        end
    end
end

--- nginx's ip_hash: `addr` is the client's bytes (the first 3 of IPv4, all 16 of IPv6);
--- `state` keeps the hash and the count of misses across the tries of one request.
function M.ip_hash(pool, state, addr, now)
    if pool.total_weight == 0 or #pool.primary < 2 then
        return M.round_robin(pool, state.tried, now)
    end
    local hash = state.hash or 89
    state.misses = state.misses or 0
    while true do
        for i = 1, #addr do
            hash = (hash * 113 + addr:byte(i)) % 6271
        end
        local w = hash % pool.total_weight
        local i = 1
        while w >= pool.primary[i].weight do
            w = w - pool.primary[i].weight
            i = i + 1
        end
        local p = pool.primary[i]
        if not state.tried[p.address] and M.usable(p, now) then
            state.hash = hash
            return M.take(p, state.tried, now)
        end
        state.misses = state.misses + 1
        if state.misses > 20 then
            return M.round_robin(pool, state.tried, now)
        end
    end
end

--- Least connections (this worker's counts), weighted, smooth round robin among equals.
function M.least_conn(pool, tried, now)
    for _, list in ipairs({ pool.primary, pool.backup }) do
        local best, many = nil, {}
        for _, p in ipairs(list) do
            if not tried[p.address] and M.usable(p, now) then
                if best == nil or p.conns * best.weight < best.conns * p.weight then
                    best, many = p, { p }
                elseif p.conns * best.weight == best.conns * p.weight then
                    many[#many + 1] = p
                end
            end
        end
        if best then
            local p = #many == 1 and best or smooth(many, tried, now)
            return M.take(p, tried, now)
        end
    end
    return nil
end

--- What nginx does when a try at `p` failed (free_round_robin_peer with NGX_PEER_FAILED).
function M.failed(p, now)
    p.fails = p.fails + 1
    p.checked = now
    if p.max_fails > 0 then
        p.effective_weight = p.effective_weight - floor(p.weight / p.max_fails)
    end
    if p.effective_weight < 0 then
        p.effective_weight = 0
    end
    return p.max_fails > 0 and p.fails >= p.max_fails
end

return M
