//! The accounting connector: one balanced journal entry per journal effect (SPEC §2: COGS on
//! shipment, inventory on receipt), in one of three shapes:
//!
//! - **generic**: `POST {url}/v1/journals`, amounts as decimal strings, `Idempotency-Key`;
//! - **QuickBooks Online**: `JournalEntry` (`POST …/journalentry`, or `…/batch` with up to 10
//!   entries), `requestid` as the idempotency key, amounts as exact JSON numbers;
//! - **Xero**: `PUT /api.xro/2.0/ManualJournals` with `Idempotency-Key` and `xero-tenant-id`,
//!   debits positive and credits negative, base currency only.
//!
//! Amounts are `rust_decimal`: each line arrives rounded to the currency's minor unit, half to
//! even (the engine rounds it); every entry is checked — amounts within the minor unit, none
//! negative, debits = credits — before anything is sent.
//!
//! One file of ~610 lines: what every shape shares (the entry checks, the vendors' limits, the
//! connector); each shape's rendering is a module of its own.

use std::collections::HashMap;
use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use stockflow_state::Effect;
use stockflow_state::effects::{EffectKind, EffectKinds, JournalKind, JournalLine};
use stockflow_state::money::Currency;
use stockflow_state::outbox::Request;

use crate::connector::{Connector, Delivered, DeliveryError, HttpClient, Secret, classify, excerpt, request_key};
use crate::journals::{PostingKind, SummaryJournal, SummaryPolicy};
use crate::policy::{DailyBudget, DeliveryPolicy, RateLimit};

mod books;
mod generic;
mod quickbooks;
mod xero;

pub use books::Books;
pub use generic::{GenericBatch, GenericEntry, GenericLine};
pub use quickbooks::doc_number;

/// Which API the journals go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// stockflow's generic JSON journal API at `url`.
    Generic {
        /// Base URL.
        url: String,
    },
    /// QuickBooks Online.
    QuickBooks {
        /// `https://quickbooks.api.intuit.com` (or the sandbox host).
        base: String,
        /// The company (realm) id.
        realm_id: String,
        /// `minorversion` (75: older ones lost support in 2025).
        minor_version: u32,
        /// The company's home currency: without multicurrency, QuickBooks books every journal in
        /// it, so a journal in another currency is refused (dead-lettered with the reason).
        home_currency: Currency,
        /// The company has multicurrency on: journals in other currencies go with their
        /// `CurrencyRef` (QuickBooks converts at its rate of the day).
        multi_currency: bool,
    },
    /// Xero.
    Xero {
        /// `https://api.xero.com`.
        base: String,
        /// The `xero-tenant-id`.
        tenant_id: String,
        /// The organisation's base currency (manual journals post in it only).
        base_currency: Currency,
    },
}

impl Shape {
    /// The label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Shape::Generic { .. } => "generic",
            Shape::QuickBooks { .. } => "quickbooks",
            Shape::Xero { .. } => "xero",
        }
    }

    /// The target's documented limits (docs/connectors.md, "Vendor limits", with sources).
    pub fn limits(&self) -> Option<VendorLimits> {
        match self {
            Shape::Generic { .. } => None,
            Shape::QuickBooks { .. } => Some(VendorLimits::QUICKBOOKS),
            Shape::Xero { .. } => Some(VendorLimits::XERO),
        }
    }

    /// Requests a day the target allows (Xero: 5,000 per tenant).
    pub fn daily_limit(&self) -> Option<u32> {
        self.limits().and_then(|l| l.per_day)
    }

    /// The documented limits of the target, applied to `policy` (stricter settings are kept):
    /// items per request, requests per minute, requests at once and body size.
    pub fn clamp(&self, mut policy: DeliveryPolicy) -> DeliveryPolicy {
        let Some(limits) = self.limits() else { return policy };
        let (batch, rate, concurrency) = (limits.items_per_request, limits.rate, limits.concurrent);
        policy.max_batch = policy.max_batch.clamp(1, batch);
        policy.max_bytes = policy.max_bytes.min(limits.max_body_bytes);
        policy.concurrency = policy.concurrency.clamp(1, concurrency);
        policy.rate = Some(match policy.rate {
            Some(r) if r.capacity <= rate.capacity && r.every >= rate.every => r,
            _ => rate,
        });
        policy
    }
}

/// A vendor's published limits, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorLimits {
    /// Journals in one request (QuickBooks: batch operations; Xero: journals per PUT).
    pub items_per_request: usize,
    /// The request rate the drain keeps to.
    pub rate: RateLimit,
    /// Requests at once.
    pub concurrent: usize,
    /// Requests per day, if limited.
    pub per_day: Option<u32>,
    /// Largest body.
    pub max_body_bytes: usize,
}

impl VendorLimits {
    /// QuickBooks Online: batch requests ≤ 40/minute per company with ≤ 30 operations each;
    /// 500 requests/minute and 10 concurrent per realm. Every request is paced as a batch.
    pub const QUICKBOOKS: VendorLimits = VendorLimits {
        items_per_request: 30,
        rate: RateLimit::QUICKBOOKS_BATCH,
        concurrent: 10,
        per_day: None,
        max_body_bytes: 256 << 10,
    };
    /// Xero: 60 calls/minute, 5 concurrent and 5,000/day per tenant; ≤ 50 journals per request
    /// and 3.5 MB per body (the in-flight copy in the store keeps bodies ≤ 256 KiB anyway).
    pub const XERO: VendorLimits = VendorLimits {
        items_per_request: 50,
        rate: RateLimit::XERO,
        concurrent: 5,
        per_day: Some(5_000),
        max_body_bytes: 3_500_000,
    };
}

/// The ledger accounts journals are booked to (codes or ids, as the target names them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounts {
    /// Cost of goods sold (debited on shipment).
    pub cogs: String,
    /// Inventory asset (credited on shipment, debited on receipt). In Xero a CURRENT-type
    /// account: manual journals cannot touch INVENTORY-type accounts.
    pub inventory: String,
    /// Received-not-invoiced clearing account (credited on receipt; the bill clears it).
    pub clearing: String,
}

/// What `stockflow accounts check` found for one configured account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountCheck {
    /// `cogs`, `inventory` or `clearing`.
    pub role: &'static str,
    /// The configured Id (QuickBooks) or code (Xero).
    pub account: String,
    /// Its name and type in the books, when found.
    pub found: Option<(String, String)>,
    /// What is wrong (`None`: fine).
    pub problem: Option<String>,
}

/// The account types each role may have: QuickBooks `AccountType`s, Xero `Type`s.
fn allowed_types(shape: &Shape, role: &str) -> &'static [&'static str] {
    match (shape, role) {
        (Shape::QuickBooks { .. }, "cogs") => &["Cost of Goods Sold"],
        (Shape::QuickBooks { .. }, "inventory") => &["Other Current Asset"],
        (Shape::QuickBooks { .. }, _) => &["Other Current Liability"],
        (_, "cogs") => &["DIRECTCOSTS", "EXPENSE"],
        // Manual journals cannot post to INVENTORY-type accounts in Xero.
        (_, "inventory") => &["CURRENT"],
        (_, _) => &["CURRLIAB", "LIABILITY"],
    }
}

/// Percent-encodes a query parameter or form value (everything but unreserved characters).
pub(crate) fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A debit or a credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Debit.
    Debit,
    /// Credit.
    Credit,
}

/// One line of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryLine {
    /// Account.
    pub account: String,
    /// Side.
    pub side: Side,
    /// Amount, rounded to the currency's minor unit, not negative.
    pub amount: Decimal,
}

/// A balanced journal entry built from one journal effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The effect id (`cogs:…`, `inventory:…`).
    pub id: String,
    /// `YYYY-MM-DD` of the event time (UTC).
    pub date: String,
    /// Currency.
    pub currency: Currency,
    /// Narration.
    pub memo: String,
    /// Lines (debits = credits).
    pub lines: Vec<EntryLine>,
}

/// Builds the entry of a journal line and checks it: every amount at most the currency's minor
/// unit, none negative, debits = credits.
pub fn entry(j: &JournalLine, accounts: &Accounts) -> Result<Entry, String> {
    let amount = j.currency.round(j.amount);
    if amount != j.amount {
        return Err(format!("{}: amount {} has more decimals than {}", j.entry_id, j.amount, j.currency));
    }
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(format!("{}: negative amount {amount}", j.entry_id));
    }
    let (debit, credit, what) = match j.kind {
        JournalKind::Cogs => (&accounts.cogs, &accounts.inventory, "COGS"),
        JournalKind::InventoryReceipt => (&accounts.inventory, &accounts.clearing, "Inventory received"),
    };
    let e = Entry {
        id: j.entry_id.clone(),
        date: date_of(j.ts),
        currency: j.currency,
        memo: format!("stockflow {} {} x{} {}", what, j.sku, j.qty, j.entry_id),
        lines: vec![
            EntryLine { account: debit.clone(), side: Side::Debit, amount },
            EntryLine { account: credit.clone(), side: Side::Credit, amount },
        ],
    };
    check_balanced(&e)?;
    Ok(e)
}

/// Debits = credits, and every amount within the currency's minor unit.
pub fn check_balanced(e: &Entry) -> Result<(), String> {
    let mut sum = Decimal::ZERO;
    for l in &e.lines {
        if e.currency.round(l.amount) != l.amount {
            return Err(format!("{}: line amount {} is not in {} minor units", e.id, l.amount, e.currency));
        }
        sum += match l.side {
            Side::Debit => l.amount,
            Side::Credit => -l.amount,
        };
    }
    if sum.is_zero() { Ok(()) } else { Err(format!("{}: debits and credits differ by {sum}", e.id)) }
}

/// `YYYY-MM-DD` (UTC) of Unix milliseconds.
pub fn date_of(ts_ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ts_ms) {
        Ok(t) => t.to_zoned(jiff::tz::TimeZone::UTC).date().to_string(),
        // Event times are bounded to 2000–2099 (docs/semantics.md); jiff covers years -9999..=9999.
        Err(_) => "0000-01-01".to_string(),
    }
}

/// An exact JSON number.
pub(crate) fn number(d: Decimal) -> Box<RawValue> {
    RawValue::from_string(d.normalize().to_string())
        .unwrap_or_else(|_| RawValue::from_string("0".into()).unwrap_or_default())
}

/// The accounting connector.
#[derive(Debug)]
pub struct Accounting {
    shape: Shape,
    accounts: Accounts,
    token: Secret,
    http: HttpClient,
    policy: DeliveryPolicy,
    summary: Option<SummaryPolicy>,
    budget: Option<DailyBudget>,
}

impl Accounting {
    /// A connector of `shape` booking to `accounts`, one journal per effect (`per_effect`
    /// posting); `policy` is clamped to the target's limits.
    pub fn new(shape: Shape, accounts: Accounts, token: Secret, policy: DeliveryPolicy) -> Self {
        let policy = shape.clamp(policy);
        let budget = shape.daily_limit().map(DailyBudget::new);
        Accounting { http: HttpClient::new(policy.timeout), shape, accounts, token, policy, summary: None, budget }
    }

    /// Posts summaries per period ([`crate::journals`]) instead of a journal per effect.
    pub fn with_summary(mut self, summary: SummaryPolicy) -> Self {
        self.summary = Some(summary);
        self
    }

    /// `GET url` and its JSON answer.
    async fn get_json(
        &self,
        url: &str,
        headers: &[(&str, String)],
        vendor: &str,
    ) -> Result<serde_json::Value, DeliveryError> {
        let resp = classify(self.http.send(Method::GET, url, headers, Bytes::new()).await?, Duration::from_secs(60))?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| DeliveryError::Rejected(format!("{vendor} answered no JSON: {e}")))
    }

    /// Reads the configured accounts back from the vendor (QuickBooks: a query of `Account` by
    /// Id; Xero: `GET Accounts`) and says, per role, whether each exists, is active and has a
    /// type journals may post to. The generic shape has no account API: `Rejected`.
    pub async fn check_accounts(&self) -> Result<Vec<AccountCheck>, DeliveryError> {
        let roles = [
            ("cogs", &self.accounts.cogs),
            ("inventory", &self.accounts.inventory),
            ("clearing", &self.accounts.clearing),
        ];
        let mut headers = vec![("accept", "application/json".to_string())];
        if !self.token.is_empty() {
            headers.push(("authorization", format!("Bearer {}", self.token.expose())));
        }
        // key → (name, type, usable, why not)
        let mut chart: HashMap<String, (String, String, Option<String>)> = HashMap::new();
        match &self.shape {
            Shape::Generic { .. } => {
                return Err(DeliveryError::Rejected("the generic shape has no account API to check".into()));
            }
            Shape::QuickBooks { base, realm_id, minor_version, .. } => {
                let ids: Vec<String> = roles.iter().map(|(_, a)| format!("'{}'", a.replace('\'', ""))).collect();
                let query =
                    format!("select Id, Name, AccountType, Active from Account where Id in ({})", ids.join(", "));
                let url = format!(
                    "{}/v3/company/{realm_id}/query?query={}&minorversion={minor_version}",
                    base.trim_end_matches('/'),
                    encode(&query)
                );
                let v = self.get_json(&url, &headers, "QuickBooks").await?;
                for a in v["QueryResponse"]["Account"].as_array().into_iter().flatten() {
                    let inactive = (a["Active"] == serde_json::Value::Bool(false)).then(|| "inactive".to_string());
                    chart.insert(
                        a["Id"].as_str().unwrap_or_default().to_string(),
                        (
                            a["Name"].as_str().unwrap_or_default().into(),
                            a["AccountType"].as_str().unwrap_or_default().into(),
                            inactive,
                        ),
                    );
                }
            }
            Shape::Xero { base, tenant_id, .. } => {
                headers.push(("xero-tenant-id", tenant_id.clone()));
                let url = format!("{}/api.xro/2.0/Accounts", base.trim_end_matches('/'));
                let v = self.get_json(&url, &headers, "Xero").await?;
                for a in v["Accounts"].as_array().into_iter().flatten() {
                    let why = if a["Status"].as_str().is_some_and(|s| s != "ACTIVE") {
                        Some(format!("status {}", a["Status"].as_str().unwrap_or_default()))
                    } else {
                        a["SystemAccount"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .map(|s| format!("system account {s}: manual journals cannot post to it"))
                    };
                    chart.insert(
                        a["Code"].as_str().unwrap_or_default().to_string(),
                        (
                            a["Name"].as_str().unwrap_or_default().into(),
                            a["Type"].as_str().unwrap_or_default().into(),
                            why,
                        ),
                    );
                }
            }
        }
        Ok(roles
            .iter()
            .map(|(role, account)| {
                let what = if matches!(self.shape, Shape::QuickBooks { .. }) { "Id" } else { "code" };
                let Some((name, kind, why)) = chart.get(*account) else {
                    return AccountCheck {
                        role,
                        account: (*account).clone(),
                        found: None,
                        problem: Some(format!("no account with {what} {account:?} in the books")),
                    };
                };
                let allowed = allowed_types(&self.shape, role);
                let problem = why.clone().or_else(|| {
                    (!allowed.contains(&kind.as_str())).then(|| {
                        format!("type {kind:?} is not one journals use for {role} (expected {})", allowed.join(" or "))
                    })
                });
                AccountCheck { role, account: (*account).clone(), found: Some((name.clone(), kind.clone())), problem }
            })
            .collect())
    }

    /// The daily request budget, for targets that have one (Xero).
    pub fn budget(&self) -> Option<&DailyBudget> {
        self.budget.as_ref()
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    fn url(&self, request: &Request) -> (Method, String) {
        match &self.shape {
            Shape::Generic { url } => (Method::POST, format!("{}/v1/journals", url.trim_end_matches('/'))),
            Shape::QuickBooks { base, realm_id, minor_version, .. } => {
                let op = if request.items.len() > 1 { "batch" } else { "journalentry" };
                let base = base.trim_end_matches('/');
                let url =
                    format!("{base}/v3/company/{realm_id}/{op}?minorversion={minor_version}&requestid={}", request.key);
                (Method::POST, url)
            }
            Shape::Xero { base, .. } => (
                Method::PUT,
                format!("{}/api.xro/2.0/ManualJournals?summarizeErrors=false", base.trim_end_matches('/')),
            ),
        }
    }

    fn headers(&self, request: &Request) -> Vec<(&'static str, String)> {
        let mut h = vec![("accept", "application/json".to_string())];
        if !self.token.is_empty() {
            h.push(("authorization", format!("Bearer {}", self.token.expose())));
        }
        match &self.shape {
            Shape::Generic { .. } => h.push(("idempotency-key", request.key.clone())),
            Shape::QuickBooks { .. } => {}
            Shape::Xero { tenant_id, .. } => {
                h.push(("xero-tenant-id", tenant_id.clone()));
                h.push(("idempotency-key", request.key.clone()));
            }
        }
        h
    }

    /// The body of `entries` in the target's shape.
    fn body(&self, key: &str, entries: &[Entry]) -> Result<String, DeliveryError> {
        match &self.shape {
            Shape::Generic { .. } => generic::body(key, entries),
            Shape::QuickBooks { .. } => quickbooks::body(entries),
            Shape::Xero { .. } => xero::body(entries),
        }
        .map_err(|e| DeliveryError::Rejected(e.to_string()))
    }

    /// A journal in `currency` can be booked: Xero's base currency; QuickBooks' home currency
    /// unless the company is multicurrency.
    fn check_currency(&self, id: &str, currency: Currency) -> Result<(), DeliveryError> {
        if let Shape::Xero { base_currency, .. } = &self.shape
            && currency != *base_currency
        {
            return Err(DeliveryError::Rejected(format!(
                "{id}: Xero manual journals post in the base currency {base_currency}, not {currency}"
            )));
        }
        if let Shape::QuickBooks { home_currency, multi_currency: false, .. } = &self.shape
            && currency != *home_currency
        {
            return Err(DeliveryError::Rejected(format!(
                "{id}: the QuickBooks company books in its home currency {home_currency}, not {currency} \
                 (turn on multicurrency in QuickBooks and set connectors.accounting.multi_currency)"
            )));
        }
        Ok(())
    }

    /// Items refused inside a 200 answer.
    fn rejected_items(&self, request: &Request, body: &[u8]) -> Vec<(String, String)> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return Vec::new() };
        match &self.shape {
            Shape::Generic { .. } => generic::rejected(v),
            Shape::QuickBooks { .. } => quickbooks::rejected(request, &v),
            Shape::Xero { .. } => xero::rejected(request, &v),
        }
    }
}

impl Connector for Accounting {
    fn name(&self) -> &'static str {
        "accounting"
    }

    fn kinds(&self) -> EffectKinds {
        EffectKinds::of(EffectKind::Journal)
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn summary(&self) -> Option<&SummaryPolicy> {
        self.summary.as_ref()
    }

    fn render_summary(&self, j: &SummaryJournal) -> Result<Request, DeliveryError> {
        let currency = Currency::parse(&j.currency)
            .ok_or_else(|| DeliveryError::Rejected(format!("{}: {} is not an ISO 4217 currency", j.id, j.currency)))?;
        self.check_currency(&j.id, currency)?;
        let a = &self.accounts;
        let mut lines = Vec::with_capacity(4);
        let line = |account: &String, side, amount| EntryLine { account: account.clone(), side, amount };
        if !j.cogs.is_zero() {
            lines.push(line(&a.cogs, Side::Debit, j.cogs));
        }
        // Inventory moves by what was received less what was sold: one line, on its side.
        let net = j.received - j.cogs;
        if net.is_sign_positive() && !net.is_zero() {
            lines.push(line(&a.inventory, Side::Debit, net));
        } else if !net.is_zero() {
            lines.push(line(&a.inventory, Side::Credit, -net));
        }
        if !j.received.is_zero() {
            lines.push(line(&a.clearing, Side::Credit, j.received));
        }
        let what = match j.kind {
            PostingKind::Summary => "summary".to_string(),
            PostingKind::Adjustment => format!("adjustment {}", j.id.rsplit(':').next().unwrap_or("")),
        };
        let e = Entry {
            id: j.id.clone(),
            date: j.date.clone(),
            currency,
            // The journal id last: receivers and people find it there, as in per-effect memos.
            memo: format!(
                "stockflow {what} {} ({}): COGS {} {}, received {} {}, {} journal lines {}",
                j.period, j.time_zone, j.cogs, j.currency, j.received, j.currency, j.effects, j.id
            ),
            lines,
        };
        check_balanced(&e).map_err(DeliveryError::Rejected)?;
        let key = request_key(self.name(), &[j.id.as_str()]);
        let body = self.body(&key, std::slice::from_ref(&e))?;
        Ok(Request { key, body, items: vec![j.id.clone()] })
    }

    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        let mut entries = Vec::with_capacity(batch.len());
        for effect in batch {
            let Effect::Journal(j) = effect else {
                return Err(DeliveryError::Rejected(format!("{} is not a journal line", effect.id())));
            };
            self.check_currency(&j.entry_id, j.currency)?;
            entries.push(entry(j, &self.accounts).map_err(DeliveryError::Rejected)?);
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id()).collect();
        let key = request_key(self.name(), &ids);
        let body = self.body(&key, &entries)?;
        Ok(Request { key, body, items: ids.into_iter().map(str::to_string).collect() })
    }

    async fn send(&self, request: &Request) -> Result<Delivered, DeliveryError> {
        let (method, url) = self.url(request);
        if let Some(budget) = &self.budget {
            // Out of the day's calls: wait for the window rather than be refused (and say so).
            if let Err(wait) = budget.take() {
                return Err(DeliveryError::Throttled {
                    reason: format!("daily budget of {} requests spent", budget.limit()),
                    retry_after: Some(wait),
                });
            }
        }
        let body = Bytes::from(request.body.clone().into_bytes());
        let resp = self.http.send(method, &url, &self.headers(request), body).await;
        if let (Some(budget), Ok(r)) = (&self.budget, &resp) {
            let remaining = r.headers.get("x-daylimit-remaining").and_then(|v| v.to_str().ok()?.trim().parse().ok());
            budget.observe(remaining, self.shape.label());
        }
        let resp = resp?;
        // QuickBooks and Xero both say: after a 429, wait a minute unless told otherwise.
        let resp = classify(resp, Duration::from_secs(60))?;
        let rejected = self.rejected_items(request, &resp.body);
        if !rejected.is_empty() {
            tracing::warn!(shape = self.shape.label(), refused = rejected.len(), answer = %excerpt(&resp.body),
                "the accounting system refused entries inside a successful answer");
        }
        Ok(Delivered { rejected })
    }
}

#[cfg(test)]
mod tests;
