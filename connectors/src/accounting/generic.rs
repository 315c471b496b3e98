//! The generic shape: `POST {url}/v1/journals` (docs/connectors.openapi.json), amounts as decimal
//! strings, the batch id as the `Idempotency-Key`; refused entries come back in `rejected[]`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{Entry, Side};

/// `POST /v1/journals` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenericBatch {
    /// The idempotency key.
    pub batch_id: String,
    /// Entries.
    pub entries: Vec<GenericEntry>,
}

/// One entry of the generic shape.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenericEntry {
    /// Effect id: the receiver dedupes entries by it.
    pub id: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// ISO 4217.
    pub currency: String,
    /// Narration.
    pub memo: String,
    /// Lines.
    pub lines: Vec<GenericLine>,
}

/// One line: exactly one of `debit` / `credit`, as a decimal string.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenericLine {
    /// Account.
    pub account: String,
    /// Debit amount.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub debit: Option<Decimal>,
    /// Credit amount.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub credit: Option<Decimal>,
}

/// The body of a batch.
pub(super) fn body(key: &str, entries: &[Entry]) -> serde_json::Result<String> {
    serde_json::to_string(&GenericBatch {
        batch_id: key.to_string(),
        entries: entries
            .iter()
            .map(|e| GenericEntry {
                id: e.id.clone(),
                date: e.date.clone(),
                currency: e.currency.as_str().into(),
                memo: e.memo.clone(),
                lines: e
                    .lines
                    .iter()
                    .map(|l| GenericLine {
                        account: l.account.clone(),
                        debit: (l.side == Side::Debit).then_some(l.amount),
                        credit: (l.side == Side::Credit).then_some(l.amount),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// Entries refused inside a 2xx answer (`rejected[]`).
pub(super) fn rejected(answer: serde_json::Value) -> Vec<(String, String)> {
    serde_json::from_value::<crate::manufacturer::BatchAnswer>(answer)
        .map(|a| a.rejected.into_iter().map(|r| (r.id, r.reason)).collect())
        .unwrap_or_default()
}
