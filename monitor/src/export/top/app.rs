//! The state of `top` and what each key does to it; no terminal here, so it is tested with
//! plain key values.

use leakscope_api::types::{SiteVerdict, VerdictsResponse};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::view::{self, Row, RowKey, SortKey};

/// What the loop does after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

#[derive(Debug, Default)]
pub struct App {
    /// Where the verdicts come from, for the header (`127.0.0.1:9464`, `pid 42`).
    pub source: String,
    /// The latest verdicts received (kept while the source fails, so the screen goes stale
    /// rather than blank).
    pub verdicts: Option<VerdictsResponse>,
    /// Why the latest refresh failed; cleared by the next success.
    pub error: Option<String>,
    pub sort: SortKey,
    /// The filter on site names in force.
    pub filter: String,
    /// The filter being typed after `/`, until Enter applies it or Esc clears it.
    pub editing: Option<String>,
    /// The site the user selected, followed across refreshes and re-sorts. Until a key
    /// moves the selection, it is the top row, whichever site that is.
    selected: Option<RowKey>,
    /// The selected position: used when no site was selected, or it went away.
    index: usize,
}

impl App {
    pub fn new(source: String) -> Self {
        Self {
            source,
            ..Self::default()
        }
    }

    /// A refresh: new verdicts, or the reason there are none.
    pub fn update(&mut self, result: Result<VerdictsResponse, String>) {
        match result {
            Ok(verdicts) => {
                self.verdicts = Some(verdicts);
                self.error = None;
            }
            Err(error) => self.error = Some(error),
        }
        self.settle();
    }

    /// The table as shown now.
    pub fn rows(&self) -> Vec<Row> {
        self.verdicts
            .as_ref()
            .map(|v| view::rows(v, self.sort, &self.filter))
            .unwrap_or_default()
    }

    /// The selected row's position in [`App::rows`], if there is a row.
    pub fn selected_index(&self) -> Option<usize> {
        let rows = self.rows();
        if rows.is_empty() {
            return None;
        }
        Some(
            self.selected
                .as_ref()
                .and_then(|key| rows.iter().position(|r| &r.key == key))
                .unwrap_or(self.index.min(rows.len() - 1)),
        )
    }

    /// The selected site with its evidence.
    pub fn selected_site(&self) -> Option<&SiteVerdict> {
        let verdicts = self.verdicts.as_ref()?;
        let index = self.selected_index()?;
        view::visible(verdicts, self.sort, &self.filter)
            .get(index)
            .copied()
    }

    /// After the rows changed: the selected site keeps the selection if it is still shown,
    /// else the row now at its place takes it.
    fn settle(&mut self) {
        let Some(key) = &self.selected else {
            return;
        };
        let rows = self.rows();
        match rows.iter().position(|r| &r.key == key) {
            Some(index) => self.index = index,
            None => {
                self.selected = rows
                    .get(self.index.min(rows.len().saturating_sub(1)))
                    .map(|r| r.key.clone());
            }
        }
    }

    fn select(&mut self, index: usize) {
        let rows = self.rows();
        if let Some(last) = rows.len().checked_sub(1) {
            self.index = index.min(last);
            self.selected = Some(rows[self.index].key.clone());
        }
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::Continue;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(draft) = &mut self.editing {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing.take().unwrap_or_default();
                    self.settle();
                }
                KeyCode::Esc => {
                    self.editing = None;
                    self.filter.clear();
                    self.settle();
                }
                KeyCode::Backspace => {
                    draft.pop();
                }
                KeyCode::Char(c) => draft.push(c),
                _ => {}
            }
            return Action::Continue;
        }
        let current = self.selected_index().unwrap_or(0);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Down | KeyCode::Char('j') => self.select(current + 1),
            KeyCode::Up | KeyCode::Char('k') => self.select(current.saturating_sub(1)),
            KeyCode::PageDown => self.select(current + 10),
            KeyCode::PageUp => self.select(current.saturating_sub(10)),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(usize::MAX),
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.settle();
            }
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            _ => {}
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use leakscope_api::types::{SiteKind, Verdict};
    use ratatui::crossterm::event::KeyCode;

    use super::*;
    use crate::export::top::view::tests::{site, verdicts};

    fn press(app: &mut App, code: KeyCode) -> Action {
        app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    fn names(app: &App) -> Vec<String> {
        app.rows().into_iter().map(|r| r.site).collect()
    }

    fn three() -> VerdictsResponse {
        verdicts(vec![
            site("app::leak_forever", Verdict::Suspect, 0.9, 2.0, 100.0),
            site("app::ok_bounded", Verdict::Ok, 0.0, 0.0, 5.0),
            site("app::worker", Verdict::WarmingUp, 0.0, 0.5, 50.0),
        ])
    }

    #[test]
    fn quits_on_q_esc_and_ctrl_c() {
        let mut app = App::new("x".into());
        assert_eq!(press(&mut app, KeyCode::Char('q')), Action::Quit);
        assert_eq!(press(&mut app, KeyCode::Esc), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(app.on_key(ctrl_c), Action::Quit);
        // Even while typing a filter.
        press(&mut app, KeyCode::Char('/'));
        assert_eq!(app.on_key(ctrl_c), Action::Quit);
    }

    #[test]
    fn filter_applies_on_enter_and_esc_clears_it() {
        let mut app = App::new("x".into());
        app.update(Ok(three()));
        press(&mut app, KeyCode::Char('/'));
        typed(&mut app, "leak_forx");
        press(&mut app, KeyCode::Backspace);
        // Typing a filter does not quit on `q` nor filter yet.
        typed(&mut app, "q");
        press(&mut app, KeyCode::Backspace);
        assert_eq!(names(&app).len(), 3);
        assert_eq!(app.editing.as_deref(), Some("leak_for"));
        press(&mut app, KeyCode::Enter);
        assert_eq!(names(&app), ["app::leak_forever"]);
        assert_eq!(app.editing, None);
        // `/` starts from the filter in force; Esc clears it.
        press(&mut app, KeyCode::Char('/'));
        assert_eq!(app.editing.as_deref(), Some("leak_for"));
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.filter, "");
        assert_eq!(names(&app).len(), 3);
    }

    #[test]
    fn selection_moves_and_follows_its_site() {
        let mut app = App::new("x".into());
        assert_eq!(app.selected_index(), None);
        press(&mut app, KeyCode::Down); // no rows: nothing happens
        app.update(Ok(three()));
        assert_eq!(app.selected_index(), Some(0));
        // Until a key moves it, the selection is the top row, whichever site rises there.
        let mut risen = three();
        risen.sites[2].score = 1.0;
        app.update(Ok(risen));
        assert_eq!(app.selected_site().unwrap().site, "app::worker");
        app.update(Ok(three()));
        press(&mut app, KeyCode::Char('j'));
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down); // stops at the last row
        assert_eq!(app.selected_site().unwrap().site, "app::ok_bounded");
        press(&mut app, KeyCode::Char('k'));
        assert_eq!(app.selected_site().unwrap().site, "app::worker");
        // Re-sorting by name moves the row; the selection follows it.
        press(&mut app, KeyCode::Char('s'));
        press(&mut app, KeyCode::Char('s'));
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.sort, SortKey::Name);
        assert_eq!(app.selected_index(), Some(2));
        assert_eq!(app.selected_site().unwrap().site, "app::worker");
        // The site goes away: the selection stays at its place.
        let mut fewer = three();
        fewer.sites.retain(|s| s.site != "app::worker");
        app.update(Ok(fewer));
        assert_eq!(app.selected_index(), Some(1));
        assert_eq!(app.selected_site().unwrap().site, "app::ok_bounded");
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_verdicts() {
        let mut app = App::new("x".into());
        app.update(Ok(three()));
        app.update(Err("daemon unreachable: refused".into()));
        assert_eq!(app.error.as_deref(), Some("daemon unreachable: refused"));
        assert_eq!(names(&app).len(), 3);
        app.update(Ok(three()));
        assert_eq!(app.error, None);
        assert_eq!(app.rows()[0].kind, SiteKind::Task.as_str());
    }
}
