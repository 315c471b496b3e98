//! The Xero shape: `PUT /api.xro/2.0/ManualJournals?summarizeErrors=false` with `Idempotency-Key`
//! and `xero-tenant-id`, debits positive and credits negative, base currency only; a journal refused
//! inside a 200 answer has `StatusAttributeString: ERROR` and its `ValidationErrors`.

use serde::Serialize;
use serde_json::value::RawValue;
use stockflow_state::outbox::Request;

use super::{Entry, Side, number};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct XeroBody {
    manual_journals: Vec<XeroJournal>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct XeroJournal {
    narration: String,
    date: String,
    status: &'static str,
    line_amount_types: &'static str,
    journal_lines: Vec<XeroLine>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct XeroLine {
    line_amount: Box<RawValue>,
    account_code: String,
    description: String,
}

/// The body of a request.
pub(super) fn body(entries: &[Entry]) -> serde_json::Result<String> {
    serde_json::to_string(&XeroBody {
        manual_journals: entries
            .iter()
            .map(|e| XeroJournal {
                narration: e.memo.clone(),
                date: e.date.clone(),
                status: "POSTED",
                line_amount_types: "NoTax",
                journal_lines: e
                    .lines
                    .iter()
                    .map(|l| XeroLine {
                        line_amount: number(match l.side {
                            Side::Debit => l.amount,
                            Side::Credit => -l.amount,
                        }),
                        account_code: l.account.clone(),
                        description: e.memo.clone(),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// Journals answered with `ERROR`, by the effect they carried.
pub(super) fn rejected(request: &Request, answer: &serde_json::Value) -> Vec<(String, String)> {
    let journals = answer.get("ManualJournals").and_then(|x| x.as_array()).cloned().unwrap_or_default();
    journals
        .iter()
        .enumerate()
        .filter(|(_, j)| j.get("StatusAttributeString").and_then(|s| s.as_str()) == Some("ERROR"))
        .filter_map(|(i, j)| {
            Some((request.items.get(i)?.clone(), j.get("ValidationErrors").map_or_else(String::new, |e| e.to_string())))
        })
        .collect()
}
