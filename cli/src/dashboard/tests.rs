//! Render tests: the dashboard drawn on ratatui's `TestBackend` for each view, its text read
//! back and checked; and the keys' effects on the state.

use std::sync::Arc;

use mesh_proto::stats::{Denial, Edge, EgressEdge, RequestStats, ResourceRef, StatsRow};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{Action, App, SortKey, View};
use super::feed::{Drill, Feed};
use super::ui;

fn deploy(name: &str) -> ResourceRef {
    ResourceRef {
        kind: "deployment".into(),
        namespace: "demo".into(),
        name: name.into(),
    }
}

fn row(resource: ResourceRef, rps: f64, success: f64, p50: f64, mtls: f64) -> StatsRow {
    StatsRow {
        resource: Some(resource),
        meshed_pods: 1,
        running_pods: 1,
        requests: Some(RequestStats {
            success_count: (rps * 30.0 * success).round() as u64,
            failure_count: (rps * 30.0 * (1.0 - success)).round() as u64,
            request_rate: rps,
            success_rate: success,
            latency_ms_p50: p50,
            latency_ms_p95: p50 * 1.5,
            latency_ms_p99: p50 * 2.0,
            mtls_share: mtls,
            ..Default::default()
        }),
        tcp: None,
    }
}

fn authority(name: &str, rps: f64, success: f64, p50: f64) -> StatsRow {
    row(
        ResourceRef {
            kind: "authority".into(),
            namespace: "demo".into(),
            name: name.into(),
        },
        rps,
        success,
        p50,
        1.0,
    )
}

fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

fn feed(round: u64, web_rps: f64) -> Feed {
    Feed {
        round,
        workloads: vec![
            row(deploy("authors"), web_rps, 1.0, 35.0, 1.0),
            row(deploy("books"), web_rps, 0.95, 3.0, 1.0),
            row(deploy("traffic"), 0.0, 0.0, 0.0, 0.0),
            row(deploy("web"), web_rps, 0.95, 40.0, 1.0),
        ],
        edges: vec![
            Edge {
                source: Some(deploy("traffic")),
                destination: Some(deploy("web")),
                client_identity: identity("traffic"),
                server_identity: identity("web"),
                no_identity_reason: String::new(),
                request_rate: web_rps,
                success_rate: 0.95,
            },
            Edge {
                source: Some(deploy("web")),
                destination: Some(deploy("books")),
                client_identity: identity("web"),
                server_identity: identity("books"),
                no_identity_reason: String::new(),
                request_rate: web_rps,
                success_rate: 0.95,
            },
        ],
        denials: vec![Denial {
            destination: Some(deploy("archive")),
            policy: "default:deny".into(),
            client_identity: identity("traffic"),
            count: 30,
            rate: 1.0,
            protocol: "http".into(),
        }],
        egress: vec![EgressEdge {
            source: Some(deploy("web")),
            network: "demo/external".into(),
            authority: "api.example.com:443".into(),
            protocol: "tls".into(),
            allowed: 40,
            denied: 3,
            rate: 0.7,
        }],
        drill: None,
        error: None,
    }
}

fn render(app: &App) -> String {
    let mut terminal = Terminal::new(TestBackend::new(130, 42)).expect("a test terminal");
    terminal
        .draw(|frame| ui::draw(frame, app))
        .expect("drawing succeeds");
    let buffer = terminal.backend().buffer();
    let area = buffer.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            line.push_str(buffer[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in\n{screen}"))
}

fn app_with_data() -> App {
    let mut app = App::new("meshctl demo — namespace demo");
    for round in 1..=5 {
        app.apply(Arc::new(feed(round, 2.0 * round as f64)));
    }
    app
}

#[test]
fn the_overview_shows_workloads_sparklines_edges_and_denials() {
    let app = app_with_data();
    let screen = render(&app);
    assert!(screen.contains("meshctl demo — namespace demo"), "{screen}");
    // The workloads table: a row per workload with its numbers.
    let web = line_with(&screen, "web      ");
    for want in [
        "demo", "1/1", "95.00%", "10.0", "40ms", "60ms", "80ms", "100.00%",
    ] {
        assert!(web.contains(want), "{want:?} not in {web:?}");
    }
    let traffic = line_with(&screen, " traffic ");
    assert!(
        traffic.contains(" -  "),
        "an idle workload shows dashes: {traffic:?}"
    );
    // The sparklines, with the latest rate.
    assert!(screen.contains("Requests per second"), "{screen}");
    let spark = line_with(&screen, "authors           10.0");
    assert!(spark.chars().any(|c| "▁▂▃▄▅▆▇█".contains(c)), "{spark:?}");
    // Edges with identities; denials with the policy.
    assert!(
        screen.contains("ns/demo/sa/traffic → ns/demo/sa/web"),
        "{screen}"
    );
    let denial = line_with(&screen, "default:deny");
    assert!(
        denial.contains("archive") && denial.contains("ns/demo/sa/traffic"),
        "{denial:?}"
    );
    assert!(denial.contains("1.0/s"), "{denial:?}");
    // Egress: who called out, to which host, allowed and denied.
    assert!(screen.contains("Leaving the mesh"), "{screen}");
    let egress = line_with(&screen, "api.example.com:443");
    for want in ["web", "demo/external", "tls", "40", "3", "0.7/s"] {
        assert!(egress.contains(want), "{want:?} not in {egress:?}");
    }
    // The footer lists the keys.
    assert!(screen.contains("? help"), "{screen}");
}

#[test]
fn sorting_cycles_columns_and_orders_rows() {
    let mut app = App::new("t");
    let mut data = feed(1, 10.0);
    data.workloads[0] = row(deploy("authors"), 3.0, 1.0, 35.0, 1.0);
    data.workloads[1] = row(deploy("books"), 20.0, 0.5, 3.0, 0.5);
    app.apply(Arc::new(data));
    let order = |app: &App| -> Vec<String> {
        app.visible_workloads()
            .iter()
            .filter_map(|r| r.resource.as_ref().map(|r| r.name.clone()))
            .collect()
    };
    assert_eq!(order(&app), ["authors", "books", "traffic", "web"]);
    app.on_key(key(KeyCode::Char('s')));
    assert_eq!(app.sort, SortKey::Rps);
    assert_eq!(order(&app), ["books", "web", "authors", "traffic"]);
    app.on_key(key(KeyCode::Char('s')));
    assert_eq!(app.sort, SortKey::Success);
    assert_eq!(order(&app), ["books", "web", "authors", "traffic"]);
    app.on_key(key(KeyCode::Char('s')));
    assert_eq!(order(&app)[0], "web", "slowest p99 first");
    let screen = render(&app);
    assert!(screen.contains("sort: p99"), "{screen}");
}

#[test]
fn the_filter_is_typed_applied_and_cleared() {
    let mut app = app_with_data();
    app.on_key(key(KeyCode::Char('/')));
    for c in "bo".chars() {
        app.on_key(key(KeyCode::Char(c)));
    }
    let screen = render(&app);
    assert!(screen.contains("filter: bo▌"), "the prompt shows: {screen}");
    app.on_key(key(KeyCode::Enter));
    let screen = render(&app);
    assert!(screen.contains("filter: bo"), "{screen}");
    assert_eq!(app.visible_workloads().len(), 1);
    assert!(!screen.contains("authors   "), "filtered out: {screen}");
    app.on_key(key(KeyCode::Esc));
    assert_eq!(app.visible_workloads().len(), 4);
    // Esc while typing cancels without changing the filter.
    app.on_key(key(KeyCode::Char('/')));
    app.on_key(key(KeyCode::Char('x')));
    app.on_key(key(KeyCode::Esc));
    assert!(app.filter.is_empty());
}

#[test]
fn pausing_freezes_the_screen_and_says_so() {
    let mut app = app_with_data();
    app.on_key(key(KeyCode::Char('p')));
    app.apply(Arc::new(feed(6, 99.0)));
    let screen = render(&app);
    assert!(screen.contains("PAUSED"), "{screen}");
    assert!(!screen.contains("99.0"), "no update while paused: {screen}");
    app.on_key(key(KeyCode::Char('p')));
    app.apply(Arc::new(feed(7, 99.0)));
    assert!(render(&app).contains("99.0"));
}

#[test]
fn enter_drills_into_the_selected_workload_and_esc_comes_back() {
    let mut app = app_with_data();
    // Select web (the fourth row by name).
    for _ in 0..3 {
        app.on_key(key(KeyCode::Down));
    }
    let action = app.on_key(key(KeyCode::Enter));
    assert_eq!(action, Action::Drill(Some(deploy("web"))));
    assert_eq!(app.view, View::Drill);
    let screen = render(&app);
    assert!(screen.contains("deploy/web in demo"), "{screen}");
    assert!(screen.contains("Calls to (loading…)"), "{screen}");

    let mut data = feed(6, 10.0);
    data.drill = Some(Drill {
        target: deploy("web"),
        authorities: vec![
            authority("authors.demo.svc.cluster.local:9090", 10.0, 1.0, 34.0),
            authority("books.demo.svc.cluster.local:8080", 10.0, 0.95, 4.0),
        ],
        routes: vec![authority(
            "books.demo.svc.cluster.local:8080/get-book",
            10.0,
            1.0,
            4.0,
        )],
    });
    app.apply(Arc::new(data));
    let screen = render(&app);
    let books = line_with(&screen, "books.demo.svc.cluster.local:8080  ");
    assert!(
        books.contains("95.00%") && books.contains("4ms"),
        "{books:?}"
    );
    assert!(line_with(&screen, "authors.demo.svc.cluster.local:9090").contains("34ms"));
    assert!(
        screen.contains("books.demo.svc.cluster.local:8080/get-book"),
        "{screen}"
    );
    // Its edges: in from traffic, out to books; not the denial at archive.
    assert!(
        screen.contains("ns/demo/sa/web → ns/demo/sa/books"),
        "{screen}"
    );
    assert!(!screen.contains("default:deny"), "{screen}");
    assert!(line_with(&screen, "inbound").contains("95.00%"));

    assert_eq!(app.on_key(key(KeyCode::Esc)), Action::Drill(None));
    assert_eq!(app.view, View::Overview);
    assert!(render(&app).contains("Requests per second"));
}

#[test]
fn help_opens_with_question_mark_and_any_key_closes_it() {
    let mut app = app_with_data();
    app.on_key(key(KeyCode::Char('?')));
    let screen = render(&app);
    assert!(screen.contains("Help"), "{screen}");
    assert!(
        screen.contains("pause or resume the live updates"),
        "{screen}"
    );
    assert_eq!(app.on_key(key(KeyCode::Char('x'))), Action::None);
    assert!(!render(&app).contains("pause or resume the live updates"));
    assert_eq!(app.on_key(key(KeyCode::Char('q'))), Action::Quit);
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Action::Quit
    );
}

#[test]
fn a_controller_error_shows_in_the_footer_and_an_empty_start_waits() {
    let app = App::new("t");
    assert!(render(&app).contains("waiting for the controller"));
    let mut app = app_with_data();
    let mut data = feed(9, 10.0);
    data.error = Some("connecting to the controller at http://127.0.0.1:1: refused".into());
    app.apply(Arc::new(data));
    let screen = render(&app);
    assert!(
        line_with(&screen, "controller:").contains("refused"),
        "{screen}"
    );
    // The last data stays on screen.
    assert!(screen.contains("web"), "{screen}");
}

#[test]
fn history_is_bounded() {
    let mut app = App::new("t");
    for round in 1..=(super::app::HISTORY as u64 + 30) {
        app.apply(Arc::new(feed(round, 1.0)));
    }
    assert!(app.history.values().all(|h| h.len() == super::app::HISTORY));
}

fn exchange(reporter: &str, path: &str, status: u32, ms: u64, from: &str) -> crate::tap::Exchange {
    crate::tap::Exchange {
        reporter: reporter.into(),
        direction: "inbound",
        method: "GET".into(),
        authority: "books.demo:8080".into(),
        path: path.into(),
        status: Some(status),
        latency: Some(std::time::Duration::from_millis(ms)),
        source_identity: identity(from),
        ..Default::default()
    }
}

#[test]
fn the_live_tap_pane_shows_the_latest_requests_newest_first_and_pauses() {
    let mut app = app_with_data();
    let screen = render(&app);
    assert!(
        screen.contains("Live requests (waiting for requests…)"),
        "{screen}"
    );
    let mut tap = super::tap_feed::TapFeed::default();
    tap.push(exchange("demo/books-7d9f", "/books/1", 200, 3, "web"));
    tap.push(exchange(
        "demo/archive-5c4b",
        "/archive/9",
        403,
        1,
        "traffic",
    ));
    app.apply_tap(Arc::new(tap.clone()));
    let screen = render(&app);
    let books = line_with(&screen, "/books/1");
    for want in ["demo/books-7d9f", "GET", "200", "3ms", "ns/demo/sa/web"] {
        assert!(books.contains(want), "{want:?} not in {books:?}");
    }
    let archive = line_with(&screen, "/archive/9");
    assert!(
        archive.contains("403") && archive.contains("ns/demo/sa/traffic"),
        "{archive:?}"
    );
    let at = |needle: &str| screen.find(needle).expect("on screen");
    assert!(at("/archive/9") < at("/books/1"), "newest first:\n{screen}");

    // Paused, the pane stands still like the rest.
    app.on_key(key(KeyCode::Char('p')));
    tap.push(exchange("demo/books-7d9f", "/books/2", 200, 3, "web"));
    app.apply_tap(Arc::new(tap.clone()));
    assert!(!render(&app).contains("/books/2"));
    app.on_key(key(KeyCode::Char('p')));
    app.apply_tap(Arc::new(tap));
    assert!(render(&app).contains("/books/2"));
}

#[test]
fn the_tap_feed_keeps_a_bounded_history_and_taps_the_namespace_inbound() {
    let mut tap = super::tap_feed::TapFeed::default();
    for i in 0..(super::tap_feed::KEPT + 10) {
        tap.push(exchange("demo/web-1", &format!("/{i}"), 200, 1, "traffic"));
    }
    assert_eq!(tap.exchanges.len(), super::tap_feed::KEPT);
    assert_eq!(
        tap.exchanges.front().map(|e| e.path.as_str()),
        Some(format!("/{}", super::tap_feed::KEPT + 9).as_str())
    );
    let filter = super::tap_feed::tap_match(Some("demo"));
    assert_eq!(filter.workload, "ns/demo");
    assert_eq!(filter.direction, mesh_proto::tap::Direction::Inbound as i32);
    assert_eq!(super::tap_feed::tap_match(None).workload, "");
}
