//! Checks of a parsed config against this machine, for `upstreamd check` and start-up: what
//! `run` would otherwise find out only at its first apply.
//!
//! An error is something `run` cannot work with (the include file's directory is missing);
//! a warning is something that may be fine later (nginx creates its pid file's directory
//! when it starts) or elsewhere (`check` run on a build machine without nginx).

use std::path::{Path, PathBuf};

use super::Config;

/// What a preflight found, each with its key path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// Problems that make `run` fail: `check` exits 2.
    pub errors: Vec<String>,
    /// Problems that may be fine: printed, `check` still passes.
    pub warnings: Vec<String>,
}

/// Checks the `[nginx]` paths and commands of `cfg` on this machine; `path_env` is `$PATH`.
pub fn preflight(cfg: &Config, path_env: Option<&str>) -> Preflight {
    let mut out = Preflight::default();
    let nginx = &cfg.nginx;
    let output = &nginx.output;
    if output.is_dir() {
        out.errors.push(format!(
            "nginx.output: `{}` is a directory; name the include file itself, such as `{}`",
            output.display(),
            output.join("upstreamd.conf").display()
        ));
    } else if let Some(dir) = parent(output).filter(|d| !d.is_dir()) {
        out.errors.push(format!(
            "nginx.output: the directory `{}` does not exist (upstreamd writes a temp file beside the include and renames it)",
            dir.display()
        ));
    }
    if let Some(dir) = parent(&nginx.pid_file).filter(|d| !d.is_dir()) {
        out.warnings.push(format!(
            "nginx.pid_file: the directory `{}` does not exist yet; nginx must create `{}` before upstreamd can signal it",
            dir.display(),
            nginx.pid_file.display()
        ));
    }
    for (key, command) in [
        ("test_command", &nginx.test_command),
        ("reload_command", &nginx.reload_command),
    ] {
        let Some(program) = command.first() else {
            continue;
        };
        if find_program(program, path_env).is_none() {
            let where_ = if program.contains('/') {
                "does not exist or is not executable".to_owned()
            } else {
                "is not on PATH".to_owned()
            };
            out.warnings.push(format!(
                "nginx.{key}: the program `{program}` {where_}; every apply will fail until it is there"
            ));
        }
    }
    if nginx.apply == super::ApplyMode::Lua {
        out.warnings
            .extend(lua_module_warning(Path::new(DEBIAN_LUA_MODULE)));
    }
    out
}

/// Where Debian's `libnginx-mod-http-lua` puts the module `apply = "lua"` needs.
const DEBIAN_LUA_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_lua_module.so";

/// A warning when the Lua module is not at `module` (nginx built elsewhere may have it
/// compiled in or in another place: hence a warning, not an error).
fn lua_module_warning(module: &Path) -> Option<String> {
    (!module.exists()).then(|| {
        format!(
            "nginx.apply: \"lua\" needs nginx's Lua module, and `{}` does not exist: on Debian, apt-get install libnginx-mod-http-lua lua-resty-core",
            module.display()
        )
    })
}

/// The directory a file would be written in, when it has one.
fn parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// Where `program` would be run from: itself when it has a `/`, else the first match on
/// `path_env`.
pub fn find_program(program: &str, path_env: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    std::env::split_paths(path_env?)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, output: &Path, test_command: &str) -> Config {
        let text = format!(
            "[nginx]\noutput = {output:?}\npid_file = {pid:?}\ntest_command = {test_command}\n\n\
             [[upstream]]\nname = \"k\"\n[[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:1\"]\n",
            pid = dir.join("run/nginx.pid"),
        );
        crate::config::parse(&text, &|_| None).unwrap()
    }

    #[test]
    fn an_output_in_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &dir.path().join("nope/u.conf"), "[]");
        let p = preflight(&cfg, None);
        assert_eq!(p.errors.len(), 1, "{p:?}");
        assert!(
            p.errors[0].starts_with("nginx.output: the directory"),
            "{p:?}"
        );
    }

    #[test]
    fn lua_mode_without_the_lua_module_is_a_warning_naming_the_packages() {
        let dir = tempfile::tempdir().unwrap();
        let warning = lua_module_warning(&dir.path().join("ngx_http_lua_module.so")).unwrap();
        assert!(
            warning.ends_with("apt-get install libnginx-mod-http-lua lua-resty-core"),
            "{warning}"
        );
        let present = dir.path().join("present.so");
        std::fs::write(&present, "").unwrap();
        assert_eq!(lua_module_warning(&present), None);
    }

    #[test]
    fn an_output_that_is_a_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), dir.path(), "[]");
        let p = preflight(&cfg, None);
        assert!(p.errors[0].contains("is a directory"), "{p:?}");
    }

    #[test]
    fn a_pid_file_in_a_missing_directory_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &dir.path().join("u.conf"), "[]");
        let p = preflight(&cfg, None);
        assert!(p.errors.is_empty(), "{p:?}");
        assert!(
            p.warnings[0].starts_with("nginx.pid_file: the directory"),
            "{p:?}"
        );
    }

    #[test]
    fn a_test_command_that_does_not_exist_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let out = dir.path().join("u.conf");
        let cfg = config(dir.path(), &out, "[\"no-such-nginx-binary\", \"-t\"]");
        let p = preflight(&cfg, Some("/usr/bin:/bin"));
        assert_eq!(
            p.warnings,
            vec!["nginx.test_command: the program `no-such-nginx-binary` is not on PATH; every apply will fail until it is there"]
        );
        let cfg = config(dir.path(), &out, "[\"/no/such/nginx\"]");
        assert!(preflight(&cfg, None).warnings[0].contains("does not exist"));
        let cfg = config(dir.path(), &out, "[\"sh\", \"-c\", \"true\"]");
        assert_eq!(preflight(&cfg, Some("/usr/bin:/bin")), Preflight::default());
    }
}
