//! # stockflow
//!
//! The binary crate's library: everything `stockflow` wires together, public so the benches and
//! end-to-end tests use the same code. Modules by responsibility, each depending only on those
//! above it in this list (no cycles):
//!
//! - [`telemetry`]: logging and the Prometheus recorder, render and parse of the text exposition.
//! - [`ingest`]: the ingest HTTP app (`fn app() -> Router`), webhook signatures, the SP-API and
//!   manufacturer mappings, the Lambda adapter.
//! - [`server`]: background HTTP servers, the admission layer and the shutdown wait.
//! - [`reconcile`]: the three-way reconciliation with Amazon and the books (one run, its report).
//! - [`runtime`]: configuration, the embedded backend's wiring, the one shutdown signal, the
//!   connectors next to the consumers, retention, the consumer-group member.
//! - [`dashboard`]: the live stock and alert dashboard (page, JSON and SSE APIs).
//! - [`loadtest`]: synthetic streams (`generate`, `loadgen` profiles, four-week lifecycles), `replay`
//!   (file or paced against a target, measured and verified) and `ingest load`.
//! - [`cmd`]: the command line and one file per command; `dispatch` runs one.

pub mod cmd;
pub mod dashboard;
pub mod ingest;
pub mod loadtest;
pub mod reconcile;
pub mod runtime;
pub mod server;
pub mod telemetry;
