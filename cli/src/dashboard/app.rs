//! The dashboard's state and what keys do to it. No terminal and no network here: the UI
//! loop feeds it [`Feed`]s and key events, and [`super::ui`] draws it, so both are tested
//! with plain values.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use mesh_proto::stats::{ResourceRef, StatsRow};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::feed::Feed;
use super::tap_feed::TapFeed;

/// Points of history kept per workload for its sparkline.
pub const HISTORY: usize = 120;

/// Which screen shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Every workload, the sparklines, edges and denials.
    Overview,
    /// One workload: what it calls, its routes, its edges and denials.
    Drill,
}

/// The column the workloads are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Rps,
    Success,
    P99,
    Mtls,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::Rps,
            SortKey::Rps => SortKey::Success,
            SortKey::Success => SortKey::P99,
            SortKey::P99 => SortKey::Mtls,
            SortKey::Mtls => SortKey::Name,
        }
    }

    /// The column's name, as the title shows it.
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::Rps => "rps",
            SortKey::Success => "success",
            SortKey::P99 => "p99",
            SortKey::Mtls => "mtls",
        }
    }
}

/// What the UI loop should do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Leave the dashboard.
    Quit,
    /// Ask the feed for this workload's details (or none).
    Drill(Option<ResourceRef>),
}

/// Everything the dashboard shows.
#[derive(Debug)]
pub struct App {
    /// The title: what is being watched.
    pub title: String,
    pub view: View,
    pub show_help: bool,
    pub paused: bool,
    pub sort: SortKey,
    /// The filter applied to namespace/name (substring).
    pub filter: String,
    /// `Some` while typing a filter: the text so far.
    pub editing_filter: Option<String>,
    /// Index of the selected row in [`App::visible_workloads`].
    pub selected: usize,
    /// The last round shown.
    pub feed: Arc<Feed>,
    /// Requests per second of each workload, oldest first, one point per round.
    pub history: BTreeMap<String, VecDeque<f64>>,
    /// The workload drilled into.
    pub drill_target: Option<ResourceRef>,
    /// The latest requests of the live tap.
    pub tap: Arc<TapFeed>,
}

/// A workload's key in the history: `namespace/kind/name`.
pub fn workload_key(resource: &ResourceRef) -> String {
    format!("{}/{}/{}", resource.namespace, resource.kind, resource.name)
}

impl App {
    /// An empty dashboard titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        App {
            title: title.into(),
            view: View::Overview,
            show_help: false,
            paused: false,
            sort: SortKey::Name,
            filter: String::new(),
            editing_filter: None,
            selected: 0,
            feed: Arc::new(Feed::default()),
            history: BTreeMap::new(),
            drill_target: None,
            tap: Arc::new(TapFeed::default()),
        }
    }

    /// Takes the live tap's latest requests, unless paused.
    pub fn apply_tap(&mut self, tap: Arc<TapFeed>) {
        if !self.paused {
            self.tap = tap;
        }
    }

    /// Takes a new round, unless paused (the feed keeps running; the screen stands still).
    pub fn apply(&mut self, feed: Arc<Feed>) {
        if self.paused || feed.round == self.feed.round {
            return;
        }
        for row in &feed.workloads {
            let Some(resource) = &row.resource else {
                continue;
            };
            let rps = row.requests.map_or(0.0, |r| r.request_rate);
            let points = self.history.entry(workload_key(resource)).or_default();
            points.push_back(rps);
            while points.len() > HISTORY {
                points.pop_front();
            }
        }
        self.feed = feed;
        self.clamp_selection();
    }

    /// The workloads after the filter, in the chosen order.
    pub fn visible_workloads(&self) -> Vec<&StatsRow> {
        let filter = self.filter.to_ascii_lowercase();
        let mut rows: Vec<&StatsRow> = self
            .feed
            .workloads
            .iter()
            .filter(|row| {
                filter.is_empty()
                    || row.resource.as_ref().is_some_and(|r| {
                        format!("{}/{}", r.namespace, r.name)
                            .to_ascii_lowercase()
                            .contains(&filter)
                    })
            })
            .collect();
        let name = |row: &StatsRow| {
            row.resource
                .as_ref()
                .map(|r| (r.namespace.clone(), r.name.clone()))
                .unwrap_or_default()
        };
        let requests = |row: &StatsRow| row.requests.unwrap_or_default();
        match self.sort {
            SortKey::Name => rows.sort_by_key(|row| name(row)),
            // Busiest, worst, slowest first: what needs a look comes up.
            SortKey::Rps => rows.sort_by(|a, b| {
                requests(b)
                    .request_rate
                    .total_cmp(&requests(a).request_rate)
            }),
            SortKey::Success => rows.sort_by(|a, b| {
                let key = |row: &StatsRow| {
                    if super::super::stat::has_traffic(row) {
                        requests(row).success_rate
                    } else {
                        f64::INFINITY
                    }
                };
                key(a).total_cmp(&key(b))
            }),
            SortKey::P99 => rows.sort_by(|a, b| {
                requests(b)
                    .latency_ms_p99
                    .total_cmp(&requests(a).latency_ms_p99)
            }),
            SortKey::Mtls => {
                rows.sort_by(|a, b| requests(a).mtls_share.total_cmp(&requests(b).mtls_share))
            }
        }
        rows
    }

    /// The selected workload, if any.
    pub fn selected_workload(&self) -> Option<ResourceRef> {
        self.visible_workloads()
            .get(self.selected)
            .and_then(|row| row.resource.clone())
    }

    fn clamp_selection(&mut self) {
        let count = self.visible_workloads().len();
        self.selected = self.selected.min(count.saturating_sub(1));
    }

    /// Applies one key.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(text) = &mut self.editing_filter {
            match key.code {
                KeyCode::Enter => {
                    self.filter = std::mem::take(text);
                    self.editing_filter = None;
                    self.selected = 0;
                }
                KeyCode::Esc => self.editing_filter = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return Action::None;
        }
        if self.show_help {
            // Any key closes the help; `q` still quits.
            self.show_help = false;
            return if key.code == KeyCode::Char('q') {
                Action::Quit
            } else {
                Action::None
            };
        }
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('?') => self.show_help = true,
            KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.selected = 0;
            }
            KeyCode::Char('/') => self.editing_filter = Some(self.filter.clone()),
            KeyCode::Down | KeyCode::Char('j') if self.view == View::Overview => {
                let count = self.visible_workloads().len();
                if self.selected + 1 < count {
                    self.selected += 1;
                }
            }
            KeyCode::Up | KeyCode::Char('k') if self.view == View::Overview => {
                self.selected = self.selected.saturating_sub(1);
            }
            KeyCode::Enter if self.view == View::Overview => {
                if let Some(target) = self.selected_workload() {
                    self.view = View::Drill;
                    self.drill_target = Some(target.clone());
                    return Action::Drill(Some(target));
                }
            }
            KeyCode::Esc if self.view == View::Drill => {
                self.view = View::Overview;
                self.drill_target = None;
                return Action::Drill(None);
            }
            KeyCode::Esc if !self.filter.is_empty() => {
                self.filter.clear();
            }
            _ => {}
        }
        Action::None
    }
}
