//! The three accounting receivers: the generic journal API, QuickBooks Online (entries, batches,
//! the account query, its request limits) and Xero (manual journals, the chart of accounts, the
//! minute and day limits).

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::*;

pub(super) fn record_summary(log: &mut Log, id: &str, lines: impl Iterator<Item = (String, Decimal)>) {
    let journal = log.summaries.entry(id.to_string()).or_default();
    for (account, amount) in lines {
        *journal.entry(account).or_default() += amount;
    }
}

/// Books accepted lines (account, debit − credit) on `date` in `shape`'s ledger.
pub(super) fn book(log: &mut Log, shape: &'static str, date: &str, lines: impl Iterator<Item = (String, Decimal)>) {
    for (account, amount) in lines {
        *log.books.entry((shape, account, date.to_string())).or_default() += amount;
    }
}

/// Per account of `shape`: (balance at the end of `to`, movement from `from` to `to`), dates
/// inclusive (`YYYY-MM-DD` compares as text).
fn ledger(log: &Log, shape: &str, from: &str, to: &str) -> BTreeMap<String, (Decimal, Decimal)> {
    let mut out: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
    for ((s, account, date), amount) in &log.books {
        if *s != shape || date.as_str() > to {
            continue;
        }
        let e = out.entry(account.clone()).or_default();
        e.0 += amount;
        if date.as_str() >= from {
            e.1 += amount;
        }
    }
    out
}

/// `GET /generic/v1/balances?from=&to=`: every account's balance and movement.
pub(super) async fn generic_balances(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(from), Some(to)) = (q.get("from"), q.get("to")) else { return refuse("to", "from and to are required") };
    let accounts: Vec<Value> = ledger(&s.lock(), "generic", from, to)
        .into_iter()
        .map(|(account, (balance, movement))| {
            json!({"account": account, "balance": balance.to_string(), "movement": movement.to_string()})
        })
        .collect();
    axum::Json(json!({"accounts": accounts})).into_response()
}

/// `GET …/reports/ProfitAndLoss?start_date=&end_date=`: one data row per account with movement
/// in the period (the stand-in does not know account types), in QuickBooks' report shape.
pub(super) async fn qbo_report(
    State(s): State<Shared>,
    Path((_realm, report)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if report != "ProfitAndLoss" {
        return (StatusCode::NOT_FOUND, "no such report").into_response();
    }
    let (Some(from), Some(to)) = (q.get("start_date"), q.get("end_date")) else {
        return refuse("end_date", "start_date and end_date are required");
    };
    let mut total = Decimal::ZERO;
    let rows: Vec<Value> = ledger(&s.lock(), "quickbooks", from, to)
        .into_iter()
        .filter(|(_, (_, movement))| !movement.is_zero())
        .map(|(account, (_, movement))| {
            total += movement;
            let name = QBO_ACCOUNTS.iter().find(|a| a.0 == account).map_or(account.as_str(), |a| a.1);
            json!({"type": "Data", "ColData": [{"value": name, "id": account}, {"value": movement.to_string()}]})
        })
        .collect();
    axum::Json(json!({
        "Header": {"ReportName": "ProfitAndLoss", "StartPeriod": from, "EndPeriod": to, "Currency": "USD"},
        "Columns": {"Column": [{"ColTitle": "", "ColType": "Account"}, {"ColTitle": "Total", "ColType": "Money"}]},
        "Rows": {"Row": [{"type": "Section", "group": "COGS",
            "Header": {"ColData": [{"value": "Cost of Goods Sold"}, {"value": ""}]},
            "Rows": {"Row": rows},
            "Summary": {"ColData": [{"value": "Total Cost of Goods Sold"}, {"value": total.to_string()}]}}]}
    }))
    .into_response()
}

/// The stand-in's Xero `AccountID` of an account code.
pub(super) fn xero_account_id(code: &str) -> String {
    format!("00000000-0000-4000-8000-{:0>12}", code.chars().filter(char::is_ascii_alphanumeric).collect::<String>())
}

/// `GET Reports/BalanceSheet?date=` (balances at the end of `date`) and
/// `GET Reports/ProfitAndLoss?fromDate=&toDate=` (movements): one row per account, in Xero's
/// report shape, rows carrying the `account` attribute.
pub(super) async fn xero_report(
    State(s): State<Shared>,
    Path(report): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if header(&headers, "xero-tenant-id").is_none_or(str::is_empty) {
        return refuse("xero-tenant-id", "required");
    }
    let (from, to, balance) = match report.as_str() {
        "BalanceSheet" => {
            ("0000-00-00".to_string(), q.get("date").cloned().unwrap_or_else(|| "9999-12-31".into()), true)
        }
        "ProfitAndLoss" => match (q.get("fromDate"), q.get("toDate")) {
            (Some(f), Some(t)) => (f.clone(), t.clone(), false),
            _ => return refuse("toDate", "fromDate and toDate are required"),
        },
        _ => return (StatusCode::NOT_FOUND, "no such report").into_response(),
    };
    let rows: Vec<Value> = ledger(&s.lock(), "xero", &from, &to)
        .into_iter()
        .map(|(code, (bal, movement))| {
            let id = xero_account_id(&code);
            let value = if balance { bal } else { movement };
            let attrs = json!([{"Value": id, "Id": "account"}]);
            json!({"RowType": "Row", "Cells": [{"Value": code, "Attributes": attrs}, {"Value": value.to_string(), "Attributes": attrs}]})
        })
        .collect();
    axum::Json(json!({"Reports": [{
        "ReportID": report, "ReportName": report, "ReportType": report,
        "Rows": [
            {"RowType": "Header", "Cells": [{"Value": ""}, {"Value": to}]},
            {"RowType": "Section", "Title": "", "Rows": rows}
        ]
    }]}))
    .into_response()
}

pub(super) fn qbo_lines(e: &Value) -> Vec<(String, Decimal)> {
    let lines = e["Line"].as_array().cloned().unwrap_or_default();
    lines
        .iter()
        .filter_map(|l| {
            let amount: Decimal = l["Amount"].to_string().parse().ok()?;
            let d = &l["JournalEntryLineDetail"];
            let account = d["AccountRef"]["value"].as_str()?.to_string();
            Some((account, if d["PostingType"] == "Credit" { -amount } else { amount }))
        })
        .collect()
}

pub(super) fn kind_of(id: &str) -> String {
    id.split(':').next().unwrap_or("").to_string()
}

pub(super) async fn generic_journals(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let (fault, key, body) = match keyed_request(req).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    s.keyed(fault, &key, &body, |log| {
        let Ok(batch) = serde_json::from_slice::<crate::accounting::GenericBatch>(&body) else {
            return (StatusCode::BAD_REQUEST, json!({"error": "not a journal batch"}));
        };
        for (i, e) in batch.entries.iter().enumerate() {
            let debit: Decimal = e.lines.iter().filter_map(|l| l.debit).sum();
            let credit: Decimal = e.lines.iter().filter_map(|l| l.credit).sum();
            if debit != credit {
                return (StatusCode::BAD_REQUEST, json!({"error": "unbalanced", "field": format!("entries[{i}]")}));
            }
        }
        for e in &batch.entries {
            let lines =
                e.lines.iter().map(|l| (l.account.clone(), l.debit.unwrap_or_default() - l.credit.unwrap_or_default()));
            book(log, "generic", &e.date, lines);
            if e.id.starts_with("journal:") {
                let lines = e
                    .lines
                    .iter()
                    .map(|l| (l.account.clone(), l.debit.unwrap_or_default() - l.credit.unwrap_or_default()));
                record_summary(log, &e.id, lines);
            }
            accept_item(log, "generic", &e.id);
            let debit: Decimal = e.lines.iter().filter_map(|l| l.debit).sum();
            *log.journal_totals.entry(("generic", kind_of(&e.id), e.currency.clone())).or_default() += debit;
        }
        *log.accepted_requests.entry("generic").or_default() += 1;
        (StatusCode::OK, json!({"accepted": batch.entries.len(), "rejected": []}))
    })
    .await
}

/// The stockflow id at the end of a narration (`… cogs:e1`).
pub(super) fn id_in(note: &str) -> String {
    note.rsplit(' ').next().unwrap_or_default().to_string()
}

pub(super) fn qbo_entry_ok(e: &Value) -> Result<(String, String, Decimal), String> {
    let lines = e["Line"].as_array().ok_or("Line missing")?;
    let (mut debit, mut credit) = (Decimal::ZERO, Decimal::ZERO);
    for l in lines {
        let amount: Decimal = l["Amount"].to_string().parse().map_err(|_| "Amount is not a number")?;
        match l["JournalEntryLineDetail"]["PostingType"].as_str() {
            Some("Debit") => debit += amount,
            Some("Credit") => credit += amount,
            _ => return Err("PostingType must be Debit or Credit".into()),
        }
    }
    if debit != credit || lines.len() < 2 {
        return Err("Transaction is not balanced".into());
    }
    let currency = e["CurrencyRef"]["value"].as_str().unwrap_or("USD").to_string();
    Ok((id_in(e["PrivateNote"].as_str().unwrap_or_default()), currency, debit))
}

pub(super) async fn qbo(
    State(s): State<Shared>,
    Path((_realm, op)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    req: axum::extract::Request,
) -> Response {
    let fault = fault_of(req.extensions());
    let batch = match op.as_str() {
        "batch" => true,
        "journalentry" => false,
        _ => return (StatusCode::NOT_FOUND, "no such entity").into_response(),
    };
    let Some(key) = q.get("requestid").cloned() else { return refuse("requestid", "this receiver requires requestid") };
    if key.len() > if batch { 36 } else { 50 } {
        return refuse("requestid", "too long");
    }
    if !q.contains_key("minorversion") {
        return refuse("minorversion", "required");
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), 10 << 20).await else { return refuse("body", "unreadable") };
    // Intuit's limits: 500 requests a minute per realm, and 40 batch requests a minute.
    if !s.within("quickbooks", 500) || (batch && !s.within("quickbooks-batch", 40)) {
        let throttled = "<IntuitResponse><Fault><Error><Message>message=ThrottleExceeded; errorCode=003001</Message></Error></Fault></IntuitResponse>";
        return (StatusCode::TOO_MANY_REQUESTS, throttled).into_response();
    }
    s.keyed(fault, &key, &body, |log| {
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, json!({"Fault": {"type": "ValidationFault"}}));
        };
        let fault_json =
            |m: &str| json!({"Fault": {"type": "ValidationFault", "Error": [{"Message": m, "code": "6000"}]}});
        if !batch {
            return match qbo_entry_ok(&v) {
                Ok((id, currency, amount)) => {
                    book(log, "quickbooks", v["TxnDate"].as_str().unwrap_or_default(), qbo_lines(&v).into_iter());
                    if id.starts_with("journal:") {
                        record_summary(log, &id, qbo_lines(&v).into_iter());
                    }
                    accept_item(log, "quickbooks", &id);
                    *log.journal_totals.entry(("quickbooks", kind_of(&id), currency)).or_default() += amount;
                    *log.accepted_requests.entry("quickbooks").or_default() += 1;
                    (StatusCode::OK, json!({"JournalEntry": {"Id": log.items.len().to_string(), "SyncToken": "0"}}))
                }
                Err(m) => (StatusCode::BAD_REQUEST, fault_json(&m)),
            };
        }
        let items = v["BatchItemRequest"].as_array().cloned().unwrap_or_default();
        if items.is_empty() || items.len() > 30 {
            return (StatusCode::BAD_REQUEST, fault_json("BatchItemRequest must hold 1 to 30 items"));
        }
        let mut out = Vec::new();
        for item in &items {
            let b = item["bId"].as_str().unwrap_or_default();
            match qbo_entry_ok(&item["JournalEntry"]) {
                Ok((id, currency, amount)) => {
                    let entry = &item["JournalEntry"];
                    book(
                        log,
                        "quickbooks",
                        entry["TxnDate"].as_str().unwrap_or_default(),
                        qbo_lines(entry).into_iter(),
                    );
                    accept_item(log, "quickbooks", &id);
                    *log.journal_totals.entry(("quickbooks", kind_of(&id), currency)).or_default() += amount;
                    out.push(json!({"bId": b, "JournalEntry": {"Id": log.items.len().to_string()}}));
                }
                Err(m) => out.push(json!({"bId": b, "Fault": {"type": "ValidationFault", "Error": [{"Message": m}]}})),
            }
        }
        *log.accepted_requests.entry("quickbooks").or_default() += 1;
        (StatusCode::OK, json!({"BatchItemResponse": out}))
    })
    .await
}

/// The receivers' QuickBooks chart of accounts: Id, name, type, active.
pub(super) const QBO_ACCOUNTS: [(&str, &str, &str, bool); 5] = [
    ("80", "Cost of Goods Sold", "Cost of Goods Sold", true),
    ("81", "Inventory Asset", "Other Current Asset", true),
    ("82", "Inventory Received Not Billed", "Other Current Liability", true),
    ("35", "Checking", "Bank", true),
    ("90", "Old Inventory", "Other Current Asset", false),
];

/// `GET …/query?query=select … from Account where Id in ('80', …)`: the accounts asked for.
pub(super) async fn qbo_query(
    State(s): State<Shared>,
    Path((_realm, op)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if op != "query" {
        return (StatusCode::NOT_FOUND, "no such entity").into_response();
    }
    let Some(query) = q.get("query") else { return refuse("query", "required") };
    if !query.contains("from Account") {
        return refuse("query", "this receiver answers account queries only");
    }
    let ids: Vec<&str> = query.split('\'').skip(1).step_by(2).collect();
    // `CurrentBalance`: the balance now, over every journal the stand-in accepted.
    let balances = ledger(&s.lock(), "quickbooks", "9999-12-31", "9999-12-31");
    let accounts: Vec<Value> = QBO_ACCOUNTS
        .iter()
        .filter(|(id, ..)| ids.contains(id))
        .map(|(id, name, kind, active)| {
            let balance = balances.get(*id).map_or(Decimal::ZERO, |b| b.0);
            json!({"Id": id, "Name": name, "AccountType": kind, "Active": active,
                   "CurrentBalance": balance.to_string().parse::<f64>().unwrap_or(0.0)})
        })
        .collect();
    axum::Json(json!({"QueryResponse": {"Account": accounts, "startPosition": 1, "maxResults": accounts.len()}}))
        .into_response()
}

/// `GET Accounts`: the receivers' Xero chart of accounts.
pub(super) async fn xero_accounts(headers: HeaderMap) -> Response {
    if header(&headers, "xero-tenant-id").is_none_or(str::is_empty) {
        return refuse("xero-tenant-id", "required");
    }
    let mut accounts = json!([
        {"Code": "500", "Name": "Cost of Goods Sold", "Type": "DIRECTCOSTS", "Status": "ACTIVE"},
        {"Code": "630", "Name": "Inventory", "Type": "INVENTORY", "Status": "ACTIVE"},
        {"Code": "631", "Name": "Inventory (journals)", "Type": "CURRENT", "Status": "ACTIVE"},
        {"Code": "820", "Name": "Received not invoiced", "Type": "CURRLIAB", "Status": "ACTIVE"},
        {"Code": "800", "Name": "Accounts Payable", "Type": "CURRLIAB", "Status": "ACTIVE", "SystemAccount": "CREDITORS"}
    ]);
    for a in accounts.as_array_mut().into_iter().flatten() {
        a["AccountID"] = json!(xero_account_id(a["Code"].as_str().unwrap_or_default()));
    }
    axum::Json(json!({ "Accounts": accounts })).into_response()
}

pub(super) async fn xero(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let fault = fault_of(req.extensions());
    if header(req.headers(), "xero-tenant-id").is_none_or(str::is_empty) {
        return refuse("xero-tenant-id", "required");
    }
    let Some(key) = header(req.headers(), "idempotency-key").map(str::to_string) else {
        return refuse("Idempotency-Key", "required");
    };
    if key.len() > 128 {
        return refuse("Idempotency-Key", "longer than 128 characters");
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), 10 << 20).await else { return refuse("body", "unreadable") };
    // Xero's limits: 60 calls a minute and 5,000 a day per tenant, with the count in headers.
    if !s.within("xero", 60) {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "60"), ("x-rate-limit-problem", "minute")], "")
            .into_response();
    }
    let Some(left) = s.xero_day() else {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3600"), ("x-rate-limit-problem", "day")], "")
            .into_response();
    };
    let mut answer = s
        .keyed(fault, &key, &body, |log| {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return (StatusCode::BAD_REQUEST, json!({"Type": "ValidationException"}));
            };
            let journals = v["ManualJournals"].as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for j in &journals {
                let lines = j["JournalLines"].as_array().cloned().unwrap_or_default();
                let amounts: Vec<Decimal> =
                    lines.iter().filter_map(|l| l["LineAmount"].to_string().parse().ok()).collect();
                let sum: Decimal = amounts.iter().sum();
                let id = id_in(j["Narration"].as_str().unwrap_or_default());
                if lines.len() < 2 || amounts.len() != lines.len() || !sum.is_zero() || j["Status"] != "POSTED" {
                    out.push(json!({"Narration": j["Narration"], "StatusAttributeString": "ERROR",
                    "ValidationErrors": [{"Message": "The total debits must equal total credits"}]}));
                    continue;
                }
                let accounts = lines.iter().map(|l| l["AccountCode"].as_str().unwrap_or_default().to_string());
                book(
                    log,
                    "xero",
                    j["Date"].as_str().unwrap_or_default(),
                    accounts.clone().zip(amounts.iter().copied()),
                );
                if id.starts_with("journal:") {
                    record_summary(log, &id, accounts.zip(amounts.iter().copied()));
                }
                accept_item(log, "xero", &id);
                let debit: Decimal = amounts.iter().filter(|a| a.is_sign_positive()).sum();
                *log.journal_totals.entry(("xero", kind_of(&id), "BASE".into())).or_default() += debit;
                out.push(json!({"Narration": j["Narration"], "StatusAttributeString": "OK", "ManualJournalID": id}));
            }
            *log.accepted_requests.entry("xero").or_default() += 1;
            (StatusCode::OK, json!({"Status": "OK", "ManualJournals": out}))
        })
        .await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&left.to_string()) {
        answer.headers_mut().insert("x-daylimit-remaining", v);
    }
    answer
}
