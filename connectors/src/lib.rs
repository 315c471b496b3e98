//! # stockflow-connectors
//!
//! Delivery of effects to the outside world. This crate meets the pipeline only in the state
//! store's outbox (ARCHITECTURE.md): it never depends on `stockflow-pipeline`.
//!
//! - [`sink`]: the `EffectSink` trait every connector implements, and `LogSink`, which writes
//!   alerts to the structured log (the default alert sink of the embedded deployment).
//!
//! The HTTP connectors (signed alert webhook, manufacturer, accounting) build on this trait.

pub mod sink;

pub use sink::{DeliveryError, EffectSink, LogSink};
