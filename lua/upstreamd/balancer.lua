-- upstreamd.balancer: the nginx side of `apply = "lua"`. upstreamd pushes each upstream's
-- servers to a local update location; they live in the shared dict `upstreamd`, each worker
-- keeps a parsed copy (refreshed by a timer), and `balancer_by_lua` picks every peer from it,
-- so membership changes need no reload.
--
-- Entry points, each called from one directive of the include upstreamd renders
-- (templates/upstream-lua.conf.j2):
--   init(conf)          init_by_lua: reads the secret and snapshot.json; `nginx -t` fails on
--                       a missing secret or an invalid snapshot (a missing snapshot is fine)
--   init_worker()       init_worker_by_lua: loads the list, then refreshes it every 50 ms
--   balance(name)       balancer_by_lua in `upstream name`
--   header_filter()     header_filter_by_lua (http level): the sticky cookie
--   log()               log_by_lua (http level): least_conn's connection counts
--   serve_update()      content_by_lua of POST /upstreamd/update
--   serve_status()      content_by_lua of GET /upstreamd/status
--
-- The dict holds: "state" = "<generation> <source>\n<validated JSON text>" (one value, so a
-- worker never sees a generation with another generation's list), then the small keys "gen"
-- and "src" for cheap checks, and "w:<pid>" = the generation worker <pid> holds (expiring,
-- so exited workers drop out).

local json = require "upstreamd.json"
local validate = require "upstreamd.validate"
local peers = require "upstreamd.peers"
local ngx_balancer = require "ngx.balancer"
local process = require "ngx.process"

local ngx = ngx
local log, ERR, WARN, NOTICE = ngx.log, ngx.ERR, ngx.WARN, ngx.NOTICE
local find, sub, byte, format = string.find, string.sub, string.byte, string.format
local tonumber, tostring, pairs, type = tonumber, tostring, pairs, type

local M = {}

--- The largest update body accepted, in bytes.
M.MAX_BODY = 8 * 1024 * 1024
--- How often each worker looks for a new generation, in seconds.
M.REFRESH = 0.05
--- How long a worker's generation record outlives its last refresh, in seconds.
M.WORKER_TTL = 5

-- Set by init (in the master, inherited by every worker).
local conf -- {upstreams = name -> {balance, cookie}}
local secret

-- Per worker.
local pools = {} -- name -> pool (upstreamd.peers)
local held = 0 -- the generation this worker's pools come from
local reported = 0 -- when the worker last wrote its record (ngx.now())

local function dict()
    return ngx.shared.upstreamd
end

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local text = f:read("*a")
    f:close()
    return text
end

local function parse_state(state)
    local gen, source, text = string.match(state or "", "^(%d+) (%a+)\n(.*)$")
    return tonumber(gen), source, text
end

local function store(d, gen, source, text)
    local ok, err = d:safe_set("state", gen .. " " .. source .. "\n" .. text)
    if not ok then
        return nil, err
    end
    d:set("src", source)
    d:set("gen", gen)
    return true
end

--- init_by_lua: `c` = {secret_file, lua_dir, upstreams = name -> {balance, cookie}}. Raises
--- (so that `nginx -t` fails) when the secret cannot be read or snapshot.json is invalid.
function M.init(c)
    conf = c
    local text, err = read_file(c.secret_file)
    if not text then
        error("upstreamd: cannot read the secret file: " .. tostring(err), 0)
    end
    secret = string.match(text, "^%s*(.-)%s*$")
    if secret == "" then
        error("upstreamd: the secret file " .. c.secret_file .. " is empty", 0)
    end
    local d = dict()
    if not d then
        error("upstreamd: lua_shared_dict upstreamd is not declared", 0)
    end
    local path = c.lua_dir .. "/snapshot.json"
    local snap, serr = read_file(path)
    local snapshot
    if snap then
        local v, verr = validate.text(snap, c.upstreams)
        if not v then
            error("upstreamd: invalid snapshot " .. path .. ": " .. verr, 0)
        end
        snapshot = v
    elseif not find(tostring(serr), "No such file", 1, true) then
        error("upstreamd: cannot read the snapshot: " .. tostring(serr), 0)
    end
    -- A reload keeps the dict: keep what it holds if it is newer and fits this include.
    local gen, source, kept = parse_state(d:get("state"))
    if gen and not validate.text(kept, c.upstreams) then
        log(WARN, "upstreamd: the list in the shared dict does not fit this configuration; dropped")
        d:delete("state")
        d:delete("gen")
        d:delete("src")
        gen = nil
    end
    if snapshot and (not gen or snapshot.generation > gen) then
        local ok, e = store(d, snapshot.generation, "snapshot", snap)
        if not ok then
            error("upstreamd: cannot store the snapshot in the shared dict: " .. tostring(e), 0)
        end
    elseif gen then
        log(NOTICE, "upstreamd: keeping generation ", gen, " (", source, ") from the shared dict")
    end
end

-- Reads the dict's list into this worker's pools when its generation moved.
local function refresh()
    local d = dict()
    local gen = d:get("gen")
    if gen and gen ~= held then
        local g, _, text = parse_state(d:get("state"))
        local v, err = validate.text(text, conf.upstreams)
        if not v then
            log(ERR, "upstreamd: the shared dict holds an invalid list (", err, "); keeping generation ", held)
        else
            local fresh = {}
            for name, u in pairs(v.upstreams) do
                fresh[name] = peers.build(u, pools[name])
            end
            pools, held = fresh, g
        end
    end
    local now = ngx.now()
    if held ~= 0 and (now - reported >= 1 or d:get("w:" .. ngx.worker.pid()) ~= held) then
        d:set("w:" .. ngx.worker.pid(), held, M.WORKER_TTL)
        reported = now
    end
end

local function tick(premature)
    if premature then
        return
    end
    local ok, err = pcall(refresh)
    if not ok then
        log(ERR, "upstreamd: refreshing the list failed: ", err)
    end
end

--- init_worker_by_lua: loads the list now, then refreshes it every `M.REFRESH` seconds.
function M.init_worker()
    if process.type() ~= "worker" then
        return
    end
    tick(false)
    local ok, err = ngx.timer.every(M.REFRESH, tick)
    if not ok then
        log(ERR, "upstreamd: cannot start the refresh timer: ", err)
    end
end

-- The client's address bytes as ip_hash reads them.
local function ip_hash_addr()
    local b = ngx.var.binary_remote_addr or ""
    if #b == 4 then
        return sub(b, 1, 3)
    elseif #b == 16 then
        return b
    end
    return "\0\0\0"
end

local function pick(name, pool, st, now)
    local balance = pool.balance
    if balance == "round_robin" then
        return peers.round_robin(pool, st.tried, now)
    elseif balance == "hash" then
        st.key = st.key or ngx.var["upstreamd_hash_key_" .. name] or ""
        return peers.chash(pool, st, st.key, now)
    elseif balance == "sticky" then
        if st.cookie == nil then
            st.cookie = ngx.var["cookie_" .. conf.upstreams[name].cookie] or ""
            local p = pool.by_id[st.cookie]
            if p and peers.usable(p, now) then
                return peers.take(p, st.tried, now)
            end
        end
        local key = st.cookie ~= "" and st.cookie or ngx.var.remote_addr or ""
        return peers.chash(pool, st, key, now)
    elseif balance == "ip_hash" then
        return peers.ip_hash(pool, st, ip_hash_addr(), now)
    elseif balance == "least_conn" then
        return peers.least_conn(pool, st.tried, now)
    end
    return peers.random(pool, st.tried, now)
end

--- balancer_by_lua of upstream `name`: picks this try's peer. A retry first counts the
--- previous try's failure. No usable peer: 502 and an error log line.
function M.balance(name)
    local ctx = ngx.ctx
    local st = ctx.upstreamd
    local now = ngx.time()
    if st == nil then
        st = { name = name, pool = pools[name], tried = {} }
        ctx.upstreamd = st
    elseif st.peer then
        local state = ngx_balancer.get_last_failure()
        if state == "failed" and peers.failed(st.peer, now) then
            log(WARN, "upstreamd: upstream server temporarily disabled: ", st.peer.address, " in upstream ", name)
        end
        if st.counted then
            st.peer.conns = st.peer.conns - 1
            st.counted = nil
        end
    end
    local pool = st.pool
    local p = pool and pick(name, pool, st, now)
    if not p then
        log(ERR, "upstreamd: no usable server in upstream ", name, pool and "" or " (no list yet)")
        -- No peer set: nginx falls back to the shell's placeholder, which is `down`, and
        -- answers 502 ("no live upstreams"). (ngx.exit in this phase would answer 500.)
        return
    end
    if st.peer == nil then
        -- The shell's only server is `down`, so nginx starts this request with 0 tries: the
        -- balancer grants one per server not marked down, as nginx's round robin would.
        ngx_balancer.set_more_tries(peers.tries(pool))
    end
    st.peer = p
    if pool.balance == "least_conn" then
        p.conns = p.conns + 1
        st.counted = true
    end
    local ok, err = ngx_balancer.set_current_peer(p.host, p.port)
    if not ok then
        log(ERR, "upstreamd: cannot use ", p.address, " in upstream ", name, ": ", err)
    end
end

--- header_filter_by_lua: for a sticky upstream, sets the affinity cookie as reload mode does:
--- a random value on a first response, then the id of the replica that served, only when
--- it changed.
function M.header_filter()
    local st = ngx.ctx.upstreamd
    if st == nil or st.cookie == nil then
        return
    end
    local value
    if st.cookie == "" then
        value = ngx.var.request_id
    else
        local served = st.peer and st.peer.id
        if served == nil or served == st.cookie then
            return
        end
        value = served
    end
    local cookie = conf.upstreams[st.name].cookie .. "=" .. value .. "; Path=/; HttpOnly; SameSite=Lax"
    local prior = ngx.header["Set-Cookie"]
    if prior == nil then
        ngx.header["Set-Cookie"] = cookie
    elseif type(prior) == "table" then
        prior[#prior + 1] = cookie
        ngx.header["Set-Cookie"] = prior
    else
        ngx.header["Set-Cookie"] = { prior, cookie }
    end
end

--- log_by_lua: the request is over; least_conn's count for its last peer goes down.
function M.log()
    local st = ngx.ctx.upstreamd
    if st and st.counted then
        st.peer.conns = st.peer.conns - 1
        st.counted = nil
    end
end

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say(json.encode(body))
    return ngx.exit(status)
end

-- Compares in time that does not depend on where the strings differ.
local function same(a, b)
    if type(a) ~= "string" or #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        diff = bit.bor(diff, bit.bxor(byte(a, i), byte(b, i)))
    end
    return diff == 0
end

local function authorized()
    local h = ngx.req.get_headers()["authorization"]
    if type(h) ~= "string" then
        return false
    end
    local token = string.match(h, "^Bearer (.+)$")
    return same(token, secret)
end

--- POST /upstreamd/update: validates the whole body, then stores it if its generation is
--- newer than the stored one. 401 without the secret, 400 for a bad body (nothing stored),
--- 409 for a stale or equal generation.
function M.serve_update()
    if not authorized() then
        return reply(401, { error = "missing or wrong Authorization: Bearer <secret>" })
    end
    if ngx.req.get_method() ~= "POST" then
        return reply(405, { error = "use POST" })
    end
    local declared = tonumber(ngx.var.content_length or "")
    if declared and declared > M.MAX_BODY then
        return reply(400, { error = format("body: larger than %d bytes", M.MAX_BODY) })
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil then
        if ngx.req.get_body_file() then
            return reply(400, { error = format("body: larger than %d bytes", M.MAX_BODY) })
        end
        return reply(400, { error = "body: empty" })
    end
    if #body > M.MAX_BODY then
        return reply(400, { error = format("body: larger than %d bytes", M.MAX_BODY) })
    end
    local v, err = validate.text(body, conf.upstreams)
    if not v then
        return reply(400, { error = err })
    end
    local d = dict()
    -- One update at a time across workers: compare and store under a short lock.
    local locked = d:add("lock", true, 5)
    if not locked then
        return reply(503, { error = "another update is being stored; retry" })
    end
    local stored = d:get("gen") or 0
    if v.generation <= stored then
        d:delete("lock")
        return reply(409, { error = "stale generation", generation = stored })
    end
    local ok, serr = store(d, v.generation, "push", body)
    d:delete("lock")
    if not ok then
        return reply(507, { error = "cannot store the list in lua_shared_dict upstreamd: " .. tostring(serr) })
    end
    -- This worker serves from the new list at once; the others within M.REFRESH.
    refresh()
    return reply(200, { generation = v.generation })
end

--- GET /upstreamd/status: the stored generation, where it came from, the master's pid and
--- the generation each live worker holds.
function M.serve_status()
    if not authorized() then
        return reply(401, { error = "missing or wrong Authorization: Bearer <secret>" })
    end
    local d = dict()
    local workers = setmetatable({}, json.OBJECT)
    for _, k in ipairs(d:get_keys(0)) do
        local pid = string.match(k, "^w:(%d+)$")
        if pid then
            workers[pid] = d:get(k)
        end
    end
    return reply(200, {
        generation = d:get("gen") or 0,
        source = d:get("src") or "none",
        master_pid = process.get_master_pid(),
        workers = workers,
    })
end

return M
