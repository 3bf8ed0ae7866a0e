-- upstreamd.chash: nginx's `hash ... consistent` ring (ketama, as in Cache::Memcached::Fast),
-- point for point, so that a key lands on the same server in lua mode as in reload mode.
--
-- From nginx 1.22 ngx_http_upstream_hash_module.c, ngx_http_upstream_init_chash: a server
-- written "HOST:PORT" gets 160 points per unit of weight (down servers too); point j is
--   crc32(HOST "\0" PORT prev_hash)
-- where prev_hash is the previous point's value as 4 little-endian bytes (0 for the first).
-- Points are sorted by value, equal values kept once. A key's crc32 picks the first point at or
-- above it (ngx_http_upstream_find_chash_point), wrapping past the last; on a miss (tried,
-- down, failed) the search moves to the next point.

local bit = require "bit"

local crc32 = ngx.crc32_long
local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
local byte, floor, sort, sub = string.byte, math.floor, table.sort, string.sub

local M = {}

-- A ring is rebuilt only when its servers or weights change (a `down` flip keeps it), but
-- then it has 160 points per unit of weight: 160,000 for 1,000 servers. So the points are
-- computed with an incremental crc32 in LuaJIT bit operations (no string per point), and
-- sorted as plain numbers: value * 2^14 + the server's index.
local SHIFT = 16384 -- above validate.MAX_SERVERS
local TWO32 = 4294967296

local TABLE = {}
for i = 0, 255 do
    local c = i
    for _ = 1, 8 do
        if band(c, 1) == 1 then
            c = bxor(rshift(c, 1), 0xEDB88320)
        else
            c = rshift(c, 1)
        end
    end
    TABLE[i] = c
end

local function update(c, b)
    return bxor(rshift(c, 8), TABLE[band(bxor(c, b), 0xFF)])
end

-- The running (not finalized) crc32 of "HOST" "\0" "PORT": nginx splits the server's name
-- at its last colon.
local function base(address)
    local i = #address
    while i > 0 and sub(address, i, i) ~= ":" do
        i = i - 1
    end
    local text = i == 0 and (address .. "\0") or (sub(address, 1, i - 1) .. "\0" .. sub(address, i + 1))
    local c = -1 -- 0xFFFFFFFF
    for j = 1, #text do
        c = update(c, byte(text, j))
    end
    return c
end

--- The ring's signature: equal signatures, equal rings.
function M.signature(peers)
    local parts = {}
    for i, p in ipairs(peers) do
        parts[i] = p.address .. "=" .. p.weight
    end
    return table.concat(parts, " ")
end

--- Builds the ring of `peers` (each with `address` and `weight`, in the include's order):
--- {hash = sorted point values, order = the index in `peers` of each point's server, n}.
function M.build(peers)
    local keys, n = {}, 0
    for order, p in ipairs(peers) do
        local start = base(p.address)
        local prev = 0
        for _ = 1, 160 * p.weight do
            local c = update(start, band(prev, 0xFF))
            c = update(c, band(rshift(prev, 8), 0xFF))
            c = update(c, band(rshift(prev, 16), 0xFF))
            c = update(c, rshift(prev, 24))
            local h = bxor(c, -1)
            if h < 0 then
                h = h + TWO32
            end
            n = n + 1
            keys[n] = h * SHIFT + order
            prev = h
        end
    end
    -- Equal values are as rare as crc32 collisions; nginx keeps one of them (its qsort is not
    -- stable), this keeps the server listed first.
    sort(keys)
    local ring = { hash = {}, order = {}, n = 0 }
    local last
    for i = 1, n do
        local h = floor(keys[i] / SHIFT)
        if h ~= last then
            ring.n = ring.n + 1
            ring.hash[ring.n] = h
            ring.order[ring.n] = keys[i] - h * SHIFT
            last = h
        end
    end
    return ring
end

--- The 0-based index of the first point at or above crc32(`key`), as nginx's
--- find_chash_point returns it (may equal ring.n: callers take it modulo ring.n).
function M.find(ring, key)
    local hash = crc32(key)
    local i, j = 0, ring.n
    local h = ring.hash
    while i < j do
        local k = floor((i + j) / 2)
        local v = h[k + 1]
        if hash > v then
            i = k + 1
        elseif hash < v then
            j = k
        else
            return k
        end
    end
    return i
end

--- The server of 0-based point `index` (taken modulo the ring's size) among `peers`.
function M.peer_at(ring, peers, index)
    return peers[ring.order[index % ring.n + 1]]
end


return M
