//! The Kinesis source against kinesis-local: polling and enhanced fan-out read the same records
//! in order, KPL aggregates are split with sub-sequence numbers and a checkpoint inside one
//! resumes exactly, and a shard's end names its children (split and merge).

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use stockflow_pipeline::kinesis::testing::{emulator_stream, wait_active};
use stockflow_pipeline::kinesis::{
    Fault, KinesisConfig, KinesisProducer, KinesisSource, ProducerConfig, ReadMode, kpl,
};
use stockflow_pipeline::{OutRecord, ReadStatus, RecordBatch, ShardReader, StreamProducer, StreamSource};
use stockflow_state::Position;

/// Puts 5 plain records, one KPL aggregate of 3, then 2 plain ones, on one key.
async fn put_mixed(client: &Client, stream: &str) -> Vec<String> {
    let plain_cfg = ProducerConfig { aggregate: false, ..ProducerConfig::default() };
    let producer = KinesisProducer::with_config(client.clone(), stream, plain_cfg);
    let plain: Vec<String> = (0..7).map(|i| format!("plain-{i}")).collect();
    let recs: Vec<OutRecord<'_>> = plain[..5].iter().map(|p| OutRecord { key: "K", payload: p.as_bytes() }).collect();
    producer.put(&recs).await.unwrap();
    let agg = kpl::aggregate(&[("K", b"agg-0"), ("K", b"agg-1"), ("K", b"agg-2")]);
    let entry = PutRecordsRequestEntry::builder().partition_key("K").data(Blob::new(agg)).build().unwrap();
    client.put_records().stream_name(stream).records(entry).send().await.unwrap();
    let recs: Vec<OutRecord<'_>> = plain[5..].iter().map(|p| OutRecord { key: "K", payload: p.as_bytes() }).collect();
    producer.put(&recs).await.unwrap();
    let mut expected: Vec<String> = plain[..5].to_vec();
    expected.extend(["agg-0", "agg-1", "agg-2"].map(String::from));
    expected.extend(plain[5..].iter().cloned());
    expected
}

/// Reads until `n` records or the shard's end (a 60 s bound guards against a hang).
async fn read<R: ShardReader>(reader: &mut R, n: usize) -> (Vec<(Position, String)>, ReadStatus) {
    let mut out = Vec::new();
    let mut batch = RecordBatch::new();
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let status = reader.next_batch(&mut batch, 4).await.unwrap();
            for (k, payload) in batch.iter() {
                out.push((batch.position(k), String::from_utf8(payload.to_vec()).unwrap()));
            }
            if status == ReadStatus::End || out.len() >= n {
                return status;
            }
        }
    })
    .await
    .expect("the reader delivered the records within 60 s");
    (out, status)
}

async fn reads_in_order_and_resumes_inside_an_aggregate(mode: ReadMode) {
    let Some((client, stream)) = emulator_stream("sf-kin-", 1).await else { return };
    let expected = put_mixed(&client, &stream).await;
    let mut cfg = KinesisConfig::new(&stream);
    cfg.mode = mode;
    cfg.idle_poll = Duration::from_millis(200);
    let source = KinesisSource::new(client.clone(), cfg).await.unwrap();
    let shards = source.shards().await.unwrap();
    assert_eq!(shards.len(), 1);
    let mut reader = source.open(&shards[0], None).await.unwrap();
    let (got, status) = read(&mut reader, expected.len()).await;
    assert_eq!(status, ReadStatus::Open);
    assert_eq!(got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), expected);
    for w in got.windows(2) {
        assert!(w[0].0 < w[1].0, "positions increase: {} then {}", w[0].0, w[1].0);
    }
    let agg: Vec<&Position> = got[5..8].iter().map(|(p, _)| p).collect();
    assert!(agg.iter().all(|p| p.sequence == agg[0].sequence), "one Kinesis record");
    assert_eq!(agg.iter().map(|p| p.sub).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(reader.lag().millis.is_some(), "MillisBehindLatest is reported");
    drop(reader);

    // A checkpoint between the aggregate's user records resumes with the next one.
    let mut reader = source.open(&shards[0], Some(agg[1])).await.unwrap();
    let (rest, _) = read(&mut reader, 3).await;
    assert_eq!(rest.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(), ["agg-2", "plain-5", "plain-6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_reads_in_order_and_resumes_inside_an_aggregate() {
    reads_in_order_and_resumes_inside_an_aggregate(ReadMode::Polling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reads_in_order_and_resumes_inside_an_aggregate() {
    reads_in_order_and_resumes_inside_an_aggregate(ReadMode::FanOut { consumer_name: "sf-test".into() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_ends_naming_its_children_after_split_and_merge() {
    let Some((client, stream)) = emulator_stream("sf-res-", 1).await else { return };
    let producer = KinesisProducer::new(client.clone(), &stream);
    producer.put(&[OutRecord { key: "A", payload: b"before-split" }]).await.unwrap();
    let mut cfg = KinesisConfig::new(&stream);
    cfg.idle_poll = Duration::from_millis(200);
    let source = KinesisSource::new(client.clone(), cfg).await.unwrap();
    let parent = source.shards().await.unwrap().remove(0);
    let mid = (u128::MAX / 2).to_string();
    client.split_shard().stream_name(&stream).shard_to_split(&parent).new_starting_hash_key(&mid).send().await.unwrap();
    wait_active(&client, &stream).await;

    let mut reader = source.open(&parent, None).await.unwrap();
    let (got, status) = read(&mut reader, usize::MAX).await;
    assert_eq!(status, ReadStatus::End);
    assert_eq!(got.len(), 1);
    let children = reader.children();
    assert_eq!(children.len(), 2, "{children:?}");
    assert!(children.iter().all(|c| c.parents == [parent.clone()]));
    let ranges: Vec<_> = children.iter().map(|c| c.hash_range.unwrap()).collect();
    assert_eq!(ranges.iter().map(|r| r.start).min(), Some(0));
    assert_eq!(ranges.iter().map(|r| r.end).max(), Some(u128::MAX));
    let infos = source.shard_infos().await.unwrap();
    assert_eq!(infos.len(), 3);

    // Merge the children back: each ends naming the merged shard, whose parents are both.
    let (low, high) = if ranges[0].start == 0 { (0, 1) } else { (1, 0) };
    client
        .merge_shards()
        .stream_name(&stream)
        .shard_to_merge(&children[low].id)
        .adjacent_shard_to_merge(&children[high].id)
        .send()
        .await
        .unwrap();
    wait_active(&client, &stream).await;
    let mut reader = source.open(&children[high].id, None).await.unwrap();
    let (_, status) = read(&mut reader, usize::MAX).await;
    assert_eq!(status, ReadStatus::End);
    let merged = reader.children();
    assert_eq!(merged.len(), 1);
    let mut parents = merged[0].parents.clone();
    parents.sort();
    let mut expected = vec![children[0].id.clone(), children[1].id.clone()];
    expected.sort();
    assert_eq!(parents, expected);
}

/// Reads a one-shard stream from its start: (position, payload) per user record.
async fn read_all(client: &Client, stream: &str, n: usize) -> Vec<(Position, String)> {
    let mut cfg = KinesisConfig::new(stream);
    cfg.idle_poll = Duration::from_millis(200);
    let source = KinesisSource::new(client.clone(), cfg).await.unwrap();
    let shard = source.shards().await.unwrap().remove(0);
    let mut reader = source.open(&shard, None).await.unwrap();
    read(&mut reader, n).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_keeps_each_skus_order_under_partial_failure_and_throttling() {
    let Some((client, stream)) = emulator_stream("sf-put-", 1).await else { return };
    let cfg = ProducerConfig { aggregate: false, base_backoff: Duration::from_millis(5), ..ProducerConfig::default() };
    let producer = KinesisProducer::with_config(client.clone(), &stream, cfg);
    let recs = [("A", "A1"), ("B", "B1"), ("A", "A2"), ("C", "C1"), ("A", "A3"), ("B", "B2")];
    // The first call refuses A1 (its first entry) and takes B1 and C1; the second is throttled.
    producer.faults().push(Fault::Refuse(vec![0]));
    producer.faults().push(Fault::Throttle);
    let out: Vec<OutRecord<'_>> = recs.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
    producer.put(&out).await.unwrap();
    let got: Vec<String> = read_all(&client, &stream, recs.len()).await.into_iter().map(|(_, p)| p).collect();
    let at = |p: &str| got.iter().position(|g| g == p).unwrap_or_else(|| panic!("{p} missing from {got:?}"));
    assert!(at("B1") < at("A1"), "the partial failure happened: B1 landed first ({got:?})");
    for key in ["A", "B", "C"] {
        let order: Vec<&String> = got.iter().filter(|p| p.starts_with(key)).collect();
        let sent: Vec<&str> = recs.iter().filter(|(k, _)| *k == key).map(|(_, p)| *p).collect();
        assert_eq!(order, sent, "order of {key}");
    }
    assert_eq!(got.len(), recs.len(), "each record exactly once");

    // Out of retries: an error, never a silent success.
    let cfg = ProducerConfig { attempts: 2, base_backoff: Duration::from_millis(1), ..ProducerConfig::default() };
    let stubborn = KinesisProducer::with_config(client.clone(), &stream, cfg);
    for _ in 0..3 {
        stubborn.faults().push(Fault::Throttle);
    }
    let err = stubborn.put(&out[..1]).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_packs_a_skus_records_into_one_aggregate_per_call() {
    let Some((client, stream)) = emulator_stream("sf-agg-", 1).await else { return };
    let producer = KinesisProducer::new(client.clone(), &stream);
    let payloads: Vec<(String, String)> = (0..60).map(|i| (format!("K{}", i % 3), format!("event-{i}"))).collect();
    producer.faults().push(Fault::Refuse(vec![1])); // K1's aggregate is refused once
    let out: Vec<OutRecord<'_>> = payloads.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
    producer.put(&out).await.unwrap();
    let got = read_all(&client, &stream, payloads.len()).await;
    let mut sequences: Vec<&str> = got.iter().map(|(p, _)| p.sequence.as_str()).collect();
    sequences.dedup();
    assert_eq!(sequences.len(), 3, "three Kinesis records, one per SKU");
    for key in ["K0", "K1", "K2"] {
        let sent: Vec<&String> = payloads.iter().filter(|(k, _)| k == key).map(|(_, p)| p).collect();
        let read: Vec<&String> = got.iter().filter(|(_, p)| sent.contains(&p)).map(|(_, p)| p).collect();
        assert_eq!(read, sent);
    }
}
