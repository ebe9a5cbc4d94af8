//! `meshctl dashboard`: a live terminal dashboard of the mesh's traffic (ratatui).
//!
//! - [`feed`]: a task asking the controller's Stats API every refresh period; the UI never
//!   waits on the network, it reads the latest answers from a `watch` channel;
//! - [`tap_feed`]: another task keeping a tap open on the controller, publishing the latest
//!   requests the same way (the live tap pane);
//! - [`app`]: the state and what keys do (sort, filter, pause, select, drill in, help);
//! - [`ui`]: drawing, a pure function of the state.
//!
//! The terminal is restored when the dashboard ends, also on error or panic (ratatui's
//! `init` installs the panic hook).

mod app;
mod feed;
mod tap_feed;
mod ui;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use tokio::sync::watch;

use crate::GlobalArgs;
use crate::controller::{Controller, ControllerArgs};

/// How often the screen is redrawn (and keys read) when nothing happens.
const TICK: Duration = Duration::from_millis(100);

/// `meshctl dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// The window rates and percentiles cover, e.g. 30s or 1m.
    #[arg(short = 't', long, default_value = "30s", value_parser = crate::demo::parse_duration)]
    window: Duration,
    /// How often to ask the controller.
    #[arg(long, default_value = "2s", value_parser = crate::demo::parse_duration)]
    refresh: Duration,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// What the dashboard shows.
#[derive(Debug, Clone)]
pub struct Options {
    /// The controller.
    pub controller: Controller,
    /// Only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// The title line.
    pub title: String,
    /// The window of rates and percentiles.
    pub window: Duration,
    /// Time between two rounds of data.
    pub refresh: Duration,
}

impl Options {
    /// The defaults of `meshctl dashboard` for `controller`.
    pub fn new(controller: Controller, namespace: Option<String>, title: String) -> Self {
        Options {
            controller,
            namespace,
            title,
            window: Duration::from_secs(30),
            refresh: Duration::from_secs(2),
        }
    }
}

/// Runs `meshctl dashboard`; `namespace` is the global `-n`.
pub fn run(args: DashboardArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let namespace = global.namespace.as_deref();
    let controller = args.controller.resolve(global)?;
    let title = match namespace {
        Some(ns) => format!("mesh dashboard — namespace {ns} — window {:?}", args.window),
        None => format!("mesh dashboard — all namespaces — window {:?}", args.window),
    };
    let options = Options {
        window: args.window,
        refresh: args.refresh,
        ..Options::new(controller, namespace.map(str::to_owned), title)
    };
    run_blocking(options)
}

/// Runs the dashboard on this thread until `q`; the data task runs on the current tokio
/// runtime when there is one (the demo's), else on a small one of its own.
pub fn run_blocking(options: Options) -> anyhow::Result<()> {
    let own_runtime;
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle,
        Err(_) => {
            own_runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            own_runtime.handle().clone()
        }
    };
    let (feed_tx, mut feed_rx) = watch::channel(Arc::new(feed::Feed::default()));
    let (drill_tx, drill_rx) = watch::channel(None);
    let feed_task = handle.spawn(feed::run(
        feed::FeedConfig {
            controller: options.controller.clone(),
            namespace: options.namespace.clone(),
            window: options.window,
            refresh: options.refresh,
        },
        feed_tx,
        drill_rx,
    ));

    let (tap_tx, mut tap_rx) = watch::channel(Arc::new(tap_feed::TapFeed::default()));
    let tap_task = handle.spawn(tap_feed::run(
        options.controller.clone(),
        options.namespace.clone(),
        tap_tx,
    ));

    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let mut app = app::App::new(options.title.clone());
    let result = (|| -> anyhow::Result<()> {
        loop {
            if feed_rx.has_changed().unwrap_or(false) {
                app.apply(feed_rx.borrow_and_update().clone());
            }
            if tap_rx.has_changed().unwrap_or(false) {
                app.apply_tap(tap_rx.borrow_and_update().clone());
            }
            terminal
                .draw(|frame| ui::draw(frame, &app))
                .context("drawing the dashboard")?;
            if !event::poll(TICK).context("reading the terminal")? {
                continue;
            }
            let Event::Key(key) = event::read().context("reading the terminal")? else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            match app.on_key(key) {
                app::Action::None => {}
                app::Action::Quit => return Ok(()),
                app::Action::Drill(target) => {
                    let _ = drill_tx.send(target);
                }
            }
        }
    })();
    ratatui::restore();
    feed_task.abort();
    tap_task.abort();
    result
}
