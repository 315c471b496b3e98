//! # stockflow
//!
//! The binary crate's library: everything `stockflow` wires together, public so the benches and
//! end-to-end tests use the same code.
//!
//! - [`cli`]: the command line.
//! - [`config`]: the TOML configuration, validated into `Settings`.
//! - [`connectors`]: the `[connectors]` section and the outbox drains next to the consumers.
//! - [`dashboard`]: the live stock and alert dashboard (page, JSON and SSE APIs).
//! - [`commands`]: the subcommands and the embedded backend's wiring.
//! - [`demo`]: `stockflow demo`.
//! - [`generate`]: the deterministic peak-season stream generator.
//! - [`group`]: `consume` on Kinesis + DynamoDB as a consumer-group member.
//! - [`ingest`]: the ingest HTTP app (`fn app() -> Router`).
//! - [`load`]: `stockflow ingest load`, the HTTP load generator of the benchmarks.
//! - [`loadgen`]: `stockflow loadgen`, peak-season order streams shaped by a profile.
//! - [`replay`]: `stockflow replay --target`, the paced, measured and verified load test.
//! - [`webhook`]: Standard Webhooks signature verification (secrets rotate, replays refused).
//! - [`server`]: background HTTP servers and the shutdown wait.
//! - [`telemetry`]: logging and the Prometheus recorder.

pub mod accounts;
pub mod cli;
pub mod commands;
pub mod config;
pub mod connectors;
pub mod dashboard;
pub mod demo;
pub mod generate;
pub mod group;
pub mod ingest;
pub mod journals;
pub mod lifecycles;
pub mod load;
pub mod loadgen;
pub mod replay;
pub mod retention;
pub mod server;
pub mod telemetry;
pub mod webhook;
