//! `[nginx] apply` and the `lua_*` keys: how membership reaches nginx (a reload, or a push to
//! the Lua balancer's local update endpoint).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::Value;

use super::reader::{choice, path, string, Problems, Section};

/// How a membership change reaches nginx (`apply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Render every server into the include, `nginx -t`, SIGHUP (the default; any nginx).
    Reload,
    /// Render the include once with a `balancer_by_lua` shell; push each membership to the
    /// Lua update endpoint (needs Debian's `libnginx-mod-http-lua` and `lua-resty-core`).
    Lua,
}

const APPLY_MODES: &[(&str, ApplyMode)] = &[("reload", ApplyMode::Reload), ("lua", ApplyMode::Lua)];

/// Where nginx's Lua update server listens (`lua_listen`): loopback or a unix socket only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LuaListen {
    /// A loopback IP address and port, `127.0.0.1:9180` or `[::1]:9180`.
    Tcp(SocketAddr),
    /// A unix socket path, written `unix:/run/upstreamd/lua.sock`.
    Unix(PathBuf),
}

impl fmt::Display for LuaListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LuaListen::Tcp(a) => write!(f, "{a}"),
            LuaListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The `lua_*` keys of `[nginx]`; used only with `apply = "lua"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaConfig {
    /// `lua_listen`: where nginx's update server listens, `"127.0.0.1:PORT"`, `"[::1]:PORT"` or
    /// `"unix:/absolute/path.sock"`; anything else is refused. Default `"127.0.0.1:9180"`.
    pub listen: LuaListen,
    /// `lua_secret_file`: the shared secret nginx and upstreamd authenticate pushes with;
    /// created at startup (32 random bytes as hex, mode 0600) when missing. Default
    /// `<state_dir>/lua.secret`, or `<lua_dir>/lua.secret` without a `state_dir`.
    pub secret_file: PathBuf,
    /// `lua_dir`: where upstreamd writes the Lua files and `snapshot.json`. Default
    /// `<directory of output>/upstreamd-lua`.
    pub dir: PathBuf,
    /// `lua_dict_size`: the `lua_shared_dict` size, digits with an optional `k` or `m`;
    /// default `"4m"`.
    pub dict_size: String,
}

impl LuaConfig {
    /// The defaults for an include at `output` and an optional `state_dir`.
    pub fn defaults(output: &Path, state_dir: Option<&Path>) -> Self {
        let dir = default_lua_dir(output);
        Self {
            listen: LuaListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 9180))),
            secret_file: default_secret_file(state_dir, &dir),
            dir,
            dict_size: "4m".into(),
        }
    }
}

/// `<directory of output>/upstreamd-lua`.
fn default_lua_dir(output: &Path) -> PathBuf {
    output
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join("upstreamd-lua")
}

/// `<state_dir>/lua.secret`, else `<lua_dir>/lua.secret`.
fn default_secret_file(state_dir: Option<&Path>, lua_dir: &Path) -> PathBuf {
    state_dir.unwrap_or(lua_dir).join("lua.secret")
}

/// Reads `apply` and the `lua_*` keys of `[nginx]`, recording every problem.
pub(super) fn read(
    s: &mut Section<'_>,
    output: Option<&Path>,
    state_dir: Option<&Path>,
    p: &mut Problems,
) -> (ApplyMode, LuaConfig) {
    let apply = s
        .get("apply", p, choice(APPLY_MODES))
        .unwrap_or(ApplyMode::Reload);
    let listen = s.get("lua_listen", p, listen);
    let secret_file = s.get("lua_secret_file", p, nginx_path);
    let dir = s.get("lua_dir", p, nginx_path);
    let dict_size = s.get("lua_dict_size", p, dict_size);
    let mut cfg = LuaConfig::defaults(output.unwrap_or(Path::new("/")), state_dir);
    if let Some(dir) = dir {
        cfg.secret_file = default_secret_file(state_dir, &dir);
        cfg.dir = dir;
    }
    if let Some(file) = secret_file {
        cfg.secret_file = file;
    }
    if let Some(listen) = listen {
        cfg.listen = listen;
    }
    if let Some(size) = dict_size {
        cfg.dict_size = size;
    }
    if apply == ApplyMode::Lua {
        // Defaults derived from `output`/`state_dir` go into nginx string literals too.
        for (key, path) in [("lua_dir", &cfg.dir), ("lua_secret_file", &cfg.secret_file)] {
            if let Err(message) = check_nginx_path(path) {
                p.add(&s.key_path(key), format!("(default) {message}"));
            }
        }
    }
    (apply, cfg)
}

/// `lua_listen`: loopback `IP:port` or `unix:/absolute/path`.
fn listen(v: &Value) -> Result<LuaListen, String> {
    let text = string(v)?;
    if let Some(socket) = text.strip_prefix("unix:") {
        let path = PathBuf::from(socket);
        check_nginx_path(&path)?;
        return Ok(LuaListen::Unix(path));
    }
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!("{text:?} is not a loopback address and port such as \"127.0.0.1:9180\", nor \"unix:/path.sock\"")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{text:?} is not a loopback address: the update endpoint must not be reachable from other hosts (use 127.0.0.1, ::1 or a unix socket)"
        ));
    }
    if addr.port() == 0 {
        return Err(format!("{text:?} needs a port from 1 to 65535"));
    }
    Ok(LuaListen::Tcp(addr))
}

/// A path that is written into an nginx string literal.
fn nginx_path(v: &Value) -> Result<PathBuf, String> {
    let p = path(v)?;
    check_nginx_path(&p)?;
    Ok(p)
}

/// Absolute, and free of what would end or bend an nginx string literal.
fn check_nginx_path(p: &Path) -> Result<(), String> {
    let text = p.to_string_lossy();
    if p.is_relative() {
        return Err(format!(
            "{text:?} is a relative path; give an absolute path"
        ));
    }
    if let Some(c) = text.chars().find(|c| {
        matches!(c, '"' | '\'' | ';' | '{' | '}' | '$' | '\\' | '[' | ']')
            || c.is_whitespace()
            || c.is_control()
    }) {
        return Err(format!(
            "{text:?} contains {c:?}: paths written into nginx's config may not contain quotes, `;`, braces, brackets, `$`, backslashes, whitespace or control characters"
        ));
    }
    Ok(())
}

/// `lua_dict_size`: digits and an optional `k`/`m` suffix, at least 128k (nginx's minimum is
/// a few pages; a list of 10,000 servers needs about 2 MiB).
fn dict_size(v: &Value) -> Result<String, String> {
    let text = string(v)?;
    let lower = text.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, 1u64 << 10),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1 << 20),
            None => (lower.as_str(), 1),
        },
    };
    let bytes = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten()
        .and_then(|n| n.checked_mul(unit));
    match bytes {
        Some(b) if (128 << 10..=1 << 30).contains(&b) => Ok(lower),
        Some(_) => Err(format!("{text:?} must be from 128k to 1024m")),
        None => Err(format!("{text:?} is not a size such as \"4m\" or \"512k\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_toml(text: &str) -> Result<(ApplyMode, LuaConfig), Vec<String>> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut p = Problems::default();
        let mut s = Section::root(&table);
        let got = read(
            &mut s,
            Some(Path::new("/etc/nginx/conf.d/up.conf")),
            None,
            &mut p,
        );
        s.finish(&mut p);
        if p.is_empty() {
            Ok(got)
        } else {
            Err(p
                .into_vec()
                .into_iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect())
        }
    }

    #[test]
    fn reload_is_the_default_and_lua_keys_default_beside_the_output() {
        let (apply, lua) = read_toml("").unwrap();
        assert_eq!(apply, ApplyMode::Reload);
        assert_eq!(lua.listen.to_string(), "127.0.0.1:9180");
        assert_eq!(lua.dir, Path::new("/etc/nginx/conf.d/upstreamd-lua"));
        assert_eq!(
            lua.secret_file,
            Path::new("/etc/nginx/conf.d/upstreamd-lua/lua.secret")
        );
        assert_eq!(lua.dict_size, "4m");
    }

    #[test]
    fn lua_mode_takes_a_unix_socket_and_ipv6_loopback() {
        let (apply, lua) =
            read_toml("apply = \"lua\"\nlua_listen = \"unix:/run/upstreamd/lua.sock\"").unwrap();
        assert_eq!(apply, ApplyMode::Lua);
        assert_eq!(
            lua.listen,
            LuaListen::Unix("/run/upstreamd/lua.sock".into())
        );
        let (_, lua) = read_toml("lua_listen = \"[::1]:9999\"").unwrap();
        assert_eq!(lua.listen.to_string(), "[::1]:9999");
    }

    #[test]
    fn every_bad_lua_key_is_reported_at_once() {
        let errors = read_toml(
            "apply = \"lau\"\nlua_listen = \"0.0.0.0:9180\"\nlua_secret_file = \"/etc/a b\"\nlua_dir = \"rel/dir\"\nlua_dict_size = \"4g\"",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:#?}");
        for (err, want) in errors.iter().zip([
            "apply: \"lau\" is not one of reload, lua (did you mean `lua`?)",
            "lua_listen: \"0.0.0.0:9180\" is not a loopback address",
            "lua_secret_file: \"/etc/a b\" contains ' '",
            "lua_dir: \"rel/dir\" is a relative path",
            "lua_dict_size: \"4g\" is not a size",
        ]) {
            assert!(err.starts_with(want), "{err}\nwanted: {want}");
        }
    }

    #[test]
    fn paths_that_would_break_an_nginx_string_are_refused() {
        for bad in ["/a\"b", "/a;b", "/a{b", "/a$b", "/a\nb", "/a\\b", "/a]==]b"] {
            assert!(check_nginx_path(Path::new(bad)).is_err(), "{bad:?}");
        }
        assert!(check_nginx_path(Path::new("/var/lib/upstreamd/lua.secret")).is_ok());
    }

    #[test]
    fn the_secret_defaults_into_the_state_dir_when_there_is_one() {
        let lua = LuaConfig::defaults(Path::new("/x/up.conf"), Some(Path::new("/var/lib/u")));
        assert_eq!(lua.secret_file, Path::new("/var/lib/u/lua.secret"));
        assert_eq!(lua.dir, Path::new("/x/upstreamd-lua"));
    }
}
