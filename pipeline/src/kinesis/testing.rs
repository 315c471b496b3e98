//! Test support: fresh, uniquely named streams on a local Kinesis emulator (kinesis-local).

use std::time::Duration;

use aws_sdk_kinesis::Client;

/// The emulator endpoint: `KINESIS_ENDPOINT`, default `http://127.0.0.1:4568`.
pub fn endpoint() -> String {
    std::env::var("KINESIS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4568".into())
}

/// A new stream `{tag}{nanos}` with `shards` shards, active. (Tests leave their streams; the
/// project's script starts kinesis-local with a high shard limit, `KINESIS_SHARD_LIMIT`.) Returns `None` when no emulator
/// answers — except under CI (`CI=true`), where a missing emulator is a failure, not a skip.
pub async fn emulator_stream(tag: &str, shards: i32) -> Option<(Client, String)> {
    let endpoint = endpoint();
    let client = super::client(Some(&endpoint), true).await;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("{tag}{nanos:x}");
    if let Err(e) = client.create_stream().stream_name(&name).shard_count(shards).send().await {
        // The emulator answered and refused: a failure, never a skip.
        assert!(
            e.as_service_error().is_none(),
            "CreateStream {name}: {}",
            aws_sdk_kinesis::error::DisplayErrorContext(&e)
        );
        let e = aws_sdk_kinesis::error::DisplayErrorContext(e);
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Kinesis emulator at {endpoint} is required under CI: {e}");
        }
        eprintln!("skipping: no Kinesis emulator at {endpoint} ({e}); run scripts/services.sh start");
        return None;
    }
    wait_active(&client, &name).await;
    Some((client, name))
}

/// Waits until the stream is `ACTIVE` (after create, split, merge); panics after 60 s.
pub async fn wait_active(client: &Client, name: &str) {
    if let Err(e) = super::admin::wait_active(client, name, Duration::from_secs(60)).await {
        panic!("{e}");
    }
}
