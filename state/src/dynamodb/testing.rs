//! Test support: a `DynamoStore` on fresh, uniquely named tables of a local emulator.

use super::DynamoStore;

/// A store on new tables (prefix `{tag}{nanos}`) at `DYNAMODB_ENDPOINT` (default
/// `http://127.0.0.1:5001`). Returns `None` when no emulator answers — except under CI
/// (`CI=true`), where a missing emulator is a failure, not a skip.
pub async fn emulator_store(tag: &str) -> Option<DynamoStore> {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5001".into());
    let client = DynamoStore::emulator_client(&endpoint).await;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let store = DynamoStore::new(client, &format!("{tag}{nanos:x}"));
    match store.setup().await {
        Ok(_) => Some(store),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("DynamoDB emulator at {endpoint} is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no DynamoDB emulator at {endpoint} ({e}); run scripts/services.sh start");
            None
        }
    }
}
