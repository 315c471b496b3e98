//! The books read back for reconciliation (docs/reconcile.md): the inventory asset account's
//! balance and the cost of goods sold posted over a period — read-only, a few requests.
//!
//! - **QuickBooks Online**: `query` `select * from Account where Id = '…'` → `CurrentBalance`
//!   (the balance *now*: QuickBooks has no as-of for it), and `reports/ProfitAndLoss`
//!   (`start_date`, `end_date`) → the COGS account's row.
//! - **Xero**: accounts carry no balance, so `GET Accounts` (code → `AccountID`), then
//!   `Reports/BalanceSheet?date=` and `Reports/ProfitAndLoss?fromDate=&toDate=` (one a year of
//!   the period: a report spans at most 366 days), rows matched by the `account` attribute (the
//!   `AccountID`), falling back to the account's name.
//! - **Generic**: `GET {url}/v1/balances?from=&to=` →
//!   `{"accounts":[{"account","balance","movement"}]}` (docs/connectors.openapi.json).

use hyper::Method;
use hyper::body::Bytes;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use super::{Accounting, Shape, encode};
use crate::connector::{DeliveryError, classify};

/// What the books say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Books {
    /// Which books (`generic`, `quickbooks`, `xero`).
    pub source: &'static str,
    /// The inventory asset account's balance (debit positive).
    pub inventory_balance: Decimal,
    /// COGS posted over the period (debit positive), where the books report it.
    pub cogs_posted: Option<Decimal>,
    /// The date the balance is as of (QuickBooks: the day it was read).
    pub as_of: String,
}

/// A decimal in a report cell or a JSON number/string; empty cells are 0.
fn amount(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) if s.trim().is_empty() => Some(Decimal::ZERO),
        Value::String(s) => s.trim().replace(',', "").parse().ok(),
        _ => None,
    }
}

/// Every row of a Xero report (sections nest rows).
fn xero_rows(rows: &Value, out: &mut Vec<Value>) {
    for r in rows.as_array().into_iter().flatten() {
        if r["RowType"] == "Row" {
            out.push(r.clone());
        }
        xero_rows(&r["Rows"], out);
    }
}

/// The first value cell of the Xero report row for `account_id` (or named `name`).
fn xero_value(report: &Value, account_id: &str, name: &str) -> Option<Decimal> {
    let mut rows = Vec::new();
    xero_rows(&report["Reports"][0]["Rows"], &mut rows);
    let by_id = rows.iter().find(|r| {
        r["Cells"][0]["Attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["Id"] == "account" && a["Value"].as_str() == Some(account_id))
    });
    let row = by_id.or_else(|| rows.iter().find(|r| r["Cells"][0]["Value"].as_str() == Some(name)))?;
    amount(&row["Cells"][1]["Value"])
}

/// `since..=to` (`YYYY-MM-DD`) cut into consecutive ranges of at most 365 days, oldest first.
fn year_chunks(since: &str, to: &str) -> Result<Vec<(String, String)>, DeliveryError> {
    let parse = |d: &str| {
        d.parse::<jiff::civil::Date>().map_err(|e| DeliveryError::Rejected(format!("{d:?} is not a date: {e}")))
    };
    let (mut from, to) = (parse(since)?, parse(to)?);
    let mut out = Vec::new();
    while from <= to {
        let end = from.checked_add(jiff::Span::new().days(364)).map_or(to, |e| e.min(to));
        out.push((from.to_string(), end.to_string()));
        match end.tomorrow() {
            Ok(next) => from = next,
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The value of the QuickBooks report data row whose first column is account `id`.
fn qbo_row(rows: &Value, id: &str) -> Option<Decimal> {
    for r in rows["Row"].as_array().into_iter().flatten() {
        let cols = &r["ColData"];
        if cols[0]["id"].as_str() == Some(id) {
            return cols.as_array().and_then(|c| c.last()).and_then(|c| amount(&c["value"]));
        }
        if let Some(v) = qbo_row(&r["Rows"], id) {
            return Some(v);
        }
    }
    None
}

impl Accounting {
    async fn read(&self, url: &str, extra: &[(&str, String)], vendor: &str) -> Result<Value, DeliveryError> {
        let mut headers = vec![("accept", "application/json".to_string())];
        if !self.token.is_empty() {
            headers.push(("authorization", format!("Bearer {}", self.token.expose())));
        }
        headers.extend(extra.iter().cloned());
        let resp = classify(
            self.http.send(Method::GET, url, &headers, Bytes::new()).await?,
            std::time::Duration::from_secs(60),
        )?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| DeliveryError::Rejected(format!("{vendor} answered no JSON: {e}")))
    }

    /// The inventory balance as of `as_of` and the COGS posted from `since` to `as_of`
    /// (`YYYY-MM-DD`, inclusive).
    pub async fn read_books(&self, since: &str, as_of: &str) -> Result<Books, DeliveryError> {
        let missing = |what: &str| DeliveryError::Rejected(format!("the books have no {what}"));
        match &self.shape {
            Shape::Generic { url } => {
                let url =
                    format!("{}/v1/balances?from={}&to={}", url.trim_end_matches('/'), encode(since), encode(as_of));
                let v = self.read(&url, &[], "the journal API").await?;
                let find = |account: &str, field: &str| {
                    v["accounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["account"].as_str() == Some(account))
                        .map(|a| amount(&a[field]).unwrap_or_default())
                };
                Ok(Books {
                    source: "generic",
                    inventory_balance: find(&self.accounts.inventory, "balance").unwrap_or_default(),
                    cogs_posted: Some(find(&self.accounts.cogs, "movement").unwrap_or_default()),
                    as_of: as_of.to_string(),
                })
            }
            Shape::QuickBooks { base, realm_id, minor_version, .. } => {
                let base = format!("{}/v3/company/{realm_id}", base.trim_end_matches('/'));
                let query = format!("select * from Account where Id = '{}'", self.accounts.inventory.replace('\'', ""));
                let url = format!("{base}/query?query={}&minorversion={minor_version}", encode(&query));
                let v = self.read(&url, &[], "QuickBooks").await?;
                let account = &v["QueryResponse"]["Account"][0];
                let balance = amount(&account["CurrentBalance"])
                    .ok_or_else(|| missing(&format!("inventory account with Id {:?}", self.accounts.inventory)))?;
                let url = format!(
                    "{base}/reports/ProfitAndLoss?start_date={}&end_date={}&accounting_method=Accrual&minorversion={minor_version}",
                    encode(since),
                    encode(as_of)
                );
                let report = self.read(&url, &[], "QuickBooks").await?;
                Ok(Books {
                    source: "quickbooks",
                    inventory_balance: balance,
                    cogs_posted: Some(qbo_row(&report["Rows"], &self.accounts.cogs).unwrap_or_default()),
                    as_of: as_of.to_string(),
                })
            }
            Shape::Xero { base, tenant_id, .. } => {
                let base = format!("{}/api.xro/2.0", base.trim_end_matches('/'));
                let tenant = [("xero-tenant-id", tenant_id.clone())];
                let chart = self.read(&format!("{base}/Accounts"), &tenant, "Xero").await?;
                let lookup = |code: &str| {
                    chart["Accounts"].as_array().into_iter().flatten().find(|a| a["Code"].as_str() == Some(code)).map(
                        |a| {
                            (
                                a["AccountID"].as_str().unwrap_or_default().to_string(),
                                a["Name"].as_str().unwrap_or_default().to_string(),
                            )
                        },
                    )
                };
                let (inv_id, inv_name) = lookup(&self.accounts.inventory)
                    .ok_or_else(|| missing(&format!("account with code {:?}", self.accounts.inventory)))?;
                let sheet =
                    self.read(&format!("{base}/Reports/BalanceSheet?date={}", encode(as_of)), &tenant, "Xero").await?;
                // Xero's ProfitAndLoss spans at most a year (366 days): longer periods are summed.
                let cogs = match lookup(&self.accounts.cogs) {
                    None => None,
                    Some((id, name)) => {
                        let mut total = Decimal::ZERO;
                        for (from, to) in year_chunks(since, as_of)? {
                            let url = format!("{base}/Reports/ProfitAndLoss?fromDate={from}&toDate={to}");
                            let pnl = self.read(&url, &tenant, "Xero").await?;
                            total += xero_value(&pnl, &id, &name).unwrap_or_default();
                        }
                        Some(total)
                    }
                };
                Ok(Books {
                    source: "xero",
                    // An account with no movement has no row: its balance is 0.
                    inventory_balance: xero_value(&sheet, &inv_id, &inv_name).unwrap_or_default(),
                    cogs_posted: cogs,
                    as_of: as_of.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn report_rows_are_found_by_account_id_in_nested_sections() {
        let sheet = json!({"Reports": [{"ReportID": "BalanceSheet", "Rows": [
            {"RowType": "Header", "Cells": [{"Value": ""}, {"Value": "30 Nov 2026"}]},
            {"RowType": "Section", "Title": "Assets", "Rows": []},
            {"RowType": "Section", "Title": "Current Assets", "Rows": [
                {"RowType": "Row", "Cells": [
                    {"Value": "Inventory (journals)", "Attributes": [{"Value": "id-631", "Id": "account"}]},
                    {"Value": "1,234.50", "Attributes": [{"Value": "id-631", "Id": "account"}]}]},
                {"RowType": "SummaryRow", "Cells": [{"Value": "Total Current Assets"}, {"Value": "1234.50"}]}]}]}]});
        assert_eq!(xero_value(&sheet, "id-631", "x"), Some(Decimal::new(123_450, 2)));
        assert_eq!(xero_value(&sheet, "nope", "Inventory (journals)"), Some(Decimal::new(123_450, 2)));
        assert_eq!(xero_value(&sheet, "nope", "nope"), None);
        let pnl = json!({"Rows": {"Row": [{"type": "Section", "group": "COGS",
            "Rows": {"Row": [{"type": "Data", "ColData": [{"value": "Cost of Goods Sold", "id": "80"}, {"value": "99.10"}]}]},
            "Summary": {"ColData": [{"value": "Total Cost of Goods Sold"}, {"value": "99.10"}]}}]}});
        assert_eq!(qbo_row(&pnl["Rows"], "80"), Some(Decimal::new(9910, 2)));
        assert_eq!(qbo_row(&pnl["Rows"], "81"), None);
    }

    #[test]
    fn long_periods_are_cut_into_years() {
        let c = year_chunks("2024-01-01", "2026-03-01").unwrap();
        assert_eq!(c.first().unwrap(), &("2024-01-01".to_string(), "2024-12-30".to_string()));
        assert_eq!(c.last().unwrap().1, "2026-03-01");
        for w in c.windows(2) {
            let end = w[0].1.parse::<jiff::civil::Date>().unwrap();
            assert_eq!(end.tomorrow().unwrap().to_string(), w[1].0, "no gap, no overlap");
        }
        assert_eq!(year_chunks("2026-03-02", "2026-03-01").unwrap(), vec![]);
    }
}
