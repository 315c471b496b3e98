//! Amazon's view of the seller's FBA inventory, for reconciliation (docs/reconcile.md): read-only.
//!
//! - [`lwa`]: Login with Amazon access tokens from a refresh token, cached and refreshed early.
//! - [`inventory`]: the FBA Inventory API's `GET /fba/inventory/v1/summaries`, paged by
//!   `nextToken`, within its 2 requests/s (burst 2), through 429s and expired page tokens.
//! - [`ledger`]: the offline alternative, an FBA inventory ledger summary report file
//!   (`GET_LEDGER_SUMMARY_VIEW_DATA`, tab-separated, plain or gzip).
//!
//! Both sources give one [`FbaCount`] per seller SKU; how a count is compared with stockflow's
//! `on_hand` is the reconciliation's business, not this module's.

pub mod inventory;
pub mod ledger;
pub mod lwa;

use serde::Serialize;

pub use inventory::InventoryApi;
pub use lwa::{Lwa, LwaCredentials};

/// Amazon's count of one seller SKU in one marketplace, with the buckets a difference can be
/// explained by. Every quantity is in units; a bucket the source does not report is 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FbaCount {
    /// The seller SKU (`sellerSku`, the ledger's `MSKU`).
    pub sku: String,
    /// Sellable units not reserved (`fulfillableQuantity`).
    pub fulfillable: i64,
    /// Units reserved for customer orders (`reservedQuantity.pendingCustomerOrderQuantity`).
    pub pending_customer_order: i64,
    /// Units sidelined at the fulfilment centre for processing (`fcProcessingQuantity`).
    pub fc_processing: i64,
    /// Units moving between fulfilment centres (`pendingTransshipmentQuantity`).
    pub transshipment: i64,
    /// Inbound: in a shipment plan, shipped, being received.
    pub inbound: i64,
    /// Misplaced or damaged units being researched (`totalResearchingQuantity`).
    pub researching: i64,
    /// Units that cannot be sold (`totalUnfulfillableQuantity`; the ledger's other dispositions).
    pub unfulfillable: i64,
    /// When Amazon last changed this SKU's numbers (epoch ms), if the source says.
    pub last_updated_ms: Option<i64>,
}

impl FbaCount {
    /// The count stockflow's `on_hand` is compared with (SPEC §11): fulfillable plus the units
    /// Amazon holds for customer orders, which stockflow reserves itself.
    pub fn count(&self) -> i64 {
        self.fulfillable.saturating_add(self.pending_customer_order)
    }
}

/// Why Amazon's inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AmazonError {
    /// Login with Amazon refused the credentials (a wrong or revoked refresh token, a rotated
    /// client secret): a person must fix the configuration.
    #[error("Login with Amazon refused the credentials: {0}")]
    Auth(String),
    /// The API refused the request (4xx other than 429): retrying will not help.
    #[error("the Selling Partner API refused the request: {0}")]
    Refused(String),
    /// The API kept failing or throttling past the retry budget.
    #[error("the Selling Partner API did not answer in time: {0}")]
    Unavailable(String),
    /// An answer or a report file that is not what the published model describes.
    #[error("unreadable answer: {0}")]
    Malformed(String),
}

/// Epoch milliseconds of an RFC 3339 / ISO 8601 instant (`2026-05-07T12:00:00.000Z`).
pub fn parse_instant_ms(s: &str) -> Option<i64> {
    s.trim().parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond())
}
