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

local crc32 = ngx.crc32_long
local char, floor, sort = string.char, math.floor, table.sort
local sub = string.sub

local M = {}

local function le32(v)
    return char(v % 256, floor(v / 256) % 256, floor(v / 65536) % 256, floor(v / 16777216) % 256)
end

-- "HOST" "\0" "PORT": split at the last colon, as nginx does with the server's name.
local function base(address)
    local i = #address
    while i > 0 and sub(address, i, i) ~= ":" do
        i = i - 1
    end
    if i == 0 then
        return address .. "\0"
    end
    return sub(address, 1, i - 1) .. "\0" .. sub(address, i + 1)
end

--- Builds the ring of `peers` (each with `address` and `weight`, in the include's order):
--- {hash = sorted point values, peer = the peer of each point, n = number of points}.
function M.build(peers)
    local points, n = {}, 0
    for order, p in ipairs(peers) do
        local prefix = base(p.address)
        local prev = 0
        for _ = 1, 160 * p.weight do
            local h = crc32(prefix .. le32(prev))
            n = n + 1
            points[n] = { h, order, p }
            prev = h
        end
    end
    -- nginx's qsort is not stable; equal values are as rare as crc32 collisions, and keeping
    -- the server listed first is as good a tie-break as any.
    sort(points, function(a, b)
        if a[1] ~= b[1] then
            return a[1] < b[1]
        end
        return a[2] < b[2]
    end)
    local ring = { hash = {}, peer = {}, n = 0 }
    for i = 1, n do
        if i == 1 or points[i][1] ~= points[i - 1][1] then
            ring.n = ring.n + 1
            ring.hash[ring.n] = points[i][1]
            ring.peer[ring.n] = points[i][3]
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

--- The peer at 0-based point `index` (taken modulo the ring's size).
function M.peer_at(ring, index)
    return ring.peer[index % ring.n + 1]
end


return M
