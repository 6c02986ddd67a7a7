//! Running commands: [`Cmd`] (a program with arguments, environment, optional stdin and a
//! time-out), what it printed ([`Out`]), and long-running children ([`Background`]) killed on drop.
//!
//! Each command runs in its own process group, so a time-out or a drop kills what it started too.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use crate::sys;
use crate::wait::{eventually, patience};

/// What a finished command printed, and how it exited.
#[derive(Clone)]
pub struct Out {
    /// The command as shown in messages: `[host] program args...`.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// `self` if the command succeeded, else an error showing the command, status and output.
    pub fn ok(self) -> Result<Out> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!("command failed: {self}"))
        }
    }

    /// `self` if the command failed (as a test expected), else an error showing its output.
    pub fn fail(self) -> Result<Out> {
        if self.success() {
            Err(anyhow!("command succeeded but should have failed: {self}"))
        } else {
            Ok(self)
        }
    }

    /// stdout without surrounding whitespace.
    pub fn stdout_trim(&self) -> &str {
        self.stdout.trim()
    }

    /// stdout then stderr, for checking a message wherever the program printed it.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}",
            self.cmdline,
            describe(self.status)
        )?;
        write!(f, "\n--- stdout ---\n{}", tail(&self.stdout, 4000))?;
        write!(f, "\n--- stderr ---\n{}", tail(&self.stderr, 4000))
    }
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// The last `max` bytes of `text` (at a char boundary), marked when cut.
pub(crate) fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[...]{}", &text[start..])
}

/// Default time-out of one command: four times the patience, at least two minutes.
pub fn default_timeout() -> Duration {
    (patience() * 4).max(Duration::from_secs(120))
}

/// A command to run: built by [`crate::Host::cmd`] (inside a test host) or [`Cmd::new`] (here).
pub struct Cmd {
    label: String,
    /// Program and arguments placed before the program (e.g. `nsenter -t PID -m -n --`).
    prefix: Vec<OsString>,
    /// Working directory; inside a host it becomes nsenter's `--wd=DIR`.
    wd: Option<OsString>,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    /// How many leading `envs` are the harness's defaults, left out of [`Cmd::cmdline`].
    default_envs: usize,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl Cmd {
    /// A command run directly in the test process's namespaces.
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            label: String::new(),
            prefix: Vec::new(),
            wd: None,
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            default_envs: 0,
            stdin: None,
            timeout: default_timeout(),
        }
    }

    pub(crate) fn wrapped(label: &str, prefix: Vec<OsString>, program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            label: label.to_string(),
            prefix,
            ..Cmd::new(program)
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Cmd
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Cmd {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Marks the environment set so far as defaults: [`Cmd::cmdline`] leaves them out.
    pub(crate) fn envs_are_defaults(mut self) -> Cmd {
        self.default_envs = self.envs.len();
        self
    }

    /// Feeds these bytes to the command's stdin, then closes it (default: stdin is /dev/null).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(input.into());
        self
    }

    /// Kills the command (and its process group) when it runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// Working directory of the command (inside a host: a path of the host's mount namespace).
    pub fn current_dir(mut self, dir: impl AsRef<OsStr>) -> Cmd {
        self.wd = Some(dir.as_ref().to_owned());
        self
    }

    /// How the command is shown in messages.
    pub fn cmdline(&self) -> String {
        let mut s = String::new();
        if !self.label.is_empty() {
            s.push_str(&format!("[{}] ", self.label));
        }
        for (k, v) in &self.envs[self.default_envs..] {
            if let Some(v) = v {
                s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }

    fn build(&self) -> Command {
        let mut command = if let Some((first, rest)) = self.prefix.split_first() {
            let mut c = Command::new(first);
            // The prefix (nsenter ...) ends with "--": its own options go before that.
            let (opts, dashdash) = rest.split_at(rest.len().saturating_sub(1));
            c.args(opts);
            if let Some(dir) = &self.wd {
                let mut opt = OsString::from("--wd=");
                opt.push(dir);
                c.arg(opt);
            }
            c.args(dashdash).arg(&self.program);
            c
        } else {
            let mut c = Command::new(&self.program);
            if let Some(dir) = &self.wd {
                c.current_dir(dir);
            }
            c
        };
        command.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => command.env(k, v),
                None => command.env_remove(k),
            };
        }
        command.process_group(0);
        command
    }

    /// Starts the child with piped output; stdin, if given, is fed from a thread so a command
    /// that does not read it cannot block us.
    fn start(self) -> Result<(std::process::Child, String)> {
        let cmdline = self.cmdline();
        let mut command = self.build();
        command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start `{cmdline}`"))?;
        if let (Some(input), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        Ok((child, cmdline))
    }

    /// Runs the command to completion. `Err` only when it cannot start or times out; a non-zero exit
    /// is an `Ok(Out)` (use [`Out::ok`] / [`Out::fail`]).
    pub fn run(self) -> Result<Out> {
        let timeout = self.timeout;
        let (child, cmdline) = self.start()?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let (output, timed_out) = match rx.recv_timeout(timeout) {
            Ok(output) => (output, false),
            Err(_) => {
                sys::signal_group(pid, Signal::SIGKILL);
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(output) => (output, true),
                    Err(_) => bail!(
                        "`{cmdline}` timed out after {:?} and did not die when killed",
                        timeout
                    ),
                }
            }
        };
        let output = output.with_context(|| format!("waiting for `{cmdline}`"))?;
        let out = Out {
            cmdline,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if timed_out {
            bail!("timed out after {:?}: {out}", timeout);
        }
        Ok(out)
    }

    /// Runs the command and requires success.
    pub fn ok(self) -> Result<Out> {
        self.run()?.ok()
    }

    /// Starts the command and leaves it running; it is killed when the [`Background`] drops.
    pub fn spawn(self) -> Result<Background> {
        let (mut child, cmdline) = self.start()?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(collect(pipe, Arc::clone(&stdout)));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(collect(pipe, Arc::clone(&stderr)));
        }
        Ok(Background {
            cmdline,
            child,
            stdout,
            stderr,
            readers,
        })
    }
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if let Ok(mut s) = into.lock() {
                        s.push_str(&text);
                    }
                }
            }
        }
    })
}

/// A running command whose output is collected as it comes; killed (with its process group) on drop.
pub struct Background {
    cmdline: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether the command is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (with [`patience`]) until stdout contains `needle`; returns stdout.
    pub fn wait_for_stdout(&mut self, needle: &str) -> Result<String> {
        self.wait_for(&format!("{needle:?} on stdout"), patience(), |out| {
            out.contains(needle)
        })
    }

    /// Waits until `pred(stdout)` holds, for at most `within`; returns stdout. Fails early when
    /// the command exits without it.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let what = format!("{what} from `{}`", self.cmdline);
        let result = eventually(&what, within, || {
            let out = self.stdout();
            if pred(&out) {
                return Ok(out);
            }
            if !self.is_running() {
                // Exited: once the readers are done the output is complete, no point in waiting.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Ok(self.stdout());
            }
            Err(anyhow!(
                "not yet; stdout so far:\n{}\nstderr so far:\n{}",
                tail(&out, 2000),
                tail(&self.stderr(), 2000)
            ))
        })?;
        if pred(&result) {
            Ok(result)
        } else {
            Err(anyhow!(
                "`{}` exited before printing {what}; stdout:\n{}\nstderr:\n{}",
                self.cmdline,
                tail(&result, 2000),
                tail(&self.stderr(), 2000)
            ))
        }
    }

    /// Kills the command and returns what it printed.
    pub fn stop(mut self) -> (String, String) {
        self.kill();
        (self.stdout(), self.stderr())
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            sys::signal_group(self.child.id(), Signal::SIGKILL);
            let _ = self.child.wait();
        } else {
            // Already exited; still kill what it may have left in its group.
            sys::signal_group(self.child.id(), Signal::SIGKILL);
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_ok_and_fail() -> Result<()> {
        let yes = Cmd::new("sh")
            .args(["-c", "echo hi; echo oops >&2"])
            .run()?;
        assert_eq!(yes.stdout_trim(), "hi");
        assert_eq!(yes.stderr.trim(), "oops");
        assert!(yes.clone().ok().is_ok());
        assert!(yes.fail().is_err());
        let no = Cmd::new("sh").args(["-c", "echo bad >&2; exit 3"]).run()?;
        let err = no.clone().ok().expect_err("exit 3");
        assert!(format!("{err}").contains("code 3"), "{err}");
        assert!(format!("{err}").contains("bad"), "{err}");
        assert!(no.fail().is_ok());
        Ok(())
    }

    #[test]
    fn stdin_is_fed_and_closed() -> Result<()> {
        let out = Cmd::new("cat").stdin("hello\n").ok()?;
        assert_eq!(out.stdout, "hello\n");
        Ok(())
    }

    #[test]
    fn env_and_current_dir() -> Result<()> {
        let out = Cmd::new("sh")
            .args(["-c", "echo $WV_X; pwd"])
            .env("WV_X", "42")
            .current_dir("/")
            .ok()?;
        assert_eq!(out.stdout, "42\n/\n");
        Ok(())
    }

    #[test]
    fn a_hung_command_times_out_with_its_children() -> Result<()> {
        let err = Cmd::new("sh")
            .args(["-c", "echo started; sleep 1000 & wait"])
            .timeout(Duration::from_millis(300))
            .run()
            .expect_err("must time out");
        let text = format!("{err}");
        assert!(text.contains("timed out"), "{text}");
        assert!(text.contains("started"), "{text}");
        Ok(())
    }

    #[test]
    fn background_streams_and_dies_on_drop() -> Result<()> {
        let mut bg = Cmd::new("sh")
            .args(["-c", "echo one; read x; echo two; sleep 1000"])
            .stdin("go\n")
            .spawn()?;
        bg.wait_for_stdout("two")?;
        let pid = bg.pid();
        drop(bg);
        assert_eq!(
            sys::start_time(pid),
            None,
            "process {pid} survived the drop"
        );
        Ok(())
    }

    #[test]
    fn background_wait_stops_early_when_the_command_exits() -> Result<()> {
        let mut bg = Cmd::new("sh").args(["-c", "echo only"]).spawn()?;
        let err = bg
            .wait_for("a second line", Duration::from_secs(20), |o| {
                o.contains("never")
            })
            .expect_err("exits without it");
        assert!(format!("{err}").contains("exited before"), "{err}");
        Ok(())
    }

    #[test]
    fn cmdline_quotes_arguments() {
        let c = Cmd::new("sh").args(["-c", "echo 'a b'"]).env("K", "v");
        assert_eq!(c.cmdline(), r#"K=v sh -c 'echo '\''a b'\'''"#);
    }

    #[test]
    fn tail_cuts_at_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("aé", 1), "[...]");
        assert_eq!(tail("abcdef", 2), "[...]ef");
    }
}
