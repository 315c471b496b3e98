//! # stockflow-connectors
//!
//! Delivery of effects to the outside world (SPEC §4: at least once, with a deterministic
//! idempotency key, so the receiver sees each exactly once; a failing receiver delays delivery,
//! never drops it). This crate meets the pipeline only in the state store's outbox
//! (ARCHITECTURE.md): it never depends on `stockflow-pipeline`.
//!
//! - [`drain`]: one drain per connector, one lane per shard, cursors and in-flight requests
//!   saved in the store, dead letters and their re-delivery.
//! - [`policy`]: the shared delivery policy — batching, full-jitter backoff, circuit breaker,
//!   token bucket, timeouts, `Retry-After`.
//! - [`connector`]: the `Connector` trait, idempotency keys, the HTTP client, secrets.
//! - [`alerts`]: log, live feed and signed webhook alert sinks.
//! - [`manufacturer`]: reorders and stock-level sync, with a TTL cache ([`cache`]).
//! - [`accounting`]: balanced journals in the generic, QuickBooks Online and Xero shapes, and the
//!   books' balances read back for reconciliation.
//! - [`amazon`]: Amazon's FBA inventory (the Inventory API with LWA tokens, or a ledger report
//!   file), read for reconciliation.
//! - [`journals`]: summary posting — journals per period and currency, their per-SKU detail.
//! - [`testing`]: local receivers of every shape that inject faults (tests and `stockflow demo`).

pub mod accounting;
pub mod alerts;
pub mod amazon;
pub mod cache;
pub mod config;
pub mod connector;
pub mod drain;
pub mod journals;
pub mod manufacturer;
pub mod policy;
pub mod testing;

pub use connector::{Connector, Delivered, DeliveryError, Secret};
pub use drain::{Drain, DrainConfig, DrainControl};
pub use policy::DeliveryPolicy;
