//! Process and loopback-HTTP helpers shared by `demo` and `bench`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A child process killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Body of a plain HTTP/1.1 GET on loopback.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// Opens a stream, reads its first chunk and hangs up: a client that went away.
pub fn stream_and_leave(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let _ = stream.read(&mut buf)?;
    Ok(())
}

/// Root, read without libc: the effective uid is the second field of `Uid:`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Starts `leakscope daemon --pid PID` on a free loopback port and waits until it reports
/// the process attached.
pub fn start_leakscope(leakscope: &Path, pid: u32) -> anyhow::Result<(KillOnDrop, SocketAddr)> {
    start_leakscope_with(leakscope, pid, &[])
}

/// As [`start_leakscope`], with extra daemon arguments.
pub fn start_leakscope_with(
    leakscope: &Path,
    pid: u32,
    extra: &[&str],
) -> anyhow::Result<(KillOnDrop, SocketAddr)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let child = Command::new(leakscope)
        .args([
            "daemon",
            "--pid",
            &pid.to_string(),
            "--listen",
            &listen.to_string(),
        ])
        .args(extra)
        .spawn()
        .context("starting leakscope")?;
    let mut daemon = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("leakscope exited with {status}");
        }
        if get(listen, "/metrics").is_ok_and(|m| m.contains("leakscope_attached_processes 1")) {
            return Ok((daemon, listen));
        }
        if Instant::now() > deadline {
            bail!("leakscope did not attach to pid {pid} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
