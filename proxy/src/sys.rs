//! The few system calls std, tokio and nix do not wrap: how much of what we wrote to a unix
//! socket its reader has not consumed yet (`SIOCOUTQ`), and signals through a pidfd, which
//! stay with the process they were opened for even if its PID is reused.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes written to the unix stream socket `fd` that its peer has not read yet (`SIOCOUTQ`,
/// which Linux reports for `AF_UNIX` as the memory of the queued, unread messages).
///
/// `fd` must be an open socket for the duration of the call; the callers hold the stream
/// that owns it.
pub(crate) fn unread_output(fd: RawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the pointer, which points to a
    // live, properly aligned c_int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// A handle on one process that a recycled PID cannot redirect (`pidfd_open`, Linux 5.3).
#[derive(Debug)]
pub(crate) struct PidFd(OwnedFd);

impl PidFd {
    /// Opens the process that has `pid` now. `ESRCH` if there is none.
    pub(crate) fn open(pid: i32) -> io::Result<PidFd> {
        if pid <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the kernel just gave us this fd and nothing else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `signal` to that process; `ESRCH` once it has exited, whoever has its PID now.
    pub(crate) fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(pidfd, sig, info = NULL, flags = 0): a NULL siginfo is
        // allowed and means "as kill(2) would".
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::process::Command;

    #[test]
    fn unread_output_drops_to_zero_once_the_peer_reads() -> io::Result<()> {
        let (mut a, mut b) = UnixStream::pair()?;
        assert_eq!(unread_output(a.as_raw_fd())?, 0);
        a.write_all(b"HTTP/1.1 101 UPGRADED\r\n\r\n")?;
        assert!(unread_output(a.as_raw_fd())? > 0);
        let mut buf = [0u8; 64];
        let n = b.read(&mut buf)?;
        assert_eq!(n, 25);
        assert_eq!(unread_output(a.as_raw_fd())?, 0);
        Ok(())
    }

    #[test]
    fn pidfd_signals_its_process_and_not_a_later_one() -> io::Result<()> {
        let mut child = Command::new("sleep").arg("1000").spawn()?;
        let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
        let pidfd = PidFd::open(pid)?;
        pidfd.send_signal(libc::SIGKILL)?;
        let status = child.wait()?;
        assert!(!status.success(), "{status:?}");
        // Reaped: whatever process gets this PID next, the pidfd no longer reaches any.
        let err = pidfd.send_signal(libc::SIGKILL).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ESRCH));
        assert_eq!(
            PidFd::open(0).err().and_then(|e| e.raw_os_error()),
            Some(libc::ESRCH)
        );
        Ok(())
    }
}
