//! The FBA Inventory API client against the local SP-API stand-in (`testing::SpApi`), fed with
//! summaries shaped like the published model (`fixtures/fba_inventory_summaries.json`): paging,
//! the 2 requests/s limit, 429s, early token refresh, a revoked token, an expired page token and
//! refused credentials.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stockflow_connectors::Secret;
use stockflow_connectors::amazon::{AmazonError, FbaCount, InventoryApi, Lwa, LwaCredentials};
use stockflow_connectors::testing::{SpApi, spapi};
use stockflow_state::retry::BackoffConfig;
use tokio::sync::watch;

const MARKETPLACE: &str = "ATVPDKIKX0DER";

fn fixtures() -> Vec<Value> {
    serde_json::from_str(include_str!("fixtures/fba_inventory_summaries.json")).unwrap()
}

/// `n` more summaries like the model's, SKUs `BULK-000…`.
fn bulk(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({"asin": format!("B{i:09}"), "fnSku": format!("X{i:09}"), "sellerSku": format!("BULK-{i:03}"),
                "condition": "NewItem", "lastUpdatedTime": "2026-11-30T00:00:00Z", "productName": "bulk", "totalQuantity": i,
                "inventoryDetails": {"fulfillableQuantity": i, "reservedQuantity": {"pendingCustomerOrderQuantity": 1}}})
        })
        .collect()
}

async fn client(sp: &Arc<SpApi>, secret: &str) -> (InventoryApi, watch::Sender<bool>) {
    let (stop, stopped) = watch::channel(false);
    let base = sp.start(stopped).await.unwrap();
    let lwa = Lwa::new(
        format!("{base}/auth/o2/token"),
        LwaCredentials {
            client_id: Secret::new(spapi::CLIENT_ID),
            client_secret: Secret::new(secret),
            refresh_token: Secret::new(spapi::REFRESH_TOKEN),
        },
        Duration::from_secs(5),
    );
    let api = InventoryApi::new(base, MARKETPLACE, lwa, Duration::from_secs(5))
        .with_backoff(BackoffConfig::new(Duration::from_millis(10), Duration::from_millis(100)));
    (api, stop)
}

#[tokio::test]
async fn every_page_is_read_within_the_rate_and_mapped_as_the_spec_says() {
    let sp = SpApi::new(MARKETPLACE, fixtures(), 2);
    let (api, _stop) = client(&sp, spapi::CLIENT_SECRET).await;
    let counts = api.summaries().await.unwrap();
    let skus: Vec<&str> = counts.iter().map(|c| c.sku.as_str()).collect();
    assert_eq!(skus, ["MUG-BLUE-12OZ", "MUG-RED-12OZ", "SAUCER-6IN", "TEAPOT-1L"], "sorted, the SKU-less one skipped");
    let blue = &counts[0];
    assert_eq!(
        blue,
        &FbaCount {
            sku: "MUG-BLUE-12OZ".into(),
            fulfillable: 41,
            pending_customer_order: 4,
            fc_processing: 1,
            transshipment: 2,
            inbound: 30,
            researching: 1,
            unfulfillable: 3,
            last_updated_ms: Some(1_796_062_925_000),
        }
    );
    assert_eq!(blue.count(), 45, "fulfillable + pending customer orders (SPEC §11)");
    assert_eq!((counts[2].count(), counts[2].last_updated_ms), (120, None), "missing fields are 0 / unknown");
    assert_eq!(counts[3].count(), 11);
    let log = sp.log();
    assert_eq!((log.pages, log.tokens_granted, log.rate_refusals), (3, 1, 0), "{log:?}");
    assert_eq!(api.stats().pages, 3);
}

#[tokio::test]
async fn twenty_pages_stay_within_two_requests_a_second_and_429s_are_waited_out() {
    let sp = SpApi::new(MARKETPLACE, bulk(40), 2);
    let (api, _stop) = client(&sp, spapi::CLIENT_SECRET).await;
    sp.throttle_next(3);
    let counts = api.summaries().await.unwrap();
    assert_eq!(counts.len(), 40);
    assert!(counts.iter().enumerate().all(|(i, c)| c.count() == i as i64 + 1));
    let log = sp.log();
    // The stand-in refuses any request over 2/s (burst 2): the client's bucket never trips it.
    assert_eq!(log.rate_refusals, 0, "{log:?}");
    assert_eq!((log.injected_throttles, log.pages), (3, 20), "{log:?}");
    assert_eq!(api.stats().throttled, 3);
}

#[tokio::test]
async fn a_failing_token_endpoint_is_retried_and_a_throttle_storm_ends_the_run() {
    let sp = SpApi::new(MARKETPLACE, fixtures(), 2);
    let (api, _stop) = client(&sp, spapi::CLIENT_SECRET).await;
    sp.fail_next_tokens(2);
    assert_eq!(api.summaries().await.unwrap().len(), 4);
    let log = sp.log();
    assert_eq!((log.tokens_failed, log.tokens_granted), (2, 1), "{log:?}");
    // Throttled on every request: 1 + 8 retries, then a clear error (not an endless loop).
    sp.throttle_next(1_000);
    let before = sp.log().summary_requests;
    let err = api.summaries().await.unwrap_err();
    assert!(matches!(&err, AmazonError::Unavailable(m) if m.contains("8 retries")), "{err}");
    assert_eq!(sp.log().summary_requests - before, 9);
}

#[tokio::test]
async fn tokens_are_refreshed_early_and_after_a_revocation() {
    let sp = SpApi::new(MARKETPLACE, fixtures(), 2);
    let (api, _stop) = client(&sp, spapi::CLIENT_SECRET).await;
    api.summaries().await.unwrap();
    assert_eq!(sp.log().tokens_granted, 1, "one token serves every page of a listing");
    // Revoked (or expired on Amazon's side): 403, a fresh token, the page again.
    sp.revoke_tokens();
    api.summaries().await.unwrap();
    let log = sp.log();
    assert_eq!((log.auth_refusals, log.tokens_granted), (1, 2), "{log:?}");
    // Tokens that live less than the refresh margin are replaced before every request: none is
    // ever sent about to expire.
    sp.set_token_lifetime(Duration::from_secs(60));
    sp.revoke_tokens();
    api.lwa().invalidate().await;
    let before = sp.log();
    api.summaries().await.unwrap();
    let after = sp.log();
    assert_eq!(after.auth_refusals, before.auth_refusals);
    assert_eq!(after.tokens_granted - before.tokens_granted, after.summary_requests - before.summary_requests);
}

#[tokio::test]
async fn an_expired_page_token_starts_the_listing_over() {
    let sp = SpApi::new(MARKETPLACE, bulk(6), 2);
    let (api, _stop) = client(&sp, spapi::CLIENT_SECRET).await;
    sp.expire_next_page_token();
    let counts = api.summaries().await.unwrap();
    assert_eq!(counts.len(), 6, "nothing lost, nothing twice");
    assert_eq!(api.stats().restarts, 1);
    let log = sp.log();
    // Page 1, then the refused page 2, then pages 1 to 3 again.
    assert_eq!((log.expired_page_tokens, log.pages), (1, 4), "{log:?}");
}

#[tokio::test]
async fn refused_credentials_are_an_auth_error_and_no_summary_is_asked() {
    let sp = SpApi::new(MARKETPLACE, fixtures(), 2);
    let (api, _stop) = client(&sp, "a-rotated-secret").await;
    let err = api.summaries().await.unwrap_err();
    assert!(matches!(&err, AmazonError::Auth(m) if m.contains("invalid_grant")), "{err}");
    assert_eq!(sp.log().summary_requests, 0);
}
