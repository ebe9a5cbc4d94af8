//! Drawing the dashboard: a pure function of [`App`] onto a ratatui frame, so tests render
//! it on a `TestBackend` and read the text back.

use mesh_proto::stats::{Denial, Edge, EgressEdge, ResourceRef, StatsRow};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState};

use super::app::{App, View, workload_key};
use crate::stat::{has_traffic, latency, percent, rate, short_identity};

/// The keys, as the help and the footer list them.
pub const KEYS: &[(&str, &str)] = &[
    ("↑/↓ j/k", "select a workload"),
    ("Enter", "drill into the selected workload"),
    ("Esc", "back to the overview (or clear the filter)"),
    (
        "s",
        "sort by the next column (name, rps, success, p99, mtls)",
    ),
    ("/", "filter by namespace/name (Enter applies, Esc cancels)"),
    ("p", "pause or resume the live updates"),
    ("?", "this help"),
    ("q", "quit"),
];

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_line(app)), header);
    match app.view {
        View::Overview => draw_overview(frame, app, body),
        View::Drill => draw_drill(frame, app, body),
    }
    frame.render_widget(Paragraph::new(footer_line(app)), footer);
    if app.show_help {
        draw_help(frame, frame.area());
    }
}

fn header_line(app: &App) -> Line<'static> {
    let mut spans = vec![Span::styled(
        format!(" {} ", app.title),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    spans.push(Span::raw(format!(" sort: {}", app.sort.label())));
    if !app.filter.is_empty() {
        spans.push(Span::raw(format!("  filter: {}", app.filter)));
    }
    if app.paused {
        spans.push(Span::styled(
            "  PAUSED",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    Line::from(spans)
}

fn footer_line(app: &App) -> Line<'static> {
    if let Some(text) = &app.editing_filter {
        return Line::from(vec![
            Span::styled("filter: ", Style::new().fg(Color::Cyan)),
            Span::raw(format!("{text}▌")),
            Span::raw("   (Enter applies, Esc cancels)"),
        ]);
    }
    if let Some(error) = &app.feed.error {
        return Line::from(Span::styled(
            format!(" controller: {error}"),
            Style::new().fg(Color::Red),
        ));
    }
    let keys = match app.view {
        View::Overview => " q quit  ? help  s sort  / filter  p pause  ↑↓ select  Enter drill in",
        View::Drill => " q quit  ? help  p pause  Esc back",
    };
    let status = if app.feed.round == 0 {
        "  waiting for the controller…".to_owned()
    } else {
        String::new()
    };
    Line::from(vec![
        Span::styled(keys, Style::new().fg(Color::DarkGray)),
        Span::raw(status),
    ])
}

fn block(title: String) -> Block<'static> {
    Block::new().borders(Borders::ALL).title(Span::styled(
        title,
        Style::new().add_modifier(Modifier::BOLD),
    ))
}

/// The cells of a stats row after its name: meshed, success, rps, p50, p95, p99, mTLS.
fn stats_cells(row: &StatsRow, with_pods: bool) -> Vec<Cell<'static>> {
    let requests = row.requests.unwrap_or_default();
    let known = has_traffic(row);
    let success_style = if !known {
        Style::new()
    } else if requests.success_rate >= 0.99 {
        Style::new().fg(Color::Green)
    } else if requests.success_rate >= 0.9 {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new().fg(Color::Red)
    };
    let mut cells = Vec::new();
    if with_pods {
        cells.push(Cell::from(format!(
            "{}/{}",
            row.meshed_pods, row.running_pods
        )));
    }
    cells.extend([
        Cell::from(percent(requests.success_rate, known)).style(success_style),
        Cell::from(if known {
            rate(requests.request_rate)
        } else {
            "-".to_owned()
        }),
        Cell::from(latency(requests.latency_ms_p50, known)),
        Cell::from(latency(requests.latency_ms_p95, known)),
        Cell::from(latency(requests.latency_ms_p99, known)),
        Cell::from(percent(requests.mtls_share, known)),
    ]);
    cells
}

const STATS_HEADER: [&str; 6] = ["SUCCESS", "RPS", "P50", "P95", "P99", "MTLS"];
const STATS_WIDTHS: [Constraint; 6] = [
    Constraint::Length(8),
    Constraint::Length(7),
    Constraint::Length(7),
    Constraint::Length(7),
    Constraint::Length(7),
    Constraint::Length(8),
];

fn header_row(names: &[&str]) -> Row<'static> {
    Row::new(names.iter().map(|n| Cell::from((*n).to_owned())))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED))
}

fn workload_name(resource: Option<&ResourceRef>) -> String {
    match resource {
        Some(r) if r.kind == "deployment" => r.name.clone(),
        Some(r) => format!("{}/{}", r.kind, r.name),
        None => "-".to_owned(),
    }
}

fn draw_overview(frame: &mut Frame, app: &App, area: Rect) {
    let workloads = app.visible_workloads();
    let table_height = (workloads.len() as u16 + 3).clamp(4, 14);
    let spark_height = (workloads.len() as u16 + 2).clamp(3, 10);
    let [table_area, spark_area, bottom] = Layout::vertical([
        Constraint::Length(table_height),
        Constraint::Length(spark_height),
        Constraint::Min(4),
    ])
    .areas(area);

    let mut header = vec!["NAMESPACE", "WORKLOAD", "MESHED"];
    header.extend(STATS_HEADER);
    let mut widths = vec![
        Constraint::Length(12),
        Constraint::Length(22),
        Constraint::Length(7),
    ];
    widths.extend(STATS_WIDTHS);
    let rows = workloads.iter().map(|row| {
        let resource = row.resource.as_ref();
        let mut cells = vec![
            Cell::from(resource.map(|r| r.namespace.clone()).unwrap_or_default()),
            Cell::from(workload_name(resource)),
        ];
        cells.extend(stats_cells(row, true));
        Row::new(cells)
    });
    let title = if workloads.is_empty() && app.feed.round > 0 {
        " Workloads (none match) ".to_owned()
    } else {
        " Workloads ".to_owned()
    };
    let table = Table::new(rows, widths)
        .header(header_row(&header))
        .block(block(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut state = TableState::default().with_selected(Some(app.selected));
    frame.render_stateful_widget(table, table_area, &mut state);

    draw_sparklines(frame, app, &workloads, spark_area);

    let [edges_area, tap_area, denials_area, egress_area] =
        edges_tap_denials_and_egress_areas(bottom, app.feed.denials.len(), app.feed.egress.len());
    draw_edges(
        frame,
        &app.feed.edges,
        " Edges (mTLS identities) ",
        edges_area,
    );
    draw_tap(frame, app, tap_area);
    draw_denials(frame, &app.feed.denials, " Denied by policy ", denials_area);
    draw_egress(frame, &app.feed.egress, egress_area);
}

/// Edges, the live tap, denials, then egress (only when there is some): the edges get what
/// is left.
fn edges_tap_denials_and_egress_areas(area: Rect, denials: usize, egress: usize) -> [Rect; 4] {
    let listed =
        |rows: usize| (u16::try_from(rows).unwrap_or(u16::MAX).saturating_add(3)).clamp(4, 8);
    Layout::vertical([
        Constraint::Min(4),
        Constraint::Length(10),
        Constraint::Length(listed(denials)),
        Constraint::Length(if egress == 0 { 0 } else { listed(egress) }),
    ])
    .areas(area)
}

/// Traffic leaving the mesh: which workloads call out, to which hosts, allowed and denied.
fn draw_egress(frame: &mut Frame, egress: &[EgressEdge], area: Rect) {
    if area.height == 0 {
        return;
    }
    let rows = egress.iter().map(|edge| {
        let denied = Cell::from(edge.denied.to_string());
        Row::new(vec![
            Cell::from(workload_name(edge.source.as_ref())),
            Cell::from(edge.authority.clone()),
            Cell::from(edge.network.clone()),
            Cell::from(edge.protocol.clone()),
            Cell::from(edge.allowed.to_string()),
            if edge.denied > 0 {
                denied.style(Style::new().fg(Color::Red))
            } else {
                denied
            },
            Cell::from(format!("{:.1}/s", edge.rate)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(32),
            Constraint::Length(24),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
        ],
    )
    .header(header_row(&[
        "FROM", "HOST", "NETWORK", "PROTO", "ALLOWED", "DENIED", "RATE",
    ]))
    .block(block(" Leaving the mesh (egress) ".to_owned()));
    frame.render_widget(table, area);
}

/// The live tap: the latest requests the servers' proxies saw, newest first. A refusal (a
/// policy's 403, a rate limit's 429) and a failure show in red.
fn draw_tap(frame: &mut Frame, app: &App, area: Rect) {
    let tap = &app.tap;
    let title = match &tap.error {
        Some(error) => format!(" Live requests — tap: {error} "),
        None if tap.exchanges.is_empty() => " Live requests (waiting for requests…) ".to_owned(),
        None => " Live requests ".to_owned(),
    };
    let rows = tap.exchanges.iter().map(|exchange| {
        let style = if exchange.success() {
            Style::new()
        } else {
            Style::new().fg(Color::Red)
        };
        let from = if exchange.source_identity.is_empty() {
            "(no identity)".to_owned()
        } else {
            short_identity(&exchange.source_identity)
        };
        Row::new(vec![
            Cell::from(exchange.reporter.clone()),
            Cell::from(exchange.method.clone()),
            Cell::from(exchange.path.clone()),
            Cell::from(exchange.status_text()).style(style),
            Cell::from(exchange.latency_text()),
            Cell::from(from),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(24),
            Constraint::Length(7),
            Constraint::Length(28),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Min(20),
        ],
    )
    .header(header_row(&[
        "AT", "METHOD", "PATH", "STATUS", "LATENCY", "FROM",
    ]))
    .block(block(title));
    frame.render_widget(table, area);
}

fn draw_sparklines(frame: &mut Frame, app: &App, workloads: &[&StatsRow], area: Rect) {
    let outer = block(" Requests per second ".to_owned());
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    let lines = workloads.iter().take(inner.height as usize);
    for (i, row) in lines.enumerate() {
        let Some(resource) = &row.resource else {
            continue;
        };
        let line = Rect {
            y: inner.y + i as u16,
            height: 1,
            ..inner
        };
        let [label, spark] =
            Layout::horizontal([Constraint::Length(24), Constraint::Min(0)]).areas(line);
        let points = app.history.get(&workload_key(resource));
        let latest = points.and_then(|p| p.back()).copied().unwrap_or(0.0);
        frame.render_widget(
            Paragraph::new(format!(
                "{:<14} {:>7}",
                workload_name(Some(resource)),
                rate(latest)
            )),
            label,
        );
        // The newest points that fit, scaled to tenths of a request per second.
        let data: Vec<u64> = points
            .map(|p| {
                let skip = p.len().saturating_sub(spark.width as usize);
                p.iter()
                    .skip(skip)
                    .map(|v| (v * 10.0).round() as u64)
                    .collect()
            })
            .unwrap_or_default();
        frame.render_widget(
            Sparkline::default()
                .data(&data)
                .style(Style::new().fg(Color::Cyan)),
            spark,
        );
    }
}

/// Edges above, denials below: both tables want the width for identities.
fn edges_and_denials_areas(area: Rect, denials: usize) -> [Rect; 2] {
    Layout::vertical([
        Constraint::Min(4),
        Constraint::Length((denials as u16 + 3).clamp(4, 8)),
    ])
    .areas(area)
}

fn draw_edges(frame: &mut Frame, edges: &[Edge], title: &str, area: Rect) {
    let rows = edges.iter().map(|edge| {
        let identity = if edge.server_identity.is_empty() {
            Cell::from(format!("no mTLS: {}", edge.no_identity_reason))
                .style(Style::new().fg(Color::Yellow))
        } else {
            Cell::from(format!(
                "{} → {}",
                short_identity(&edge.client_identity),
                short_identity(&edge.server_identity)
            ))
        };
        Row::new(vec![
            Cell::from(workload_name(edge.source.as_ref())),
            Cell::from(workload_name(edge.destination.as_ref())),
            Cell::from(rate(edge.request_rate)),
            Cell::from(percent(edge.success_rate, edge.request_rate > 0.0)),
            identity,
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(16),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Min(30),
        ],
    )
    .header(header_row(&["FROM", "TO", "RPS", "SUCCESS", "IDENTITIES"]))
    .block(block(title.to_owned()));
    frame.render_widget(table, area);
}

fn draw_denials(frame: &mut Frame, denials: &[Denial], title: &str, area: Rect) {
    let rows = denials.iter().map(|denial| {
        Row::new(vec![
            Cell::from(workload_name(denial.destination.as_ref())),
            Cell::from(denial.policy.clone()).style(Style::new().fg(Color::Red)),
            Cell::from(if denial.client_identity.is_empty() {
                "(no identity)".to_owned()
            } else {
                short_identity(&denial.client_identity)
            }),
            Cell::from(format!("{:.1}/s", denial.rate)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(28),
            Constraint::Length(36),
            Constraint::Length(8),
        ],
    )
    .header(header_row(&["AT", "POLICY", "CLIENT", "RATE"]))
    .block(block(title.to_owned()));
    frame.render_widget(table, area);
}

fn draw_drill(frame: &mut Frame, app: &App, area: Rect) {
    let Some(target) = &app.drill_target else {
        return;
    };
    let drill = app.feed.drill.as_ref().filter(|d| d.target == *target);
    let own = app
        .feed
        .workloads
        .iter()
        .find(|row| row.resource.as_ref() == Some(target));
    let authorities = drill.map(|d| d.authorities.as_slice()).unwrap_or_default();
    let routes = drill.map(|d| d.routes.as_slice()).unwrap_or_default();
    let [inbound_area, authorities_area, routes_area, bottom] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length((authorities.len() as u16 + 3).clamp(4, 12)),
        Constraint::Length((routes.len() as u16 + 3).clamp(4, 10)),
        Constraint::Min(4),
    ])
    .areas(area);

    let name = format!(
        "{}/{} in {}",
        stat_kind(&target.kind),
        target.name,
        target.namespace
    );
    let mut header = vec!["", "MESHED"];
    header.extend(STATS_HEADER);
    let mut widths = vec![Constraint::Length(22), Constraint::Length(7)];
    widths.extend(STATS_WIDTHS);
    let rows = own.map(|row| {
        let mut cells = vec![Cell::from("inbound")];
        cells.extend(stats_cells(row, true));
        Row::new(cells)
    });
    frame.render_widget(
        Table::new(rows, widths)
            .header(header_row(&header))
            .block(block(format!(" {name} "))),
        inbound_area,
    );

    let waiting = drill.is_none();
    draw_named_stats(
        frame,
        authorities,
        if waiting {
            " Calls to (loading…) ".to_owned()
        } else {
            " Calls to (outbound, by authority) ".to_owned()
        },
        "AUTHORITY",
        authorities_area,
    );
    draw_named_stats(
        frame,
        routes,
        if routes.is_empty() && !waiting {
            // Proxies count requests per route only where an outbound policy applies.
            " Routes (outbound; none reported) ".to_owned()
        } else {
            " Routes (outbound) ".to_owned()
        },
        "ROUTE",
        routes_area,
    );

    let touches = |r: Option<&ResourceRef>| r == Some(target);
    let edges: Vec<Edge> = app
        .feed
        .edges
        .iter()
        .filter(|e| touches(e.source.as_ref()) || touches(e.destination.as_ref()))
        .cloned()
        .collect();
    let denials: Vec<Denial> = app
        .feed
        .denials
        .iter()
        .filter(|d| touches(d.destination.as_ref()))
        .cloned()
        .collect();
    let [edges_area, denials_area] = edges_and_denials_areas(bottom, denials.len());
    draw_edges(frame, &edges, " Its edges ", edges_area);
    draw_denials(frame, &denials, " Refused at it by policy ", denials_area);
}

fn stat_kind(kind: &str) -> &str {
    match kind {
        "deployment" => "deploy",
        other => other,
    }
}

fn draw_named_stats(frame: &mut Frame, rows: &[StatsRow], title: String, column: &str, area: Rect) {
    let mut header = vec![column];
    header.extend(STATS_HEADER);
    let mut widths = vec![Constraint::Length(48)];
    widths.extend(STATS_WIDTHS);
    let rows = rows.iter().map(|row| {
        let mut cells = vec![Cell::from(
            row.resource
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default(),
        )];
        cells.extend(stats_cells(row, false));
        Row::new(cells)
    });
    frame.render_widget(
        Table::new(rows, widths)
            .header(header_row(&header))
            .block(block(title)),
        area,
    );
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let width = 76.min(area.width);
    let height = (KEYS.len() as u16 + 4).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(
                    format!("  {key:<10}"),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw((*what).to_owned()),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from("  any key closes this help").style(Style::new().fg(Color::DarkGray)));
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(block(" Help ".to_owned())),
        popup,
    );
}
