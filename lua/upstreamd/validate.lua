-- upstreamd.validate: checks an update (the body of POST /upstreamd/update, or snapshot.json)
-- against the contract and turns it into plain Lua tables. Pure: no ngx.* calls.
--
-- Everything is checked before anything is used, and the first bad field is named by its path
-- (`upstreams.kotaemon.servers[2].address: not an IP literal with a port`; indexes count from
-- 0). Values are data only: they are matched against fixed patterns here, and nothing
-- downstream ever turns them into code, patterns or nginx variable names.

local json = require "upstreamd.json"

local find, match, format, lower = string.find, string.match, string.format, string.lower
local type, tonumber, pairs, floor = type, tonumber, pairs, math.floor

local M = {}

--- The balance kinds an update may name.
M.BALANCE = {
    round_robin = true, least_conn = true, ip_hash = true, hash = true, random = true, sticky = true,
}

-- nginx refuses `backup` with these.
local NO_BACKUP = { ip_hash = true, hash = true, random = true, sticky = true }

--- The most servers one upstream may carry.
M.MAX_SERVERS = 10000

local MAX_GENERATION = 2 ^ 53

local SERVER_FIELDS = {
    address = true, weight = true, backup = true, down = true,
    max_fails = true, fail_timeout = true, id = true,
}

local function is_int(v, lo, hi)
    return type(v) == "number" and v == floor(v) and v >= lo and v <= hi
end

-- An IPv4 literal: four decimal octets 0..255, no leading zeros.
local function ipv4(s)
    local a, b, c, d = match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return false
    end
    for _, o in ipairs({ a, b, c, d }) do
        if #o > 3 or (#o > 1 and o:sub(1, 1) == "0") or tonumber(o) > 255 then
            return false
        end
    end
    return true
end

-- An IPv6 literal (no zone): hex groups of 1..4 digits, at most one `::`, eight groups in
-- all, the last two may be an IPv4 literal.
local function ipv6(s)
    if #s < 2 or #s > 45 or find(s, "[^%x:%.]") then
        return false
    end
    local head, tail = s, nil
    local dbl = find(s, "::", 1, true)
    if dbl then
        if find(s, "::", dbl + 1, true) then
            return false
        end
        head, tail = s:sub(1, dbl - 1), s:sub(dbl + 2)
    end
    local groups = 0
    local function count(part, last)
        if part == "" then
            return true
        end
        local pieces = {}
        for p in (part .. ":"):gmatch("([^:]*):") do
            pieces[#pieces + 1] = p
        end
        for i, p in ipairs(pieces) do
            if last and i == #pieces and find(p, ".", 1, true) then
                if not ipv4(p) then
                    return false
                end
                groups = groups + 2
            elseif find(p, "^%x%x?%x?%x?$") then
                groups = groups + 1
            else
                return false
            end
        end
        return true
    end
    if not count(head, tail == nil) or (tail and not count(tail, true)) then
        return false
    end
    if dbl then
        return groups <= 7
    end
    return groups == 8
end

--- Splits `address` ("1.2.3.4:80" or "[::1]:80") into the host nginx takes ("1.2.3.4",
--- "[::1]") and the port; nil when it is not an IP literal with a port 1..65535.
function M.split_address(address)
    if type(address) ~= "string" or #address > 64 then
        return nil
    end
    local host, port = match(address, "^(%d+%.%d+%.%d+%.%d+):(%d+)$")
    if host then
        if not ipv4(host) then
            return nil
        end
    else
        local inner
        inner, port = match(address, "^%[([%x:%.]+)%]:(%d+)$")
        if not inner or not ipv6(inner) then
            return nil
        end
        host = "[" .. inner .. "]"
    end
    if #port > 5 or (#port > 1 and port:sub(1, 1) == "0") then
        return nil
    end
    local p = tonumber(port)
    if p < 1 or p > 65535 then
        return nil
    end
    return host, p
end

local function server(path, s, balance)
    if not json.is_object(s) then
        return nil, path .. ": not an object"
    end
    for k in pairs(s) do
        if not SERVER_FIELDS[k] then
            return nil, format("%s: unknown field %s", path, json.encode(k))
        end
    end
    local host, port = M.split_address(s.address)
    if not host then
        return nil, path .. ".address: not an IP literal with a port"
    end
    local out = {
        address = s.address, host = host, port = port,
        weight = 1, backup = false, down = false, max_fails = 1, fail_timeout = 10,
    }
    if s.weight ~= nil then
        if not is_int(s.weight, 1, 1000) then
            return nil, path .. ".weight: not an integer from 1 to 1000"
        end
        out.weight = s.weight
    end
    for _, flag in ipairs({ "backup", "down" }) do
        if s[flag] ~= nil then
            if type(s[flag]) ~= "boolean" then
                return nil, format("%s.%s: not a boolean", path, flag)
            end
            out[flag] = s[flag]
        end
    end
    if s.max_fails ~= nil then
        if not is_int(s.max_fails, 0, 1000000) then
            return nil, path .. ".max_fails: not an integer from 0 to 1000000"
        end
        out.max_fails = s.max_fails
    end
    if s.fail_timeout ~= nil then
        if not is_int(s.fail_timeout, 0, 31536000) then
            return nil, path .. ".fail_timeout: not a whole number of seconds from 0 to 31536000"
        end
        out.fail_timeout = s.fail_timeout
    end
    if out.backup and NO_BACKUP[balance] then
        return nil, format("%s.backup: nginx refuses backup servers with balance %s", path, balance)
    end
    if s.id ~= nil then
        if type(s.id) ~= "string" or not find(s.id, "^[0-9a-f]+$") or #s.id ~= 16 then
            return nil, path .. ".id: not 16 lower-case hex digits"
        end
        out.id = s.id
    elseif balance == "sticky" then
        return nil, path .. ".id: missing (sticky needs each replica's id)"
    end
    return out
end

local function upstream(path, u, want)
    if not json.is_object(u) then
        return nil, path .. ": not an object"
    end
    for k in pairs(u) do
        if k ~= "balance" and k ~= "servers" then
            return nil, format("%s: unknown field %s", path, json.encode(k))
        end
    end
    if type(u.balance) ~= "string" or not M.BALANCE[u.balance] then
        return nil, path .. ".balance: not one of round_robin, least_conn, ip_hash, hash, random, sticky"
    end
    if u.balance ~= want then
        return nil, format("%s.balance: %s, but the include says %s", path, u.balance, want)
    end
    if not json.is_array(u.servers) then
        return nil, path .. ".servers: not an array"
    end
    if #u.servers > M.MAX_SERVERS then
        return nil, format("%s.servers: more than %d servers", path, M.MAX_SERVERS)
    end
    local servers, seen = {}, {}
    for i, s in ipairs(u.servers) do
        local spath = format("%s.servers[%d]", path, i - 1)
        local out, err = server(spath, s, u.balance)
        if not out then
            return nil, err
        end
        local key = lower(out.address)
        if seen[key] then
            return nil, spath .. ".address: listed twice"
        end
        seen[key] = true
        servers[i] = out
    end
    return { balance = u.balance, servers = servers }
end

--- Validates a decoded update against `config` (upstream name → {balance = ...}, from the
--- include): every configured upstream present, no other. Returns {generation, upstreams =
--- name → {balance, servers = {{address, host, port, weight, backup, down, max_fails,
--- fail_timeout, id}}}}, or nil and the path of the first bad field.
function M.update(doc, config)
    if not json.is_object(doc) then
        return nil, "body: not a JSON object"
    end
    for k in pairs(doc) do
        if k ~= "generation" and k ~= "upstreams" then
            return nil, format("body: unknown field %s", json.encode(k))
        end
    end
    if not is_int(doc.generation, 1, MAX_GENERATION - 1) then
        return nil, "generation: not a positive integer below 2^53"
    end
    if not json.is_object(doc.upstreams) then
        return nil, "upstreams: not an object"
    end
    for name in pairs(doc.upstreams) do
        if not config[name] then
            return nil, format("upstreams: unknown upstream %s", json.encode(name))
        end
    end
    local out = { generation = doc.generation, upstreams = {} }
    for name, c in pairs(config) do
        local u = doc.upstreams[name]
        if u == nil then
            return nil, format("upstreams: %s is missing", json.encode(name))
        end
        local v, err = upstream("upstreams." .. name, u, c.balance)
        if not v then
            return nil, err
        end
        out.upstreams[name] = v
    end
    return out
end

--- Decodes and validates JSON text: the validated update, or nil and the error.
function M.text(text, config)
    local doc, err = json.decode(text)
    if doc == nil then
        return nil, err
    end
    return M.update(doc, config)
end

return M
