//! Telling systemd how the daemon is doing: `READY`, `STATUS`, `WATCHDOG`, `RELOADING`, `STOPPING`.
//!
//! The protocol is sd_notify(3): one datagram of `KEY=value` lines to the socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with `@`). Without that
//! variable — run by hand, in a container, under a plain `Type=simple` unit — every call is a
//! no-op that returns `Ok`. Failures are returned, never panicked on: the caller logs them
//! and carries on, since nginx is served whether or not systemd hears from us.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// Why a notification did not reach systemd.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` names something other than an absolute path or `@abstract` name.
    #[error("NOTIFY_SOCKET `{0}` is neither an absolute path nor an abstract socket name (`@…`)")]
    UnsupportedAddress(String),
    /// The address is well formed but the kernel refuses it (too long, for one).
    #[error("NOTIFY_SOCKET `{socket}` is not a usable socket address: {source}")]
    InvalidAddress {
        /// The socket address as given.
        socket: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// No datagram socket could be created to send from.
    #[error("failed to create a datagram socket to notify systemd: {0}")]
    Socket(#[source] io::Error),
    /// Sending failed: systemd gone, the socket path wrong, or the message too large.
    #[error("failed to send `{message}` to systemd at `{socket}`: {source}")]
    Send {
        /// The socket address.
        socket: String,
        /// The message that was not sent.
        message: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// `CLOCK_MONOTONIC` could not be read for `RELOADING=1`.
    #[error("failed to read CLOCK_MONOTONIC for RELOADING=1: {0}")]
    Clock(#[source] nix::Error),
}

/// Where notifications go, parsed once from `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Nowhere: not started by systemd with `Type=notify`.
    Off,
    /// A socket file.
    Path(OsString),
    /// A Linux abstract socket: the name after the `@`.
    Abstract(Vec<u8>),
    /// Something sd_notify does not accept; reported on every send.
    Unsupported(OsString),
}

impl Target {
    fn parse(socket: &OsStr) -> Target {
        let bytes = socket.as_bytes();
        match bytes.first() {
            None => Target::Off,
            Some(b'/') => Target::Path(socket.to_owned()),
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            Some(_) => Target::Unsupported(socket.to_owned()),
        }
    }

    fn display(&self) -> String {
        match self {
            Target::Off => String::new(),
            Target::Path(p) | Target::Unsupported(p) => p.to_string_lossy().into_owned(),
            Target::Abstract(name) => format!("@{}", String::from_utf8_lossy(name)),
        }
    }

    fn address(&self) -> Result<SocketAddr, NotifyError> {
        let invalid = |source| NotifyError::InvalidAddress {
            socket: self.display(),
            source,
        };
        match self {
            Target::Path(path) => SocketAddr::from_pathname(path).map_err(invalid),
            Target::Abstract(name) => SocketAddr::from_abstract_name(name).map_err(invalid),
            Target::Unsupported(_) | Target::Off => {
                Err(NotifyError::UnsupportedAddress(self.display()))
            }
        }
    }
}

/// A handle on systemd's notification socket; cheap to clone and share between tasks.
///
/// Protocol order for the caller: `ready()` once the first file is in place (or the startup
/// deadline passed); `watchdog()` every `watchdog_interval()`; on SIGHUP `reloading()`, then
/// `ready()` again when the new config is running; `stopping()` on the way out. `status()`
/// whenever there is a one-line summary worth showing in `systemctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    target: Target,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    ///
    /// No (or an empty) `NOTIFY_SOCKET` gives a notifier that does nothing. The watchdog is
    /// on when `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID`, if set, is our pid
    /// (otherwise the watchdog belongs to another process that passed its environment on).
    /// The variables are left in place: children (`nginx -t`, a `reload_command`) inherit
    /// them, which is harmless with `NotifyAccess=main`, where systemd ignores their datagrams.
    pub fn from_env() -> Notifier {
        Notifier::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var_os("WATCHDOG_USEC"),
            std::env::var_os("WATCHDOG_PID"),
            std::process::id(),
        )
    }

    /// The pure half of [`Notifier::from_env`]: the three variables' values and our pid.
    fn from_vars(
        socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        pid: u32,
    ) -> Notifier {
        let number = |v: Option<OsString>| v.and_then(|v| v.to_str()?.trim().parse::<u64>().ok());
        let ours = match watchdog_pid {
            None => true,
            Some(p) => number(Some(p)) == Some(u64::from(pid)),
        };
        let usec = number(watchdog_usec).filter(|_| ours);
        match socket {
            Some(socket) => Notifier::new(socket, usec),
            None => Notifier::disabled(),
        }
    }

    /// A notifier for an explicit socket, read as `$NOTIFY_SOCKET` would be (a path, or
    /// `@name` for an abstract socket; empty means off), and an optional watchdog timeout in
    /// microseconds (`$WATCHDOG_USEC`; 0 means off).
    pub fn new(socket: impl Into<OsString>, watchdog_usec: Option<u64>) -> Notifier {
        Notifier {
            target: Target::parse(&socket.into()),
            watchdog: watchdog_usec
                .filter(|&usec| usec > 0)
                .map(Duration::from_micros),
        }
    }

    /// A notifier that sends nothing and has no watchdog.
    pub fn disabled() -> Notifier {
        Notifier {
            target: Target::Off,
            watchdog: None,
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target != Target::Off
    }

    /// How often to call [`Notifier::watchdog`]: half the `WatchdogSec=` timeout, as
    /// sd_watchdog_enabled(3) advises; `None` when systemd watches no one here.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// `READY=1`: startup (or a reload) is complete.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `STATUS=…`: a one-line summary for `systemctl status`. Line breaks become spaces.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.send(&status_message(text))
    }

    /// `WATCHDOG=1`: still alive. Harmless when no watchdog is configured.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (systemd 253 and later match it against the
    /// reload request). Send [`Notifier::ready`] once the new config runs.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.send(&reloading_message(monotonic_usec()?))
    }

    /// `STOPPING=1`: shutting down.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    fn send(&self, message: &str) -> Result<(), NotifyError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let address = self.target.address()?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        let failed = |source| NotifyError::Send {
            socket: self.target.display(),
            message: message.to_owned(),
            source,
        };
        let sent = socket
            .send_to_addr(message.as_bytes(), &address)
            .map_err(failed)?;
        if sent != message.len() {
            return Err(failed(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            )));
        }
        Ok(())
    }
}

/// `STATUS=` and the text on one line: systemd reads a newline as the start of the next field.
fn status_message(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

/// `CLOCK_MONOTONIC` in microseconds: the clock systemd stamps reload requests with.
fn monotonic_usec() -> Result<u64, NotifyError> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(NotifyError::Clock)?;
    // The monotonic clock never reads negative; the conversions cannot fail in practice.
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec()).unwrap_or(0);
    Ok(secs * 1_000_000 + nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Stands in for systemd: a datagram socket bound in a fresh temporary directory.
    struct FakeSystemd {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeSystemd {
        fn new() -> FakeSystemd {
            let dir = tempfile::tempdir().expect("create a temp dir");
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("set a read timeout");
            FakeSystemd {
                _dir: dir,
                path,
                socket,
            }
        }

        fn notifier(&self) -> Notifier {
            Notifier::new(self.path.as_os_str(), None)
        }

        fn path(&self) -> &Path {
            &self.path
        }
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    fn assert_nothing_waiting(socket: &UnixDatagram) {
        socket.set_nonblocking(true).expect("set non-blocking");
        let mut buf = [0u8; 16];
        let err = socket.recv(&mut buf).expect_err("no further datagram");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn each_call_sends_its_exact_datagram() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        notifier.ready().unwrap();
        assert_eq!(receive(&systemd.socket), "READY=1");
        notifier.watchdog().unwrap();
        assert_eq!(receive(&systemd.socket), "WATCHDOG=1");
        notifier.stopping().unwrap();
        assert_eq!(receive(&systemd.socket), "STOPPING=1");
        notifier.status("3 of 3 kotaemon replicas up").unwrap();
        assert_eq!(
            receive(&systemd.socket),
            "STATUS=3 of 3 kotaemon replicas up"
        );
        assert_nothing_waiting(&systemd.socket);
    }

    #[test]
    fn status_is_kept_on_one_line() {
        let systemd = FakeSystemd::new();
        systemd
            .notifier()
            .status("reload failed:\nnginx -t said\r\nno")
            .unwrap();
        assert_eq!(
            receive(&systemd.socket),
            "STATUS=reload failed: nginx -t said  no"
        );
    }

    #[test]
    fn reloading_carries_the_monotonic_clock_in_microseconds() {
        let systemd = FakeSystemd::new();
        let before = monotonic_usec().unwrap();
        systemd.notifier().reloading().unwrap();
        let after = monotonic_usec().unwrap();
        let got = receive(&systemd.socket);
        let stamp = got
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected datagram {got:?}"));
        let stamp: u64 = stamp.parse().expect("a number of microseconds");
        assert!(
            (before..=after).contains(&stamp),
            "{before} <= {stamp} <= {after}"
        );
    }

    #[test]
    fn abstract_socket_names_start_with_an_at_sign() {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "upstreamd-notify-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).expect("bind an abstract socket");
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::new(format!("@{name}"), None).ready().unwrap();
        assert_eq!(receive(&systemd), "READY=1");
    }

    #[test]
    fn without_a_socket_every_call_is_a_quiet_no_op() {
        for notifier in [
            Notifier::disabled(),
            Notifier::new("", Some(30_000_000)),
            Notifier::from_vars(None, os("30000000"), None, 1),
        ] {
            assert!(!notifier.is_enabled());
            notifier.ready().unwrap();
            notifier.status("x").unwrap();
            notifier.watchdog().unwrap();
            notifier.reloading().unwrap();
            notifier.stopping().unwrap();
        }
        assert_eq!(Notifier::disabled().watchdog_interval(), None);
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let err = Notifier::new(path.as_os_str(), None).ready().unwrap_err();
        assert!(
            matches!(&err, NotifyError::Send { message, .. } if message == "READY=1"),
            "{err:?}"
        );
        assert!(err.to_string().contains("READY=1"), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn a_relative_socket_path_is_refused() {
        let err = Notifier::new("run/notify", None).ready().unwrap_err();
        assert!(
            matches!(&err, NotifyError::UnsupportedAddress(s) if s == "run/notify"),
            "{err:?}"
        );
    }

    #[test]
    fn an_overlong_socket_path_is_an_invalid_address() {
        let long = format!("/{}", "x".repeat(200));
        let err = Notifier::new(long, None).ready().unwrap_err();
        assert!(matches!(err, NotifyError::InvalidAddress { .. }), "{err:?}");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        let n = Notifier::from_vars(os("/run/systemd/notify"), os("30000000"), None, 42);
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::new("/run/systemd/notify", Some(1_000));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_micros(500)));
    }

    #[test]
    fn watchdog_is_off_when_it_belongs_to_another_pid() {
        let ours = Notifier::from_vars(os("/s"), os("30000000"), os("42"), 42);
        assert_eq!(ours.watchdog_interval(), Some(Duration::from_secs(15)));
        let theirs = Notifier::from_vars(os("/s"), os("30000000"), os("43"), 42);
        assert_eq!(theirs.watchdog_interval(), None);
        assert!(theirs.is_enabled(), "notifications still go to systemd");
    }

    #[test]
    fn watchdog_is_off_for_zero_or_garbage() {
        for usec in ["0", "", "soon", "-5"] {
            let n = Notifier::from_vars(os("/s"), os(usec), None, 1);
            assert_eq!(n.watchdog_interval(), None, "WATCHDOG_USEC={usec:?}");
        }
        let n = Notifier::from_vars(os("/s"), os("30000000"), os("nobody"), 1);
        assert_eq!(n.watchdog_interval(), None);
    }

    /// Run in a child process by `from_env_reads_the_variables_systemd_sets`, with the
    /// variables set; alone (no `NOTIFY_SOCKET`) it only checks that nothing is sent.
    #[test]
    #[ignore = "run by from_env_reads_the_variables_systemd_sets in a child process"]
    fn child_reports_from_its_environment() {
        let notifier = Notifier::from_env();
        let interval = notifier
            .watchdog_interval()
            .map_or_else(|| "none".to_owned(), |d| d.as_micros().to_string());
        notifier.status(&format!("interval={interval}")).unwrap();
        notifier.ready().unwrap();
    }

    #[test]
    fn from_env_reads_the_variables_systemd_sets() {
        let systemd = FakeSystemd::new();
        let exe = std::env::current_exe().unwrap();
        let run = |pid: Option<&str>| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args([
                "--exact",
                "notify::tests::child_reports_from_its_environment",
                "--ignored",
                "--test-threads=1",
            ])
            .env("NOTIFY_SOCKET", systemd.path())
            .env("WATCHDOG_USEC", "30000000")
            .env_remove("WATCHDOG_PID");
            if let Some(pid) = pid {
                cmd.env("WATCHDOG_PID", pid);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "child failed: {out:?}");
        };
        run(None);
        assert_eq!(receive(&systemd.socket), "STATUS=interval=15000000");
        assert_eq!(receive(&systemd.socket), "READY=1");
        // Pid 1 is never the test: the watchdog is someone else's.
        run(Some("1"));
        assert_eq!(receive(&systemd.socket), "STATUS=interval=none");
        assert_eq!(receive(&systemd.socket), "READY=1");
        assert_nothing_waiting(&systemd.socket);
    }
}
