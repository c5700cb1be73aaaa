//! `leakscope top`: a live view of every site's verdict, refreshed every second, in the
//! spirit of tokio-console's task list. The verdicts come from a running daemon's API
//! ([`api_source`]) or from any other function returning a [`VerdictsResponse`] (an
//! in-process session, wired in `main.rs`).
//!
//! - [`view`]: sites into sorted, filtered table rows; sparklines; numbers as text;
//! - [`app`]: the screen's state and what each key does;
//! - [`render`]: drawing it with ratatui.

pub mod app;
pub mod render;
pub mod view;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use leakscope_api::client::Client;
use leakscope_api::types::VerdictsResponse;
use ratatui::crossterm::event::{self, Event};

use app::{Action, App};

/// How often the verdicts are fetched again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Fetches `/api/v1/sites` from the daemon at `addr`; a failure reads "daemon unreachable: …".
pub fn api_source(addr: SocketAddr) -> impl FnMut() -> Result<VerdictsResponse, String> {
    let client = Client::new(addr);
    move || {
        client
            .json("/api/v1/sites")
            .map_err(|e| format!("daemon unreachable: {e}"))
    }
}

/// Runs the view until the user quits: `fetch` is called every [`REFRESH`]; its error is
/// shown in the header and the next refresh tries again. `source` names where the
/// verdicts come from. The terminal is restored on return and on panic.
pub fn run(
    source: &str,
    mut fetch: impl FnMut() -> Result<VerdictsResponse, String>,
) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!("top draws on a terminal, and standard output is not one");
    }
    // Installs a panic hook that restores the terminal before the panic is printed.
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(err) => {
            ratatui::restore();
            return Err(err).context("setting up the terminal");
        }
    };
    let result = event_loop(&mut terminal, App::new(source.to_string()), &mut fetch);
    ratatui::restore();
    result
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    mut app: App,
    fetch: &mut impl FnMut() -> Result<VerdictsResponse, String>,
) -> anyhow::Result<()> {
    let mut next_refresh = Instant::now();
    loop {
        if Instant::now() >= next_refresh {
            app.update(fetch());
            next_refresh = Instant::now() + REFRESH;
        }
        terminal
            .draw(|frame| render::draw(frame, &app))
            .context("drawing")?;
        // Sleeps until a key or the next refresh, whichever comes first.
        let timeout = next_refresh.saturating_duration_since(Instant::now());
        // Any other event (a resize) is just redrawn at the top of the loop.
        if event::poll(timeout).context("reading the terminal")?
            && let Event::Key(key) = event::read().context("reading the terminal")?
            && app.on_key(key) == Action::Quit
        {
            return Ok(());
        }
    }
}
