//! Who may change the network on this host.
//!
//! Routes that change the network (attach, detach, expose, hide, connect, forget) are served
//! only on a unix socket owned by root, group docker (the group of dockerd's socket), mode 0660,
//! so the kernel already keeps other users out. The router checks the connecting process's
//! credentials as well (SO_PEERCRED: root, or a member of that group), because a mode can be
//! changed and a socket passed on. TCP 127.0.0.1:6784 serves reading routes to anyone on the
//! host, as Weave's did.
//!
//! Pure: [`Access`], [`PeerCredentials::authorized`], [`parse_groups`]. Shell: [`bind_socket`],
//! [`peer_credentials`].

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Mode of the API socket: owner and group read/write, nobody else.
pub const SOCKET_MODE: u32 = 0o660;

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Status, report, proxy addresses.
    ReadOnly,
    /// Everything, including routes that change the network.
    Full,
}

/// The credentials of the process at the other end of a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/proc/<pid>/status`; empty when unknown).
    pub groups: Vec<u32>,
    pub pid: Option<i32>,
}

impl PeerCredentials {
    /// Root, or a member of `group` (primary or supplementary). `group` 0 means root only:
    /// gid 0 alone does not make a process root.
    pub fn authorized(&self, group: u32) -> bool {
        self.uid == 0 || (group != 0 && (self.gid == group || self.groups.contains(&group)))
    }
}

/// The supplementary groups in the text of `/proc/<pid>/status` (`Groups:\t1 2 3`).
pub fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path} exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("setting up the API socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Listen on `path`, owned by root:`group`, mode 0660. The socket is bound under a temporary
/// name and renamed into place once its owner and mode are set, so clients never find it with
/// the mode the umask gave it. A stale socket (from a router that died) is replaced.
pub fn bind_socket(path: &Path, group: u32) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) | Err(_) => {}
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(io_err)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::os::unix::fs::chown(&temp, Some(0), Some(group)))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(io_err(e));
    }
    Ok(listener)
}

/// The credentials of the process that connected, with its supplementary groups.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    let cred = stream.peer_cred()?;
    let groups = cred
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| parse_groups(&status))
        .unwrap_or_default();
    Ok(PeerCredentials {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
        pid: cred.pid(),
    })
}

/// What the peer at the other end of `stream` may do: [`Access::Full`] only for root or the
/// socket's group.
pub fn socket_access(stream: &UnixStream, group: u32) -> Access {
    match peer_credentials(stream) {
        Ok(cred) if cred.authorized(group) => Access::Full,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid,
                gid = cred.gid,
                pid = ?cred.pid,
                "API socket client is neither root nor in the socket's group: read-only"
            );
            Access::ReadOnly
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API socket client's credentials: read-only");
            Access::ReadOnly
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(uid: u32, gid: u32, groups: &[u32]) -> PeerCredentials {
        PeerCredentials {
            uid,
            gid,
            groups: groups.to_vec(),
            pid: None,
        }
    }

    #[test]
    fn root_and_the_group_may_change_things() {
        assert!(cred(0, 0, &[]).authorized(999));
        assert!(cred(0, 5, &[]).authorized(0));
        assert!(cred(1000, 999, &[]).authorized(999));
        assert!(cred(1000, 1000, &[4, 999]).authorized(999));
    }

    #[test]
    fn everyone_else_may_not() {
        assert!(!cred(1000, 1000, &[]).authorized(999));
        assert!(!cred(1000, 1000, &[4, 24]).authorized(999));
        // Group 0 means root only: gid 0 does not make a user root.
        assert!(!cred(1000, 0, &[0]).authorized(0));
        assert!(!cred(65534, 65534, &[65534]).authorized(0));
    }

    #[test]
    fn groups_from_proc_status() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n\
                      FDSize:\t256\nGroups:\t4 24 27 999 \nNStgid:\t1\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27, 999]);
        assert_eq!(parse_groups("Name:\tx\nGroups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name:\tx\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Groups:\t4 junk 5\n"), vec![4, 5]);
    }
}
