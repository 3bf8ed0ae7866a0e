//! The files `apply = "lua"` keeps in `lua_dir`: the Lua modules (embedded in the binary) and
//! `snapshot.json`; and the shared secret. Each written atomically, and only when its bytes
//! differ, so that nginx never reads half a file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::nginx::{read_current, write_atomic, NginxError};

/// The Lua modules, as `lua/upstreamd/<name>` in the repository, written to
/// `<lua_dir>/upstreamd/<name>` (nginx finds them through `lua_package_path`).
pub const LUA_FILES: &[(&str, &str)] = &[
    ("json.lua", include_str!("../../../lua/upstreamd/json.lua")),
    (
        "validate.lua",
        include_str!("../../../lua/upstreamd/validate.lua"),
    ),
    (
        "chash.lua",
        include_str!("../../../lua/upstreamd/chash.lua"),
    ),
    (
        "peers.lua",
        include_str!("../../../lua/upstreamd/peers.lua"),
    ),
    (
        "balancer.lua",
        include_str!("../../../lua/upstreamd/balancer.lua"),
    ),
];

/// The name of the last-known membership in `lua_dir`.
pub const SNAPSHOT: &str = "snapshot.json";

/// Writes every embedded Lua module into `dir/upstreamd/` whose bytes differ. Blocking I/O.
pub fn write_lua_files(dir: &Path) -> Result<(), NginxError> {
    let modules = dir.join("upstreamd");
    std::fs::create_dir_all(&modules).map_err(|e| NginxError::io("create", &modules, e))?;
    for (name, text) in LUA_FILES {
        write_if_changed(&modules.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// Writes `snapshot.json` into `dir` (created if missing). Blocking I/O.
pub fn write_snapshot(dir: &Path, json: &str) -> Result<(), NginxError> {
    std::fs::create_dir_all(dir).map_err(|e| NginxError::io("create", dir, e))?;
    write_if_changed(&dir.join(SNAPSHOT), json.as_bytes())
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), NginxError> {
    if read_current(path)?.as_deref() == Some(bytes) {
        return Ok(());
    }
    write_atomic(path, bytes)
}

/// Makes sure `path` holds a secret: when it does not exist, creates it with 32 random bytes
/// as 64 hex digits and mode 0600 (never replacing an existing file). Returns whether it was
/// created. Blocking I/O.
pub fn ensure_secret(path: &Path) -> Result<bool, NginxError> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NginxError::io("create", dir, e))?;
    }
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // Another process made it in between: theirs stands.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(NginxError::io("create", path, e)),
    };
    file.write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| NginxError::io("write", path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_missing_secret_is_created_private_and_an_existing_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/lua.secret");
        assert!(ensure_secret(&path).unwrap());
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(secret.trim().len(), 64);
        assert!(secret.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!ensure_secret(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);
    }

    #[test]
    fn the_snapshot_is_written_into_a_new_directory_and_rewritten_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let lua = dir.path().join("upstreamd-lua");
        write_snapshot(&lua, "{\"generation\":1}").unwrap();
        let path = lua.join(SNAPSHOT);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        write_snapshot(&lua, "{\"generation\":1}").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        write_snapshot(&lua, "{\"generation\":2}").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"generation\":2}"
        );
        write_lua_files(&lua).unwrap();
        let balancer = std::fs::read_to_string(lua.join("upstreamd/balancer.lua")).unwrap();
        assert!(balancer.contains("function M.balance("));
    }
}
