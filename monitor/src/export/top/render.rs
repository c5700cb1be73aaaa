//! Drawing `top`'s screen: a header line, the table of sites, the selected site's evidence
//! and remedy, and a footer with the keys.

use leakscope_api::types::{Verdict, VerdictsResponse};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap};

use super::app::App;
use super::view::{self, SPARK_WIDTH};

/// Lines of the evidence pane, borders included.
const DETAIL_HEIGHT: u16 = 7;

pub fn draw(frame: &mut Frame, app: &App) {
    let [header, table, detail, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(DETAIL_HEIGHT),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_line(app)), header);
    draw_table(frame, app, table);
    frame.render_widget(detail_pane(app), detail);
    frame.render_widget(Paragraph::new(footer_line(app)), footer);
}

fn header_line(app: &App) -> Line<'static> {
    let title = Span::styled(
        format!("leakscope top · {} · ", app.source),
        Style::new().add_modifier(Modifier::BOLD),
    );
    if let Some(error) = &app.error {
        let stale = if app.verdicts.is_some() {
            " (showing the last answer)"
        } else {
            ""
        };
        return Line::from(vec![
            title,
            Span::styled(
                format!("{error}; retrying every second{stale}"),
                Style::new().fg(Color::White).bg(Color::Red),
            ),
        ]);
    }
    let Some(verdicts) = &app.verdicts else {
        return Line::from(vec![title, Span::raw("connecting…")]);
    };
    let (sites, suspects) = view::counts(verdicts);
    let suspects_style = if suspects > 0 {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::Green)
    };
    let mut spans = vec![
        title,
        Span::raw(format!("{sites} sites, ")),
        Span::styled(
            format!("{suspects} suspect{}", if suspects == 1 { "" } else { "s" }),
            suspects_style,
        ),
        Span::raw(format!(" · {}", window(verdicts))),
    ];
    if verdicts.sites_dropped > 0 {
        spans.push(Span::styled(
            format!(" · {} sites not tracked (limit)", verdicts.sites_dropped),
            Style::new().fg(Color::Yellow),
        ));
    }
    Line::from(spans)
}

fn window(verdicts: &VerdictsResponse) -> String {
    format!(
        "window {}, sampled every {}",
        crate::analysis::verdict::duration(verdicts.window_seconds),
        crate::analysis::verdict::duration(verdicts.sample_seconds)
    )
}

fn verdict_style(verdict: Verdict) -> Style {
    match verdict {
        Verdict::Suspect => Style::new()
            .fg(Color::White)
            .bg(Color::Red)
            .add_modifier(Modifier::BOLD),
        Verdict::Ok => Style::new().fg(Color::Green),
        Verdict::WarmingUp => Style::new().fg(Color::DarkGray),
        Verdict::CannotJudge => Style::new().fg(Color::Yellow),
    }
}

fn draw_table(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.rows();
    let title = match (&app.filter, rows.len()) {
        (f, n) if f.is_empty() => format!(" sites ({n}) · sorted by {} ", app.sort.label()),
        (f, n) => format!(
            " sites ({n}) matching \"{f}\" · sorted by {} ",
            app.sort.label()
        ),
    };
    let block = Block::bordered().title(title);
    if rows.is_empty() {
        let text = match (&app.verdicts, app.filter.is_empty()) {
            (None, _) => "waiting for the first answer…",
            (Some(_), true) => {
                "no sites yet: leakscope shows a site once its tasks or heap are seen"
            }
            (Some(_), false) => "no site matches the filter (/ then Esc clears it)",
        };
        frame.render_widget(Paragraph::new(text).block(block), area);
        return;
    }
    let numeric = |text: String| Cell::from(Line::from(text).right_aligned());
    let table_rows = rows.into_iter().map(|r| {
        let site_style = if r.verdict == Verdict::Suspect {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        Row::new(vec![
            Cell::from(Span::styled(r.verdict_text, verdict_style(r.verdict))),
            Cell::from(r.kind),
            numeric(r.pid),
            numeric(r.current),
            numeric(r.growth_per_minute),
            numeric(r.oldest),
            Cell::from(Span::styled(r.trend, Style::new().fg(Color::Cyan))),
            Cell::from(Span::styled(r.site, site_style)),
        ])
    });
    let header = Row::new(vec![
        Cell::from("VERDICT"),
        Cell::from("KIND"),
        numeric("PID".into()),
        numeric("NOW".into()),
        numeric("GROWTH/MIN".into()),
        numeric("OLDEST".into()),
        Cell::from("TREND"),
        Cell::from("SITE"),
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths = [
        Constraint::Length(12),
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(11),
        Constraint::Length(7),
        Constraint::Length(SPARK_WIDTH as u16),
        Constraint::Fill(1),
    ];
    let table = Table::new(table_rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut state = TableState::default().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn detail_pane(app: &App) -> Paragraph<'static> {
    let block = Block::bordered().title(" selected ");
    let Some(site) = app.selected_site() else {
        return Paragraph::new("").block(block);
    };
    let mut lines = vec![Line::from(vec![
        Span::styled(site.site.clone(), Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(match &site.location {
            Some(location) => format!("  at {location}"),
            None => String::new(),
        }),
        Span::styled(
            format!("  (pid {}, {})", site.pid, site.exe),
            Style::new().fg(Color::DarkGray),
        ),
    ])];
    lines.push(Line::from(vec![
        Span::styled("evidence: ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(site.reason.clone()),
    ]));
    if let Some(remedy) = &site.remedy {
        lines.push(Line::from(vec![
            Span::styled(
                "remedy:   ",
                Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
            ),
            Span::raw(remedy.clone()),
        ]));
    }
    Paragraph::new(lines)
        .block(block)
        .wrap(Wrap { trim: false })
}

fn footer_line(app: &App) -> Line<'static> {
    let key = |k: &'static str| Span::styled(k, Style::new().add_modifier(Modifier::REVERSED));
    if let Some(draft) = &app.editing {
        return Line::from(vec![
            Span::raw(format!("filter site names: {draft}▏  ")),
            key("Enter"),
            Span::raw(" apply  "),
            key("Esc"),
            Span::raw(" clear"),
        ]);
    }
    Line::from(vec![
        key("q"),
        Span::raw(" quit  "),
        key("↑↓/jk"),
        Span::raw(" select  "),
        key("s"),
        Span::raw(format!(" sort ({})  ", app.sort.label())),
        key("/"),
        Span::raw(" filter (Esc clears)"),
    ])
}

#[cfg(test)]
mod tests {
    use leakscope_api::types::Verdict;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::export::top::view::tests::{site, verdicts};

    fn screen(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, app)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn shows_the_sites_the_selection_and_the_keys() {
        let mut app = App::new("127.0.0.1:9464".into());
        app.update(Ok(verdicts(vec![
            site("app::leak_forever", Verdict::Suspect, 0.9, 2.0, 100.0),
            site("app::ok_bounded", Verdict::Ok, 0.0, 0.0, 5.0),
        ])));
        let text = screen(&app, 120, 20);
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?} in\n{text}"))
                .to_string()
        };
        assert!(line("leakscope top").contains("127.0.0.1:9464 · 2 sites, 1 suspect"));
        assert!(line("window").contains("window 10 s, sampled every 1 s"));
        let suspect = line("SUSPECT");
        assert!(suspect.contains("▶"), "{suspect}");
        assert!(suspect.contains("app::leak_forever"), "{suspect}");
        assert!(suspect.contains("+120"), "{suspect}");
        assert!(line("ok  ").contains("app::ok_bounded"));
        assert!(line("evidence:").contains("app::leak_forever reason"));
        assert!(line("remedy:").contains("app::leak_forever remedy"));
        assert!(line("quit").contains("sort (score)"));
    }

    #[test]
    fn an_unreachable_daemon_is_said_in_the_header() {
        let mut app = App::new("127.0.0.1:9".into());
        app.update(Err("daemon unreachable: Connection refused".into()));
        let text = screen(&app, 120, 12);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains("daemon unreachable: Connection refused; retrying every second"),
            "{text}"
        );
        assert!(text.contains("waiting for the first answer"), "{text}");
    }
}
