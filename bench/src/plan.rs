//! How much to measure: the full run (`just bench`, under 10 minutes) and the quick one
//! (`just bench quick`, under 2). Every run is bounded in time; request counts follow from
//! the rate and the duration (open loop) or from what the machine can do (closed loop).

use std::time::Duration;

use serde::Serialize;

/// The measurements of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// `full` or `quick`.
    pub mode: String,
    /// How many times each kind of run is repeated (interleaved); the report keeps the median
    /// run of each kind (`measure::representative`).
    pub rounds: usize,
    /// Open-loop rates, requests per second.
    pub rates: Vec<u32>,
    /// Connections the open-loop generator spreads its requests over.
    pub rate_connections: u32,
    /// Length of each open-loop run.
    pub rate_duration: Duration,
    /// Connections of the closed-loop (max throughput) run.
    pub max_connections: u32,
    /// Length of each closed-loop run.
    pub max_duration: Duration,
    /// HTTP/2 closed loop: connections, streams per connection, duration.
    pub h2: Option<(u32, u32, Duration)>,
    /// Idle keep-alive connections opened to measure memory per connection.
    pub idle_connections: usize,
    /// The controller scale scenario, if run.
    pub scale: Option<ScalePlan>,
}

/// Scenario 5: the controller with many services and streams, under endpoint churn.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePlan {
    /// Services in the file backend.
    pub services: usize,
    /// Ready endpoints (pods) per service.
    pub endpoints: usize,
    /// Concurrent `Destination.Get` streams.
    pub streams: usize,
    /// Streams per HTTP/2 connection (a proxy holds a few streams on one connection).
    pub streams_per_connection: usize,
    /// File edits, each flipping one pod's readiness.
    pub edits: usize,
    /// Pause between edits.
    pub edit_interval: Duration,
    /// The file backend's poll interval.
    pub poll_interval: Duration,
}

impl Plan {
    /// `just bench`.
    pub fn full() -> Self {
        Self {
            mode: "full".into(),
            // Three rounds for a median, in the time two took: the whole run stays under the
            // ten minutes `just bench` may take.
            rounds: 3,
            rates: vec![1_000, 5_000],
            rate_connections: 32,
            rate_duration: Duration::from_secs(8),
            max_connections: 64,
            max_duration: Duration::from_secs(6),
            h2: Some((8, 8, Duration::from_secs(6))),
            idle_connections: 10_000,
            scale: Some(ScalePlan {
                services: 5_000,
                endpoints: 20,
                streams: 10_000,
                streams_per_connection: 10,
                edits: 100,
                edit_interval: Duration::from_millis(150),
                poll_interval: Duration::from_millis(250),
            }),
        }
    }

    /// `just bench quick`.
    pub fn quick() -> Self {
        Self {
            mode: "quick".into(),
            rounds: 1,
            rates: vec![1_000],
            // Under the two minutes `just bench quick` may take, with seven topologies.
            rate_duration: Duration::from_secs(5),
            max_duration: Duration::from_secs(4),
            h2: Some((8, 8, Duration::from_secs(3))),
            idle_connections: 2_000,
            scale: Some(ScalePlan {
                services: 200,
                endpoints: 10,
                streams: 400,
                edits: 20,
                ..Self::full().scale.unwrap_or_else(ScalePlan::tiny)
            }),
            ..Self::full()
        }
    }

    /// The self-test: one short rate, one short closed loop, a few idle connections.
    pub fn self_test() -> Self {
        Self {
            mode: "self-test".into(),
            rounds: 2,
            rates: vec![200],
            rate_connections: 4,
            rate_duration: Duration::from_millis(500),
            max_connections: 4,
            max_duration: Duration::from_millis(300),
            h2: None,
            idle_connections: 50,
            scale: Some(ScalePlan::tiny()),
        }
    }
}

impl ScalePlan {
    /// A few services and streams: enough to exercise the code.
    pub fn tiny() -> Self {
        Self {
            services: 5,
            endpoints: 3,
            streams: 10,
            streams_per_connection: 5,
            edits: 4,
            edit_interval: Duration::from_millis(50),
            poll_interval: Duration::from_millis(20),
        }
    }
}
