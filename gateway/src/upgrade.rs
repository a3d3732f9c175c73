//! Zero-downtime restart and binary upgrade by listener hand-over, as nginx's binary upgrade
//! and systemd's socket activation do it.
//!
//! On SIGUSR2 (sent by `gateway upgrade`) the running process (the *old* one) starts the
//! binary at the path it was started from, with its own arguments, handing it its listening
//! sockets (the HTTPS/HTTP listeners and the admin listener) as inherited file descriptors
//! named in [`LISTENERS_ENV`], and one end of a socket pair named in [`CHANNEL_ENV`]. The *new*
//! process adopts each inherited socket whose listener has the same name and configured
//! address in its configuration instead of binding it (it binds the others and closes the
//! inherited sockets it has no listener for), loads everything, starts accepting, and only
//! then writes one byte on the channel. Until that byte arrives the old process serves as
//! before; if the new process exits first, or the byte does not come within the upgrade
//! timeout, the old one kills it and carries on (the upgrade failed, nothing was lost). Once it
//! arrives, the old process stops accepting and drains: both processes share the same
//! listening sockets, so connections the old one has not accepted are accepted by the new one,
//! and none is refused.
//!
//! The outcome is written next to the pid file (`<pid file>.upgrade`) for `gateway upgrade`
//! to report, and counted in `gateway_upgrades_total{outcome}`.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// The environment variable that names the inherited listening sockets:
/// `FD,CONFIGURED_ADDRESS,NAME` entries separated by `;`; the admin listener's name is
/// [`ADMIN_KEY`].
pub const LISTENERS_ENV: &str = "GATEWAY_UPGRADE_LISTENERS";
/// The environment variable that names the inherited descriptor the new process writes its
/// readiness byte to.
pub const CHANNEL_ENV: &str = "GATEWAY_UPGRADE_CHANNEL";
/// The environment variable that carries the old process's pid (for the log).
pub const PARENT_ENV: &str = "GATEWAY_UPGRADE_FROM";
/// The name the admin listener goes by among the inherited sockets; `@` is not allowed in
/// listener names, so it cannot clash with one.
pub const ADMIN_KEY: &str = "@admin";

/// The byte a new process writes once it serves.
const READY: u8 = b'R';

/// Why an upgrade, or adopting inherited sockets, failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// [`LISTENERS_ENV`] or [`CHANNEL_ENV`] is malformed.
    #[error("{var}: {problem}")]
    BadEnvironment {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// An inherited descriptor is not what it was said to be.
    #[error("inherited descriptor {fd} ({name}): {problem}")]
    BadDescriptor {
        /// The descriptor number.
        fd: RawFd,
        /// The listener it was named for.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Another upgrade is under way in this process.
    #[error("an upgrade is already under way")]
    InProgress,
    /// The new process could not be started.
    #[error("cannot start {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The new process ended before it was ready.
    #[error("the new process (pid {pid}) exited before it was ready: {status}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// The new process was not ready within the upgrade timeout; it was killed.
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; it was killed")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The upgrade timeout.
        timeout: Duration,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl UpgradeError {
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> UpgradeError {
        move |source| UpgradeError::Io { what, source }
    }
}

/// One listening socket inherited from the old process.
struct InheritedSocket {
    fd: OwnedFd,
    bind: SocketAddr,
    name: String,
}

/// What a process started by an upgrade inherited: listening sockets and the readiness
/// channel. Empty for a process started afresh. Sockets not taken by [`Inherited::take`] are
/// closed when it is dropped.
#[derive(Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
    channel: Option<UnixStream>,
    parent: Option<u32>,
}

impl Inherited {
    /// Nothing inherited: every listener is bound.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Reads [`LISTENERS_ENV`] and [`CHANNEL_ENV`], takes ownership of the descriptors they
    /// name (checking each is a listening TCP socket, or a socket for the channel), marks
    /// them close-on-exec and removes the variables from the environment. Call it once, first
    /// thing in `main`, while the process has one thread (it edits the environment).
    pub fn from_env() -> Result<Inherited, UpgradeError> {
        let listeners = std::env::var_os(LISTENERS_ENV);
        let channel = std::env::var_os(CHANNEL_ENV);
        let parent = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse().ok());
        for var in [LISTENERS_ENV, CHANNEL_ENV, PARENT_ENV] {
            std::env::remove_var(var);
        }
        let mut inherited = Inherited {
            parent,
            ..Inherited::default()
        };
        if let Some(list) = listeners {
            let list = list
                .into_string()
                .map_err(|_| UpgradeError::BadEnvironment {
                    var: LISTENERS_ENV,
                    problem: "not UTF-8".into(),
                })?;
            for (fd, bind, name) in parse_listeners(&list)? {
                let fd = adopt(fd, &name)?;
                check_listening(&fd, &name)?;
                inherited.sockets.push(InheritedSocket { fd, bind, name });
            }
        }
        if let Some(channel) = channel {
            let fd: RawFd = channel
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| UpgradeError::BadEnvironment {
                    var: CHANNEL_ENV,
                    problem: format!("{channel:?} is not a descriptor number"),
                })?;
            let fd = adopt(fd, "readiness channel")?;
            inherited.channel = Some(UnixStream::from(fd));
        }
        Ok(inherited)
    }

    /// Whether this process was started by an upgrade.
    pub fn is_upgrade(&self) -> bool {
        self.channel.is_some()
    }

    /// The old process's pid, when this process was started by an upgrade.
    pub fn parent(&self) -> Option<u32> {
        self.parent
    }

    /// Takes the inherited socket of listener `name` configured at `bind`, ready for tokio
    /// (non-blocking). A listener whose address changed in the configuration gets none: it is
    /// bound afresh, and the old socket is closed with this [`Inherited`].
    pub fn take(&mut self, name: &str, bind: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self
            .sockets
            .iter()
            .position(|s| s.name == name && s.bind == bind)?;
        let socket = self.sockets.swap_remove(at);
        let listener = std::net::TcpListener::from(socket.fd);
        // The old process set it already (the flag belongs to the shared file description),
        // but nothing here should depend on that.
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// Tells the old process that this one serves: it stops accepting and drains. Call it
    /// once everything has started (listeners accepting, plugins and models loaded).
    pub fn ready(&mut self) -> Result<(), UpgradeError> {
        if let Some(mut channel) = self.channel.take() {
            channel.write_all(&[READY]).map_err(UpgradeError::io(
                "telling the old process this one is ready",
            ))?;
        }
        Ok(())
    }
}

/// Parses [`LISTENERS_ENV`].
fn parse_listeners(list: &str) -> Result<Vec<(RawFd, SocketAddr, String)>, UpgradeError> {
    let bad = |problem: String| UpgradeError::BadEnvironment {
        var: LISTENERS_ENV,
        problem,
    };
    list.split(';')
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let mut parts = entry.splitn(3, ',');
            let (Some(fd), Some(bind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(format!("{entry:?} is not FD,ADDRESS,NAME")));
            };
            let fd = fd
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| bad(format!("{fd:?} is not a descriptor number above 2")))?;
            let bind = bind
                .parse()
                .map_err(|_| bad(format!("{bind:?} is not an address")))?;
            Ok((fd, bind, name.to_string()))
        })
        .collect()
}

/// Formats [`LISTENERS_ENV`] for `sockets` (descriptor, configured address, name).
fn format_listeners<'a>(sockets: impl Iterator<Item = (RawFd, SocketAddr, &'a str)>) -> String {
    sockets
        .map(|(fd, bind, name)| format!("{fd},{bind},{name}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Takes ownership of inherited descriptor `fd` and marks it close-on-exec, so that it does
/// not leak into a later upgrade's process except as handed over on purpose.
fn adopt(fd: RawFd, name: &str) -> Result<OwnedFd, UpgradeError> {
    let bad = |problem: String| UpgradeError::BadDescriptor {
        fd,
        name: name.to_string(),
        problem,
    };
    // An fcntl on a number that is not open fails with EBADF and touches nothing: checked
    // before anything claims to own the number.
    let flags = {
        // SAFETY: the borrow lives only for this call, and an invalid number is reported by
        // the kernel (EBADF), not undefined behaviour.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_getfd(borrowed)
    };
    flags.map_err(|e| bad(format!("not open ({e})")))?;
    // SAFETY: the old process opened this descriptor for this process and named it in the
    // environment, which this process reads once (`Inherited::from_env` removes the
    // variables); nothing else in this process knows the number, so this is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| bad(format!("cannot mark it close-on-exec ({e})")))?;
    Ok(owned)
}

/// Checks that `fd` is a listening stream socket.
fn check_listening(fd: &OwnedFd, name: &str) -> Result<(), UpgradeError> {
    let bad = |problem: String| UpgradeError::BadDescriptor {
        fd: fd.as_raw_fd(),
        name: name.to_string(),
        problem,
    };
    let kind =
        rustix::net::sockopt::socket_type(fd).map_err(|e| bad(format!("not a socket ({e})")))?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(bad("not a stream socket".into()));
    }
    match rustix::net::sockopt::socket_acceptconn(fd) {
        Ok(true) => Ok(()),
        Ok(false) => Err(bad("not listening".into())),
        Err(e) => Err(bad(format!("cannot tell whether it listens ({e})"))),
    }
}

/// A listening socket this process can hand over: a close-on-exec duplicate of the
/// descriptor its accept loop uses, kept for as long as it serves.
pub(crate) struct HandOver {
    /// The listener's name ([`ADMIN_KEY`] for the admin listener).
    pub(crate) name: String,
    /// The configured address (which may have port 0), not the bound one: the new process
    /// matches it against its own configuration.
    pub(crate) bind: SocketAddr,
    pub(crate) fd: OwnedFd,
}

/// What starting a new process needs besides the sockets.
#[derive(Debug, Clone)]
pub struct Successor {
    /// The binary to start: the path this process was started from, so that a binary
    /// replaced there is the one that starts.
    pub exe: PathBuf,
    /// Its arguments: this process's own.
    pub args: Vec<OsString>,
    /// How long it may take to be ready, loading plugins and models included.
    pub timeout: Duration,
}

impl Successor {
    /// This process's binary and arguments, with `timeout`. Call it at start, before the
    /// binary can be replaced: the path of a replaced binary reads `... (deleted)` from
    /// `/proc/self/exe`. The path is `argv[0]` made absolute when it names a file, or the
    /// first file of that name in `PATH` when it is a bare name (as a shell found it), so a
    /// symlink switched to a new release is followed, as nginx does; else the resolved path
    /// of the running binary.
    pub fn of_this_process(timeout: Duration) -> std::io::Result<Successor> {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from);
        let exe = match argv0 {
            Some(p) if p.components().count() > 1 => std::path::absolute(&p)?,
            Some(p) => match in_path(&p) {
                Some(found) => std::path::absolute(found)?,
                None => std::env::current_exe()?,
            },
            None => std::env::current_exe()?,
        };
        Ok(Successor {
            exe,
            args: args.collect(),
            timeout,
        })
    }
}

/// The first file named `name` in the directories of `PATH`, as a shell looks a command up.
fn in_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Kills the new process if the upgrade is abandoned before it is ready (an error, or the
/// future dropped because SIGTERM came meanwhile).
struct KillUnlessReady(Option<tokio::process::Child>);

impl Drop for KillUnlessReady {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Starts `successor` with `sockets` inherited and waits until it says it serves; returns
/// its pid. On any error the new process is gone and this one serves on untouched.
pub(crate) async fn start_successor(
    sockets: &[HandOver],
    successor: &Successor,
) -> Result<u32, UpgradeError> {
    let (ours, theirs) = UnixStream::pair().map_err(UpgradeError::io("making the channel"))?;
    // Descriptors the new process inherits: duplicates without close-on-exec, closed here
    // once it has started. Nothing else in this process starts programs, so none of them can
    // leak into another one meanwhile.
    let mut inheritable = Vec::with_capacity(sockets.len());
    for s in sockets {
        let fd = rustix::io::dup(&s.fd)
            .map_err(|e| UpgradeError::io("duplicating a listening socket")(e.into()))?;
        inheritable.push((fd, s.bind, s.name.as_str()));
    }
    let channel = rustix::io::dup(&theirs)
        .map_err(|e| UpgradeError::io("duplicating the channel")(e.into()))?;
    drop(theirs);
    let listeners = format_listeners(
        inheritable
            .iter()
            .map(|(fd, bind, name)| (fd.as_raw_fd(), *bind, *name)),
    );
    let child = tokio::process::Command::new(&successor.exe)
        .args(&successor.args)
        .env(LISTENERS_ENV, listeners)
        .env(CHANNEL_ENV, channel.as_raw_fd().to_string())
        .env(PARENT_ENV, std::process::id().to_string())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: successor.exe.clone(),
            source,
        })?;
    drop(inheritable);
    // Only the new process holds its end now: when it exits, the read below ends.
    drop(channel);
    let pid = child.id().unwrap_or(0);
    let mut child = KillUnlessReady(Some(child));
    tracing::info!(pid, exe = %successor.exe.display(), "upgrade: started the new process; serving until it is ready");

    ours.set_nonblocking(true)
        .map_err(UpgradeError::io("setting up the channel"))?;
    let mut ours = tokio::net::UnixStream::from_std(ours)
        .map_err(UpgradeError::io("setting up the channel"))?;
    let mut byte = [0u8; 1];
    let said = tokio::time::timeout(successor.timeout, ours.read(&mut byte)).await;
    match said {
        Ok(Ok(1)) if byte[0] == READY => {
            // It serves, and outlives this process.
            child.0.take();
            Ok(pid)
        }
        Ok(_) => {
            // The channel closed: it exited (or closed it without being ready).
            let status = match child.0.as_mut() {
                Some(c) => match tokio::time::timeout(Duration::from_secs(5), c.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    _ => "it closed the readiness channel".to_string(),
                },
                None => "unknown".to_string(),
            };
            Err(UpgradeError::Exited { pid, status })
        }
        Err(_) => {
            if let Some(c) = child.0.as_mut() {
                let _ = c.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            }
            Err(UpgradeError::Timeout {
                pid,
                timeout: successor.timeout,
            })
        }
    }
}

/// `gateway run --pid-file`: this process's pid, written atomically (a temp file renamed over
/// it), so a reader never sees half a number.
pub fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    write_atomic(path, format!("{pid}\n").as_bytes())
}

/// Removes the pid file when it still names `pid` (after an upgrade it names the new
/// process, which must keep it).
pub fn remove_pid_file(path: &Path, pid: u32) {
    if read_pid_file(path).ok() == Some(pid) {
        let _ = std::fs::remove_file(path);
    }
}

/// Reads a pid file.
pub fn read_pid_file(path: &Path) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {:?} is not a pid", path.display(), text.trim()),
        )
    })
}

/// Where the old process reports an upgrade's outcome for `gateway upgrade`:
/// `<pid file>.upgrade`.
pub fn outcome_path(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".upgrade");
    PathBuf::from(name)
}

/// An upgrade's outcome as `gateway upgrade` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new process (this pid) serves; the old one drains.
    HandedOver(u32),
    /// The old process serves on; why the new one did not take over.
    Failed(String),
}

impl Outcome {
    /// Writes the outcome file (atomically).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = match self {
            Outcome::HandedOver(pid) => format!("handed-over {pid}\n"),
            Outcome::Failed(why) => format!("failed {}\n", why.replace('\n', " ")),
        };
        write_atomic(path, text.as_bytes())
    }

    /// Reads an outcome file; `None` if it is not (yet) one.
    pub fn read(path: &Path) -> Option<Outcome> {
        let text = std::fs::read_to_string(path).ok()?;
        let line = text.lines().next()?;
        if let Some(pid) = line.strip_prefix("handed-over ") {
            return pid.trim().parse().ok().map(Outcome::HandedOver);
        }
        line.strip_prefix("failed ")
            .map(|why| Outcome::Failed(why.to_string()))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Sends SIGUSR2 to `pid` (`gateway upgrade`).
pub fn signal_upgrade(pid: u32) -> std::io::Result<()> {
    let pid = pid_of(pid)?;
    rustix::process::kill_process(pid, rustix::process::Signal::USR2).map_err(Into::into)
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    pid_of(pid).is_ok_and(|p| rustix::process::test_kill_process(p).is_ok())
}

fn pid_of(pid: u32) -> std::io::Result<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a pid"))
}

/// Reads one byte from a blocking socket (tests of the channel).
#[cfg(test)]
fn read_byte(s: &mut UnixStream) -> std::io::Result<u8> {
    use std::io::Read as _;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_lists_round_trip_and_bad_ones_are_refused() {
        let a: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let b: SocketAddr = "[::1]:8443".parse().unwrap();
        let text = format_listeners([(5, a, "https"), (6, b, ADMIN_KEY)].into_iter());
        assert_eq!(text, "5,127.0.0.1:0,https;6,[::1]:8443,@admin");
        assert_eq!(
            parse_listeners(&text).unwrap(),
            vec![(5, a, "https".to_string()), (6, b, ADMIN_KEY.to_string())]
        );
        for bad in [
            "5,127.0.0.1:0",
            "x,127.0.0.1:0,a",
            "1,127.0.0.1:0,a",
            "5,nowhere,a",
        ] {
            assert!(parse_listeners(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn outcomes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = outcome_path(&dir.path().join("gw.pid"));
        assert!(path.ends_with("gw.pid.upgrade"));
        assert_eq!(Outcome::read(&path), None);
        for o in [
            Outcome::HandedOver(42),
            Outcome::Failed("the new process exited\nbadly".into()),
        ] {
            o.write(&path).unwrap();
            let back = Outcome::read(&path).unwrap();
            match (&o, &back) {
                (Outcome::Failed(_), Outcome::Failed(why)) => {
                    assert_eq!(why, "the new process exited badly")
                }
                _ => assert_eq!(o, back),
            }
        }
    }

    #[test]
    fn only_a_listening_socket_is_adopted_as_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = OwnedFd::from(listener);
        check_listening(&fd, "https").unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(check_listening(&OwnedFd::from(a), "https").is_err());
    }

    #[test]
    fn the_channel_carries_readiness() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut inherited = Inherited {
            channel: Some(theirs),
            ..Inherited::default()
        };
        assert!(inherited.is_upgrade());
        inherited.ready().unwrap();
        assert_eq!(read_byte(&mut ours).unwrap(), READY);
        // Said once; the channel is closed after.
        assert_eq!(std::io::Read::read(&mut ours, &mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn a_socket_is_taken_only_for_its_name_and_configured_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap();
        let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut inherited = Inherited {
            sockets: vec![InheritedSocket {
                fd: OwnedFd::from(listener),
                bind: configured,
                name: "https".into(),
            }],
            ..Inherited::default()
        };
        assert!(inherited.take("http", configured).is_none());
        assert!(inherited.take("https", bound).is_none());
        let got = inherited.take("https", configured).unwrap();
        assert_eq!(got.local_addr().unwrap(), bound);
        assert!(inherited.take("https", configured).is_none());
    }

    #[test]
    fn a_bare_command_name_is_looked_up_in_path() {
        let sh = in_path(Path::new("sh")).expect("sh is in PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(
            in_path(Path::new("no-such-command-for-gateway-tests")),
            None
        );
    }

    #[test]
    fn descriptors_that_are_not_open_are_refused() {
        // A number far above anything this test process opened.
        assert!(matches!(
            adopt(1_000_000, "https"),
            Err(UpgradeError::BadDescriptor { .. })
        ));
    }
}
