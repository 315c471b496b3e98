//! Rendering, balance checks and answers of the three shapes.

use super::*;
use proptest::prelude::*;

fn accounts() -> Accounts {
    Accounts { cogs: "5000".into(), inventory: "1300".into(), clearing: "2100".into() }
}

fn qbo_shape(multi_currency: bool) -> Shape {
    Shape::QuickBooks {
        base: "http://q".into(),
        realm_id: "123".into(),
        minor_version: 75,
        home_currency: Currency::USD,
        multi_currency,
    }
}

#[tokio::test]
async fn quickbooks_refuses_a_foreign_currency_unless_the_company_is_multicurrency() {
    let eur = journal(JournalKind::Cogs, Decimal::new(1234, 2), Currency::parse("EUR").unwrap());
    let home = Accounting::new(qbo_shape(false), accounts(), Secret::new("t"), DeliveryPolicy::default());
    let err = home.render(&[&Effect::Journal(eur.clone())]).await.unwrap_err();
    assert!(
        matches!(&err, DeliveryError::Rejected(r) if r.contains("home currency USD, not EUR") && r.contains("multi_currency")),
        "{err:?}"
    );
    let usd = journal(JournalKind::Cogs, Decimal::new(1234, 2), Currency::USD);
    assert!(home.render(&[&Effect::Journal(usd)]).await.is_ok());
    let multi = Accounting::new(qbo_shape(true), accounts(), Secret::new("t"), DeliveryPolicy::default());
    let req = multi.render(&[&Effect::Journal(eur)]).await.unwrap();
    assert!(req.body.contains(r#""CurrencyRef":{"value":"EUR"}"#), "{}", req.body);
}

#[test]
fn summaries_book_one_line_per_account_and_keep_the_currency_guard() {
    let j = |cogs: i64, received: i64, currency: &str| SummaryJournal {
        id: format!("journal:2026-11-27:{currency}:0"),
        period: "2026-11-27".into(),
        kind: PostingKind::Summary,
        date: "2026-11-27".into(),
        time_zone: "UTC".into(),
        currency: currency.into(),
        cogs: Decimal::new(cogs, 2),
        received: Decimal::new(received, 2),
        effects: 3,
    };
    let xero = Accounting::new(
        Shape::Xero { base: "http://x".into(), tenant_id: "t".into(), base_currency: Currency::USD },
        accounts(),
        Secret::new("t"),
        DeliveryPolicy::default(),
    );
    let r = xero.render_summary(&j(1_000, 2_500, "USD")).unwrap();
    // COGS 10.00 debit; inventory +15.00 (received 25.00 − sold 10.00); clearing 25.00 credit.
    assert!(r.body.contains(r#"{"LineAmount":10,"AccountCode":"5000""#), "{}", r.body);
    assert!(r.body.contains(r#"{"LineAmount":15,"AccountCode":"1300""#), "{}", r.body);
    assert!(r.body.contains(r#"{"LineAmount":-25,"AccountCode":"2100""#), "{}", r.body);
    assert_eq!(r.items, ["journal:2026-11-27:USD:0"]);
    assert_eq!(r.key, xero.render_summary(&j(1_000, 2_500, "USD")).unwrap().key, "the key is the period's");
    // More sold than received: inventory is credited.
    let sold = xero.render_summary(&j(4_000, 0, "USD")).unwrap();
    assert!(sold.body.contains(r#"{"LineAmount":-40,"AccountCode":"1300""#), "{}", sold.body);
    assert!(!sold.body.contains("2100"), "no zero line");
    assert!(
        matches!(xero.render_summary(&j(1, 0, "EUR")), Err(DeliveryError::Rejected(m)) if m.contains("base currency"))
    );
    let qbo = Accounting::new(qbo_shape(false), accounts(), Secret::new("t"), DeliveryPolicy::default());
    let r = qbo.render_summary(&j(1_000, 2_500, "USD")).unwrap();
    assert!(qbo.url(&r).1.contains("/journalentry?"), "one entry, not a batch");
    assert!(r.body.contains(r#""DocNumber":"SF"#));
}

fn journal(kind: JournalKind, amount: Decimal, currency: Currency) -> JournalLine {
    JournalLine {
        entry_id: "cogs:e1".into(),
        sku: "MUG".into(),
        kind,
        qty: 3,
        unit_cost: amount / Decimal::from(3),
        amount,
        currency,
        ts: 1_764_201_600_000, // 2025-11-27
    }
}

#[test]
fn dates_are_utc_civil_dates() {
    assert_eq!(date_of(0), "1970-01-01");
    assert_eq!(date_of(1_764_201_600_000), "2025-11-27");
    assert_eq!(date_of(951_782_400_000), "2000-02-29");
    assert_eq!(date_of(-1), "1969-12-31");
}

#[test]
fn entries_refuse_unrounded_and_negative_amounts() {
    let usd = Currency::USD;
    assert!(entry(&journal(JournalKind::Cogs, Decimal::new(1234, 2), usd), &accounts()).is_ok());
    let e = entry(&journal(JournalKind::Cogs, Decimal::new(12345, 3), usd), &accounts()).unwrap_err();
    assert!(e.contains("more decimals"), "{e}");
    let e = entry(&journal(JournalKind::Cogs, Decimal::new(-100, 2), usd), &accounts()).unwrap_err();
    assert!(e.contains("negative"), "{e}");
    let unbalanced = Entry {
        id: "x".into(),
        date: "2025-01-01".into(),
        currency: usd,
        memo: String::new(),
        lines: vec![
            EntryLine { account: "a".into(), side: Side::Debit, amount: Decimal::new(100, 2) },
            EntryLine { account: "b".into(), side: Side::Credit, amount: Decimal::new(99, 2) },
        ],
    };
    assert!(check_balanced(&unbalanced).unwrap_err().contains("differ by 0.01"));
}

#[tokio::test]
async fn the_three_shapes_render_what_their_apis_take() {
    let j = Effect::Journal(journal(JournalKind::Cogs, Decimal::new(1234, 2), Currency::USD));
    let r = Effect::Journal(JournalLine {
        entry_id: "inventory:e2".into(),
        kind: JournalKind::InventoryReceipt,
        ..journal(JournalKind::InventoryReceipt, Decimal::new(500, 2), Currency::USD)
    });
    let policy = DeliveryPolicy::default;
    let generic = Accounting::new(Shape::Generic { url: "http://x".into() }, accounts(), Secret::default(), policy());
    let req = generic.render(&[&j, &r]).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(v["entries"][0]["lines"][0], serde_json::json!({"account": "5000", "debit": "12.34"}));
    assert_eq!(v["entries"][0]["lines"][1], serde_json::json!({"account": "1300", "credit": "12.34"}));
    assert_eq!(v["entries"][1]["lines"][0], serde_json::json!({"account": "1300", "debit": "5.00"}));
    assert_eq!(v["entries"][1]["lines"][1], serde_json::json!({"account": "2100", "credit": "5.00"}));
    assert_eq!(v["entries"][0]["date"], "2025-11-27");
    assert_eq!(req.items, ["cogs:e1", "inventory:e2"]);

    let qbo =
        Accounting::new(qbo_shape(false), accounts(), Secret::new("t"), DeliveryPolicy { max_batch: 500, ..policy() });
    assert_eq!(qbo.policy().max_batch, 30, "QuickBooks batches are clamped to 30 operations");
    assert_eq!(qbo.policy().rate, Some(RateLimit::QUICKBOOKS_BATCH), "40 batch requests a minute");
    let single = qbo.render(&[&j]).await.unwrap();
    assert!(single.body.contains(r#""Amount":12.34,"#), "{}", single.body);
    assert!(single.body.contains(r#""PostingType":"Debit","AccountRef":{"value":"5000"}"#));
    assert!(
        qbo.url(&single).1.ends_with(&format!("/v3/company/123/journalentry?minorversion=75&requestid={}", single.key))
    );
    let batch = qbo.render(&[&j, &r]).await.unwrap();
    assert!(batch.body.starts_with(r#"{"BatchItemRequest":[{"bId":"b0","operation":"create","JournalEntry":"#));
    assert!(qbo.url(&batch).1.contains("/batch?"));
    assert!(batch.key.len() <= 36);
    let faults = r#"{"BatchItemResponse":[{"bId":"b0","JournalEntry":{"Id":"1"}},{"bId":"b1","Fault":{"type":"ValidationFault"}}]}"#;
    assert_eq!(qbo.rejected_items(&batch, faults.as_bytes())[0].0, "inventory:e2");

    let xero = Accounting::new(
        Shape::Xero { base: "http://x".into(), tenant_id: "t-1".into(), base_currency: Currency::USD },
        accounts(),
        Secret::new("t"),
        policy(),
    );
    let req = xero.render(&[&j]).await.unwrap();
    assert!(req.body.contains(r#""JournalLines":[{"LineAmount":12.34,"AccountCode":"5000""#), "{}", req.body);
    assert!(req.body.contains(r#"{"LineAmount":-12.34,"AccountCode":"1300""#));
    assert!(xero.headers(&req).contains(&("xero-tenant-id", "t-1".to_string())));
    let eur = Effect::Journal(journal(JournalKind::Cogs, Decimal::new(100, 2), Currency::parse("EUR").unwrap()));
    assert!(matches!(xero.render(&[&eur]).await, Err(DeliveryError::Rejected(m)) if m.contains("base currency")));
}

proptest! {
    /// Any amount booked by the ledger (rounded half to even to 0, 2 or 3 decimals) gives a
    /// balanced entry whose amounts keep the minor unit, in every shape.
    #[test]
    fn journals_balance_to_the_minor_unit(qty in 1i64..10_000, cost_milli in 0i64..10_000_000, code in 0usize..3) {
        let currency = Currency::parse(["JPY", "USD", "KWD"][code]).unwrap();
        let amount = currency.round(Decimal::from(qty) * Decimal::new(cost_milli, 3));
        let j = JournalLine { qty, ..journal(JournalKind::Cogs, amount, currency) };
        let e = entry(&j, &accounts()).unwrap();
        prop_assert!(check_balanced(&e).is_ok());
        let debits: Decimal = e.lines.iter().filter(|l| l.side == Side::Debit).map(|l| l.amount).sum();
        prop_assert_eq!(debits, amount);
        prop_assert!(amount.scale() <= currency.minor_units());
        // Xero's signed lines sum to zero, exactly.
        let xero: Decimal = e.lines.iter().map(|l| if l.side == Side::Debit { l.amount } else { -l.amount }).sum();
        prop_assert!(xero.is_zero());
        // The JSON number carries the exact decimal.
        let n = number(amount);
        prop_assert_eq!(n.get().parse::<Decimal>().unwrap(), amount);
    }
}

#[test]
fn half_to_even_rounding_of_ties() {
    let usd = Currency::USD;
    assert_eq!(usd.round(Decimal::new(125, 3)), Decimal::new(12, 2));
    assert_eq!(usd.round(Decimal::new(135, 3)), Decimal::new(14, 2));
    let jpy = Currency::parse("JPY").unwrap();
    assert_eq!(jpy.round(Decimal::new(25, 1)), Decimal::from(2));
}

/// What the books read back equals what the connector posted: for each shape, a receipt of
/// 25.00 and a sale costing 10.00 on 2025-11-27 are posted to the local receivers, then the
/// inventory balance (15.00 from that day on) and the COGS of a period (10.00 when it holds the
/// day) are read back through the vendor's own read API.
#[tokio::test]
async fn the_books_read_back_what_the_journals_posted() {
    use crate::testing::{FaultPlan, Receivers};
    let receivers = Receivers::new(FaultPlan::none(), None);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let (base, _) = receivers.start(stopped).await.unwrap();
    let shapes = [
        (Shape::Generic { url: format!("{base}/generic") }, accounts()),
        (
            Shape::QuickBooks {
                base: format!("{base}/qbo"),
                realm_id: "123".into(),
                minor_version: 75,
                home_currency: Currency::USD,
                multi_currency: false,
            },
            Accounts { cogs: "80".into(), inventory: "81".into(), clearing: "82".into() },
        ),
        (
            Shape::Xero { base: format!("{base}/xero"), tenant_id: "t".into(), base_currency: Currency::USD },
            Accounts { cogs: "500".into(), inventory: "631".into(), clearing: "820".into() },
        ),
    ];
    for (shape, accounts) in shapes {
        let label = shape.label();
        let books = Accounting::new(shape, accounts, Secret::new("t"), DeliveryPolicy::default());
        // Ids of their own per shape: the receivers remember request keys across routes.
        let received = JournalLine {
            entry_id: format!("inventory:r-{label}"),
            ..journal(JournalKind::InventoryReceipt, Decimal::new(2500, 2), Currency::USD)
        };
        let sold = JournalLine {
            entry_id: format!("cogs:s-{label}"),
            ..journal(JournalKind::Cogs, Decimal::new(1000, 2), Currency::USD)
        };
        let request = books.render(&[&Effect::Journal(received), &Effect::Journal(sold)]).await.unwrap();
        books.send(&request).await.unwrap();

        let b = books.read_books("2025-11-01", "2025-11-30").await.unwrap();
        assert_eq!(
            (b.inventory_balance, b.cogs_posted),
            (Decimal::new(1500, 2), Some(Decimal::new(1000, 2))),
            "{label}"
        );
        let later = books.read_books("2025-12-01", "2025-12-31").await.unwrap();
        assert_eq!(later.cogs_posted, Some(Decimal::ZERO), "{label}: no COGS in December");
        let before = books.read_books("2025-11-01", "2025-11-26").await.unwrap();
        // QuickBooks' CurrentBalance is the balance now, whatever the date asked.
        let expected = if label == "quickbooks" { Decimal::new(1500, 2) } else { Decimal::ZERO };
        assert_eq!(before.inventory_balance, expected, "{label}: the balance before the day");
    }
}
