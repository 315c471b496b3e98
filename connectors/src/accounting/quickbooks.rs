//! The QuickBooks Online shape: one `JournalEntry` (`POST …/journalentry`) or a `…/batch` of up to
//! the vendor's limit, the request key as `requestid` (QuickBooks' idempotency), amounts as exact
//! JSON numbers; an item refused inside a 200 batch answer carries a `Fault`.

use serde::Serialize;
use serde_json::value::RawValue;
use stockflow_state::outbox::Request;

use super::{Entry, Side, number};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct QboEntry {
    txn_date: String,
    doc_number: String,
    private_note: String,
    currency_ref: QboRef,
    line: Vec<QboLine>,
}

#[derive(Serialize)]
struct QboRef {
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct QboLine {
    amount: Box<RawValue>,
    detail_type: &'static str,
    description: String,
    journal_entry_line_detail: QboDetail,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct QboDetail {
    posting_type: &'static str,
    account_ref: QboRef,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct QboBatch {
    batch_item_request: Vec<QboBatchItem>,
}

#[derive(Serialize)]
struct QboBatchItem {
    #[serde(rename = "bId")]
    b_id: String,
    operation: &'static str,
    #[serde(rename = "JournalEntry")]
    journal_entry: QboEntry,
}

/// `DocNumber` (≤ 21 characters): `SF` + 19 hex digits of the effect id's hash, so an entry can
/// be looked up in QuickBooks by its stockflow id.
pub fn doc_number(id: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
    format!("SF{:019x}", h >> 52)
}

fn qbo_entry(e: &Entry) -> QboEntry {
    QboEntry {
        txn_date: e.date.clone(),
        doc_number: doc_number(&e.id),
        private_note: e.memo.clone(),
        currency_ref: QboRef { value: e.currency.as_str().into() },
        line: e
            .lines
            .iter()
            .map(|l| QboLine {
                amount: number(l.amount),
                detail_type: "JournalEntryLineDetail",
                description: e.memo.clone(),
                journal_entry_line_detail: QboDetail {
                    posting_type: match l.side {
                        Side::Debit => "Debit",
                        Side::Credit => "Credit",
                    },
                    account_ref: QboRef { value: l.account.clone() },
                },
            })
            .collect(),
    }
}

/// The body of one entry, or of a batch of several.
pub(super) fn body(entries: &[Entry]) -> serde_json::Result<String> {
    match entries {
        [one] => serde_json::to_string(&qbo_entry(one)),
        _ => serde_json::to_string(&QboBatch {
            batch_item_request: entries
                .iter()
                .enumerate()
                .map(|(i, e)| QboBatchItem { b_id: format!("b{i}"), operation: "create", journal_entry: qbo_entry(e) })
                .collect(),
        }),
    }
}

/// Batch items answered with a `Fault`, by the effect they carried.
pub(super) fn rejected(request: &Request, answer: &serde_json::Value) -> Vec<(String, String)> {
    let items = answer.get("BatchItemResponse").and_then(|x| x.as_array()).cloned().unwrap_or_default();
    items
        .iter()
        .filter(|i| i.get("Fault").is_some())
        .filter_map(|i| {
            let b = i.get("bId")?.as_str()?.strip_prefix('b')?.parse::<usize>().ok()?;
            Some((request.items.get(b)?.clone(), i["Fault"].to_string()))
        })
        .collect()
}
