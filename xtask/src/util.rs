//! `leakscope-testkit` as `bench` and `demo` use it: the same helpers as the integration
//! tests, with errors as `anyhow` for the command line.

use std::path::Path;
use std::process::Child;

use anyhow::anyhow;
pub use leakscope_testkit::openmetrics::sum;
pub use leakscope_testkit::{Client, Proc, is_root};

/// A child process killed and reaped when dropped.
pub fn kill_on_drop(child: Child, name: &str) -> Proc {
    Proc {
        child,
        name: name.to_string(),
    }
}

/// Starts `leakscope daemon --pid PID EXTRA…` on a free loopback port and waits until it
/// reports the process attached.
pub fn start_leakscope(
    leakscope: &Path,
    pid: u32,
    extra: &[&str],
) -> anyhow::Result<(Proc, Client)> {
    let mut args = vec!["--pid".to_string(), pid.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (daemon, client) =
        leakscope_testkit::start_daemon(leakscope, &args).map_err(|e| anyhow!(e))?;
    leakscope_testkit::wait_attached(&client, pid).map_err(|e| anyhow!(e))?;
    Ok((daemon, client))
}

/// A metric family's value summed over its series (0 when absent).
pub fn metric(client: &Client, family: &str) -> anyhow::Result<f64> {
    Ok(sum(&client.metrics()?, family, &[]))
}
