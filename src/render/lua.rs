//! The include of `apply = "lua"`: a shell whose bytes depend only on the upstreams' names and
//! settings and on the `lua_*` keys, never on membership, so a membership change renders the
//! same bytes and reloads nothing. Rendered from `templates/upstream-lua.conf.j2`.

use minijinja::{AutoEscape, Environment};
use serde::Serialize;

use super::RenderError;
use crate::config::{Balance, LuaConfig, LuaListen};
use crate::decide::Desired;

/// The built-in lua-mode template, `templates/upstream-lua.conf.j2`.
pub const LUA_TEMPLATE: &str = include_str!("../../templates/upstream-lua.conf.j2");

const NAME: &str = "upstream-lua.conf";

#[derive(Serialize)]
struct ShellUpstream<'a> {
    name: &'a str,
    balance: Balance,
    hash_key: Option<&'a str>,
    keepalive: u32,
    affinity_cookie: &'a str,
}

#[derive(Serialize)]
struct ShellLua {
    listen: String,
    /// A TCP listener (always loopback): the template adds `allow`/`deny`.
    loopback: bool,
    secret_file: String,
    lua_dir: String,
    dict_size: String,
}

/// The compiled lua-mode template.
#[derive(Debug)]
pub struct LuaShell {
    env: Environment<'static>,
}

impl LuaShell {
    /// Compiles the built-in template.
    pub fn new() -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_template(NAME, LUA_TEMPLATE)?;
        Ok(Self { env })
    }

    /// The include for these upstreams (in config order) and `lua` settings. Only names and
    /// settings reach it: servers, weights and health never do.
    pub fn render(&self, upstreams: &[&Desired], lua: &LuaConfig) -> Result<String, RenderError> {
        let upstreams: Vec<ShellUpstream<'_>> = upstreams
            .iter()
            .map(|d| ShellUpstream {
                name: d.name.as_str(),
                balance: d.balance,
                hash_key: d.hash_key.as_deref(),
                keepalive: d.keepalive,
                affinity_cookie: &d.affinity_cookie,
            })
            .collect();
        // Config load refused paths that could bend an nginx string literal.
        let lua = ShellLua {
            listen: lua.listen.to_string(),
            loopback: matches!(lua.listen, LuaListen::Tcp(_)),
            secret_file: lua.secret_file.display().to_string(),
            lua_dir: lua.dir.display().to_string(),
            dict_size: lua.dict_size.clone(),
        };
        let tmpl = self.env.get_template(NAME)?;
        Ok(tmpl.render(minijinja::context! {
            upstreams => upstreams,
            lua => lua,
            version => env!("CARGO_PKG_VERSION"),
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::tests::{ep, upstream};
    use crate::decide::{decide, merge};
    use crate::health::Health;

    fn shell(eps: &[crate::model::Endpoint], health: Health) -> String {
        let cfg = upstream("kotaemon", Balance::Sticky);
        let d = decide(&cfg, &merge([eps]), |_| health);
        let lua = LuaConfig::defaults(std::path::Path::new("/etc/nginx/conf.d/u.conf"), None);
        LuaShell::new().unwrap().render(&[&d], &lua).unwrap()
    }

    #[test]
    fn membership_and_health_do_not_change_the_shell_bytes() {
        let one = shell(&[ep("127.0.0.2:1")], Health::Up);
        assert_eq!(
            one,
            shell(&[ep("127.0.0.2:1"), ep("127.0.0.3:2")], Health::Up)
        );
        assert_eq!(one, shell(&[ep("127.0.0.2:1")], Health::Down));
        assert_eq!(one, shell(&[], Health::Up));
        assert!(!one.contains("127.0.0.2"), "{one}");
    }

    #[test]
    fn the_shell_names_the_lua_settings_and_every_upstream() {
        let text = shell(&[], Health::Up);
        for want in [
            "lua_package_path \"/etc/nginx/conf.d/upstreamd-lua/?.lua;;\";",
            "lua_shared_dict upstreamd 4m;",
            "upstream kotaemon {",
            "listen 127.0.0.1:9180;",
            "/etc/nginx/conf.d/upstreamd-lua/lua.secret",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
