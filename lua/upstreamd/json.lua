-- upstreamd.json: a small, strict JSON reader and writer in pure Lua.
--
-- Debian's nginx Lua packages (libnginx-mod-http-lua, lua-resty-core) ship no JSON library, and
-- upstreamd's payloads are small and typed, so this module reads exactly RFC 8259 JSON and
-- nothing else: no comments, no trailing commas, no duplicate keys, no NaN, nesting at most
-- MAX_DEPTH deep. Objects and arrays come back as tables tagged with the metatables
-- `M.OBJECT` and `M.ARRAY`, so that `{}` and `[]` stay distinguishable. Strings are data: the
-- reader never evaluates anything it reads.

local byte, sub, find, char = string.byte, string.sub, string.find, string.char
local concat, floor = table.concat, math.floor
local tonumber, type, pairs, ipairs = tonumber, type, pairs, ipairs
local setmetatable, getmetatable = setmetatable, getmetatable
local format, gsub = string.format, string.gsub

local M = {}

--- Metatable of decoded objects (and of tables `encode` must write as objects).
M.OBJECT = { __name = "json object" }
--- Metatable of decoded arrays (and of tables `encode` must write as arrays).
M.ARRAY = { __name = "json array" }

local MAX_DEPTH = 32

local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- The reader: `s` is the text, each function takes a position and returns (value, next
-- position), or raises a table {msg = ...} caught by `decode`.
local function fail(pos, what)
    error({ msg = format("invalid JSON at byte %d: %s", pos, what) }, 0)
end

local function skip_ws(s, pos)
    local _, e = find(s, "^[ \t\r\n]*", pos)
    return e + 1
end

local function utf8_char(cp)
    if cp < 0x80 then
        return char(cp)
    elseif cp < 0x800 then
        return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40)
    elseif cp < 0x10000 then
        return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
    end
    return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
        0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local function read_string(s, pos)
    -- pos is just after the opening quote.
    local parts, n = {}, 0
    while true do
        local stop = find(s, '[%z\1-\31"\\]', pos)
        if not stop then
            fail(pos, "unterminated string")
        end
        n = n + 1
        parts[n] = sub(s, pos, stop - 1)
        local c = byte(s, stop)
        if c == 34 then -- closing quote
            return concat(parts), stop + 1
        elseif c == 92 then -- backslash
            local e = sub(s, stop + 1, stop + 1)
            if e == "u" then
                local hex = sub(s, stop + 2, stop + 5)
                if not find(hex, "^%x%x%x%x$") then
                    fail(stop, "bad \\u escape")
                end
                local cp = tonumber(hex, 16)
                pos = stop + 6
                if cp >= 0xD800 and cp <= 0xDBFF then
                    local low = sub(s, pos, pos + 5)
                    if not find(low, "^\\u[dD][c-fC-F]%x%x$") then
                        fail(stop, "lone surrogate")
                    end
                    cp = 0x10000 + (cp - 0xD800) * 0x400 + (tonumber(sub(low, 3), 16) - 0xDC00)
                    pos = pos + 6
                elseif cp >= 0xDC00 and cp <= 0xDFFF then
                    fail(stop, "lone surrogate")
                end
                n = n + 1
                parts[n] = utf8_char(cp)
            elseif escapes[e] then
                n = n + 1
                parts[n] = escapes[e]
                pos = stop + 2
            else
                fail(stop, "bad escape")
            end
        else
            fail(stop, "control character in string")
        end
    end
end

local read_value

local function read_array(s, pos, depth)
    local arr, n = setmetatable({}, M.ARRAY), 0
    pos = skip_ws(s, pos)
    if byte(s, pos) == 93 then
        return arr, pos + 1
    end
    while true do
        local v
        v, pos = read_value(s, pos, depth)
        n = n + 1
        arr[n] = v
        pos = skip_ws(s, pos)
        local c = byte(s, pos)
        if c == 93 then
            return arr, pos + 1
        elseif c ~= 44 then
            fail(pos, "expected ',' or ']'")
        end
        pos = pos + 1
    end
end

local function read_object(s, pos, depth)
    local obj = setmetatable({}, M.OBJECT)
    pos = skip_ws(s, pos)
    if byte(s, pos) == 125 then
        return obj, pos + 1
    end
    while true do
        pos = skip_ws(s, pos)
        if byte(s, pos) ~= 34 then
            fail(pos, "expected a string key")
        end
        local k
        k, pos = read_string(s, pos + 1)
        if obj[k] ~= nil then
            fail(pos, "duplicate key")
        end
        pos = skip_ws(s, pos)
        if byte(s, pos) ~= 58 then
            fail(pos, "expected ':'")
        end
        local v
        v, pos = read_value(s, pos + 1, depth)
        obj[k] = v
        pos = skip_ws(s, pos)
        local c = byte(s, pos)
        if c == 125 then
            return obj, pos + 1
        elseif c ~= 44 then
            fail(pos, "expected ',' or '}'")
        end
        pos = pos + 1
    end
end

--- JSON null, as decoded (a unique sentinel, since nil cannot sit in a table).
M.null = setmetatable({}, { __name = "json null" })

read_value = function(s, pos, depth)
    pos = skip_ws(s, pos)
    local c = byte(s, pos)
    if c == 123 or c == 91 then
        if depth >= MAX_DEPTH then
            fail(pos, "nested too deep")
        end
        if c == 123 then
            return read_object(s, pos + 1, depth + 1)
        end
        return read_array(s, pos + 1, depth + 1)
    elseif c == 34 then
        return read_string(s, pos + 1)
    elseif find(s, "^true", pos) then
        return true, pos + 4
    elseif find(s, "^false", pos) then
        return false, pos + 5
    elseif find(s, "^null", pos) then
        return M.null, pos + 4
    end
    -- A number: -?(0|[1-9]digits)(.digits)?([eE][-+]?digits)?
    local _, e = find(s, "^-?%d+", pos)
    if not e then
        fail(pos, "unexpected character")
    end
    if find(s, "^-?0%d", pos) then
        fail(pos, "leading zero")
    end
    local _, f = find(s, "^%.%d+", e + 1)
    e = f or e
    _, f = find(s, "^[eE][-+]?%d+", e + 1)
    e = f or e
    return tonumber(sub(s, pos, e)), e + 1
end

--- Decodes `s`: the value, or nil and a message naming the byte where reading failed.
function M.decode(s)
    if type(s) ~= "string" then
        return nil, "invalid JSON: not a string"
    end
    local ok, v, pos = pcall(read_value, s, 1, 0)
    if not ok then
        if type(v) == "table" then
            return nil, v.msg
        end
        error(v, 0)
    end
    pos = skip_ws(s, pos)
    if pos <= #s then
        return nil, format("invalid JSON at byte %d: trailing data", pos)
    end
    return v
end

--- Whether `v` is a decoded object (or a table tagged as one).
function M.is_object(v)
    return type(v) == "table" and getmetatable(v) == M.OBJECT
end

--- Whether `v` is a decoded array (or a table tagged as one).
function M.is_array(v)
    return type(v) == "table" and getmetatable(v) == M.ARRAY
end

local function quote(str)
    return '"' .. gsub(str, '[%z\1-\31"\\\127]', function(c)
        return format("\\u%04x", byte(c))
    end) .. '"'
end

local function write(v, out)
    local t = type(v)
    if t == "string" then
        out[#out + 1] = quote(v)
    elseif t == "number" then
        if v ~= v or v == math.huge or v == -math.huge then
            out[#out + 1] = "null"
        elseif v == floor(v) and v >= -2 ^ 53 and v <= 2 ^ 53 then
            out[#out + 1] = format("%.0f", v)
        else
            out[#out + 1] = format("%.17g", v)
        end
    elseif t == "boolean" then
        out[#out + 1] = v and "true" or "false"
    elseif v == nil or v == M.null then
        out[#out + 1] = "null"
    elseif t == "table" and (getmetatable(v) == M.ARRAY or (getmetatable(v) ~= M.OBJECT and v[1] ~= nil)) then
        out[#out + 1] = "["
        for i, x in ipairs(v) do
            if i > 1 then
                out[#out + 1] = ","
            end
            write(x, out)
        end
        out[#out + 1] = "]"
    elseif t == "table" then
        -- Keys sorted, so equal tables encode to equal bytes.
        local keys = {}
        for k in pairs(v) do
            keys[#keys + 1] = tostring(k)
        end
        table.sort(keys)
        out[#out + 1] = "{"
        for i, k in ipairs(keys) do
            if i > 1 then
                out[#out + 1] = ","
            end
            out[#out + 1] = quote(k)
            out[#out + 1] = ":"
            local x = v[k]
            if x == nil then
                x = v[tonumber(k)]
            end
            write(x, out)
        end
        out[#out + 1] = "}"
    else
        error("cannot encode a " .. t .. " as JSON")
    end
end

--- Encodes `v` (strings, numbers, booleans, nil/null, tables) as JSON text.
function M.encode(v)
    local out = {}
    write(v, out)
    return concat(out)
end

return M
