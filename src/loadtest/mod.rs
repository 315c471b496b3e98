//! Synthetic traffic and the tools that drive it — everything `stockflow` does to prove itself
//! under load:
//!
//! - [`generate`]: the deterministic peak-season stream (`stockflow generate`, the demo's input).
//! - [`lifecycles`]: order lifecycles over weeks (the `four-weeks` profile).
//! - [`loadgen`]: `stockflow loadgen`, streams shaped by a profile with schedule and expected result;
//!   `loadgen::spapi` renders them as SP-API notifications.
//! - [`replay`]: `stockflow replay`, a file appended and consumed, or paced against a target,
//!   measured and verified, with a report.
//! - [`load`]: `stockflow ingest load`, the closed/open-loop HTTP load tool of the benchmarks.
//! - [`http`]: the one HTTP/1.1 keep-alive lane both HTTP drivers send through.
//! - [`ndjson`]: reading and writing the NDJSON files.

pub mod generate;
pub mod http;
pub mod lifecycles;
pub mod load;
pub mod loadgen;
pub mod ndjson;
pub mod replay;
