//! What the receivers recorded, checked against the straight pass: every effect exactly once,
//! per-SKU order, journal totals; summary journals against the postings the book expects.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;

use super::accounting::kind_of;
use super::*;

/// Which receiver route a connector's effects land on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    /// Alert webhook route (`alerts`), if the webhook runs.
    pub alerts: bool,
    /// Manufacturer reorders (`reorders`), if it runs.
    pub reorders: bool,
    /// Accounting route (`generic`, `quickbooks`, `xero`), if it runs.
    pub accounting: Option<&'static str>,
}

/// Checks what the receivers accepted against every effect of the straight pass: each expected
/// effect accepted exactly once (by id, under one key), nothing unexpected, per-SKU order kept,
/// journal totals equal to the sum of the journal lines per kind and currency. Returns the
/// problems (empty when delivery was exact), at most `limit`.
pub fn check_deliveries(log: &Log, expected: &[stockflow_state::Effect], routes: Routes, limit: usize) -> Vec<String> {
    use stockflow_state::Effect;
    let mut problems = Vec::new();
    for (id, n) in log.duplicates() {
        problems.push(format!("{id}: accepted under {n} keys"));
    }
    let mut check = |route: &'static str, wanted: &dyn Fn(&Effect) -> bool| {
        let want: Vec<&Effect> = expected.iter().filter(|e| wanted(e)).collect();
        let got = log.order.get(route).cloned().unwrap_or_default();
        let got_set: std::collections::HashSet<&str> = got.iter().map(String::as_str).collect();
        let want_set: std::collections::HashSet<&str> = want.iter().map(|e| e.id()).collect();
        for e in &want {
            if !got_set.contains(e.id()) {
                problems.push(format!("{route}: {} never accepted", e.id()));
            }
        }
        for id in &got {
            if !want_set.contains(id.as_str()) {
                problems.push(format!("{route}: {id} accepted but not an effect of the stream"));
            }
        }
        // Per SKU, the receiver saw effects in stream order.
        let sku_of: HashMap<&str, &str> = want.iter().map(|e| (e.id(), e.sku())).collect();
        let mut want_by_sku: HashMap<&str, Vec<&str>> = HashMap::new();
        for e in &want {
            want_by_sku.entry(e.sku()).or_default().push(e.id());
        }
        let mut got_by_sku: HashMap<&str, Vec<&str>> = HashMap::new();
        for id in &got {
            if let Some(sku) = sku_of.get(id.as_str()) {
                got_by_sku.entry(sku).or_default().push(id);
            }
        }
        for (sku, ids) in &want_by_sku {
            let seen = got_by_sku.get(sku).cloned().unwrap_or_default();
            let expected_seen: Vec<&str> = ids.iter().copied().filter(|i| got_set.contains(i)).collect();
            if seen != expected_seen {
                problems.push(format!("{route}: SKU {sku} received out of order"));
            }
        }
    };
    if routes.alerts {
        check("alerts", &|e| e.is_alert());
    }
    if routes.reorders {
        check("reorders", &|e| matches!(e, Effect::Reorder(_)));
    }
    if let Some(route) = routes.accounting {
        check(route, &|e| matches!(e, Effect::Journal(_)));
        let mut want: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for e in expected {
            if let Effect::Journal(j) = e {
                let currency = if route == "xero" { "BASE".to_string() } else { j.currency.as_str().to_string() };
                *want.entry((kind_of(&j.entry_id), currency)).or_default() += j.amount;
            }
        }
        let got: BTreeMap<(String, String), Decimal> = log
            .journal_totals
            .iter()
            .filter(|((r, _, _), _)| *r == route)
            .map(|((_, k, c), v)| ((k.clone(), c.clone()), *v))
            .collect();
        if want != got {
            problems.push(format!("{route}: journal totals {got:?}, the straight pass books {want:?}"));
        }
    }
    problems.truncate(limit);
    problems
}

/// What a summary-mode check found.
#[derive(Debug, Default)]
pub struct SummaryCheck {
    /// Disagreements (empty when the books are exact).
    pub problems: Vec<String>,
    /// Periods (and currencies) with journals.
    pub posted_periods: usize,
    /// Periods with journal effects but no journal yet (not closed).
    pub open_periods: usize,
}

/// Checks summary journals against the straight pass's journal effects: every posting sent and
/// accepted exactly once with the amounts it recorded (COGS debited, clearing credited, inventory
/// the difference), and per period and currency the postings' totals equal the sum of the
/// straight pass's journal lines of that period, to the cent. A period without a posting must be
/// one that is not closed yet (it is counted, not compared).
pub fn check_summaries(
    log: &Log,
    postings: &[crate::journals::Posting],
    expected: &[stockflow_state::Effect],
    policy: &crate::journals::SummaryPolicy,
    accounts: &crate::accounting::Accounts,
) -> SummaryCheck {
    use stockflow_state::Effect;
    use stockflow_state::effects::JournalKind;
    let mut out = SummaryCheck::default();
    let mut want: BTreeMap<(String, String), (Decimal, Decimal)> = BTreeMap::new();
    for e in expected {
        if let Effect::Journal(j) = e {
            let t = want.entry((policy.span(j.ts).label, j.currency.as_str().to_string())).or_default();
            match j.kind {
                JournalKind::Cogs => t.0 += j.amount,
                JournalKind::InventoryReceipt => t.1 += j.amount,
            }
        }
    }
    let mut got: BTreeMap<(String, String), (Decimal, Decimal)> = BTreeMap::new();
    for p in postings {
        let t = got.entry((p.period.clone(), p.currency.clone())).or_default();
        t.0 += p.cogs;
        t.1 += p.received;
        let id = p.journal_id();
        match p.state {
            crate::journals::PostingState::Sent => {
                let Some(lines) = log.summaries.get(&id) else {
                    out.problems.push(format!("{id}: sent but not accepted by the receiver"));
                    continue;
                };
                let at = |a: &String| lines.get(a).copied().unwrap_or_default();
                if at(&accounts.cogs) != p.cogs || -at(&accounts.clearing) != p.received {
                    out.problems.push(format!(
                        "{id}: the receiver booked COGS {} / received {}, the posting says {} / {}",
                        at(&accounts.cogs),
                        -at(&accounts.clearing),
                        p.cogs,
                        p.received
                    ));
                }
                if at(&accounts.inventory) != p.received - p.cogs {
                    out.problems.push(format!("{id}: inventory moved by {}", at(&accounts.inventory)));
                }
            }
            crate::journals::PostingState::Empty => {}
            ref s => out.problems.push(format!("{id}: {s:?} ({:?})", p.error)),
        }
    }
    for (id, n) in log.duplicates() {
        out.problems.push(format!("{id} accepted under {n} keys"));
    }
    for (k, w) in &want {
        match got.get(k) {
            Some(g) if g == w => out.posted_periods += 1,
            Some(g) => out.problems.push(format!(
                "period {} {}: journals book COGS {} / received {}, the straight pass {} / {}",
                k.0, k.1, g.0, g.1, w.0, w.1
            )),
            None => out.open_periods += 1,
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out.problems.push(format!("period {} {}: journals without journal lines", k.0, k.1));
    }
    out.problems.truncate(20);
    out
}
