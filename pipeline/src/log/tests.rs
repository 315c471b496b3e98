//! The log's durability, segments, retention and reading.

use super::*;
use crate::source::{ReadStatus, RecordBatch, ShardReader};

fn rec<'a>(key: &'a str, payload: &'a str) -> OutRecord<'a> {
    OutRecord { key, payload: payload.as_bytes() }
}

async fn read_all(log: &EmbeddedLog, shard: &str, after: Option<&Position>) -> Vec<(u64, String)> {
    let mut r = log.open(shard, after).await.unwrap();
    let mut batch = RecordBatch::new();
    let mut out = Vec::new();
    while r.next_batch(&mut batch, 3).await.unwrap() == ReadStatus::Open {
        out.extend(batch.iter().map(|(o, p)| (o, String::from_utf8(p.to_vec()).unwrap())));
    }
    out
}

#[tokio::test]
async fn keeps_per_key_order_and_resumes_after_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 2).unwrap();
    log.append(&[rec("a", "a1"), rec("b", "b1"), rec("a", "a2")]).unwrap();
    log.append(&[rec("a", "a3")]).unwrap();
    log.seal();
    let shard = shard_name(log.shard_of("a"));
    let all = read_all(&log, &shard, None).await;
    let a: Vec<_> = all.iter().filter(|(_, p)| p.starts_with('a')).map(|(_, p)| p.as_str()).collect();
    assert_eq!(a, ["a1", "a2", "a3"]);
    let first = Position::offset(all[0].0);
    let rest = read_all(&log, &shard, Some(&first)).await;
    assert_eq!(rest, all[1..].to_vec());
}

#[tokio::test]
async fn a_torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        log.append(&[rec("k", "one"), rec("k", "two")]).unwrap();
    }
    let path = dir.path().join("shard-0000").join(format!("{:020}.seg", 0));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20, "zeros ahead of the data");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    // A frame cut short right after the data (magic 8 + two frames of 8 + 3 bytes).
    f.write_all_at(&[9, 0, 0, 0, 1, 2, 3, 4, b'x'], 30).unwrap();
    drop(f);
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    log.append(&[rec("k", "three")]).unwrap();
    log.seal();
    let got: Vec<_> = read_all(&log, "shard-0000", None).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["one", "two", "three"]);
    assert!(EmbeddedLog::open(dir.path(), 3).is_err(), "shard count is fixed");
}

#[tokio::test]
async fn a_version_1_single_file_log_becomes_the_first_segment() {
    let dir = tempfile::tempdir().unwrap();
    let first;
    {
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        log.append(&[rec("k", "one")]).unwrap();
        log.seal();
        first = read_all(&log, "shard-0000", None).await[0].0;
    }
    // What version 1 wrote: one file per shard, its magic, the frames, no preallocated zeros.
    let seg = dir.path().join("shard-0000").join(format!("{:020}.seg", 0));
    let legacy = dir.path().join("shard-0000.log");
    std::fs::rename(&seg, &legacy).unwrap();
    let f = OpenOptions::new().write(true).open(&legacy).unwrap();
    f.write_all_at(MAGIC_V1, 0).unwrap();
    f.set_len(8 + 8 + 3).unwrap();
    drop(f);
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    assert!(!legacy.exists() && seg.exists(), "moved into the shard's directory");
    log.append(&[rec("k", "two")]).unwrap();
    log.seal();
    let got: Vec<_> = read_all(&log, "shard-0000", None).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["one", "two"]);
    let after_first: Vec<_> =
        read_all(&log, "shard-0000", Some(&Position::offset(first))).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(after_first, ["two"], "an old checkpoint (a byte offset) still means the same record");
    let mut magic = [0u8; 8];
    File::open(&seg).unwrap().read_exact_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, MAGIC, "upgraded, so an older binary refuses the zeros");
}

fn small(fsync: bool) -> LogOptions {
    LogOptions { fsync, segment_bytes: 64 << 10 }
}

#[tokio::test]
async fn segments_roll_positions_keep_growing_and_resume_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with_options(dir.path(), 1, small(false)).unwrap();
    let payload = "x".repeat(1000);
    for i in 0..300 {
        let p = format!("{i:04}{payload}");
        log.append(&[rec("k", &p)]).unwrap();
    }
    log.seal();
    assert!(log.segment_counts()[0] >= 4, "{:?}", log.segment_counts());
    let all = read_all(&log, "shard-0000", None).await;
    assert_eq!(all.len(), 300);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "positions grow");
    assert!(all.iter().enumerate().all(|(i, (_, p))| p.starts_with(&format!("{i:04}"))), "in order");
    // Resume after any record, including the last of a segment.
    for i in [0, 63, 64, 65, 150, 298] {
        let rest = read_all(&log, "shard-0000", Some(&Position::offset(all[i].0))).await;
        assert_eq!(rest, all[i + 1..].to_vec(), "after record {i}");
    }
    let rest = read_all(&log, "shard-0000", Some(&Position::offset(all[299].0))).await;
    assert!(rest.is_empty());
    // Closed segments hold their data only.
    let disk: u64 =
        std::fs::read_dir(dir.path().join("shard-0000")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(disk < log.total_bytes() + (1 << 20) + 1, "{disk} on disk for {}", log.total_bytes());
}

#[tokio::test]
async fn trim_deletes_only_closed_consumed_old_enough_segments_and_a_reopen_reads_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let payload = "y".repeat(1000);
    let all;
    {
        let log = EmbeddedLog::open_with_options(dir.path(), 1, small(true)).unwrap();
        for i in 0..300 {
            let p = format!("{i:04}{payload}");
            log.append(&[rec("k", &p)]).unwrap();
        }
        log.seal();
        all = read_all(&log, "shard-0000", None).await;
        let segments = log.segment_counts()[0];
        let checkpoint = Position::offset(all[200].0);
        assert_eq!(
            log.trim("shard-0000", &checkpoint, Duration::from_secs(3600)).unwrap(),
            Trimmed::default(),
            "too young"
        );
        let t = log.trim("shard-0000", &checkpoint, Duration::ZERO).unwrap();
        assert!(t.segments >= 2 && t.bytes > 0, "{t:?}");
        assert_eq!(log.segment_counts()[0], segments - t.segments as usize);
        // The checkpoint's record is still readable, and everything after it.
        let rest = read_all(&log, "shard-0000", Some(&checkpoint)).await;
        assert_eq!(rest, all[201..].to_vec());
        // Everything consumed: only the active segment stays.
        log.trim("shard-0000", &Position::offset(all[299].0), Duration::ZERO).unwrap();
        assert_eq!(log.segment_counts()[0], 1);
        // A position inside a deleted segment is refused with a clear error.
        let err = log.open("shard-0000", Some(&Position::offset(all[10].0))).await.unwrap_err();
        assert!(err.to_string().contains("deleted segment"), "{err}");
    }
    let log = EmbeddedLog::open_with_options(dir.path(), 1, small(true)).unwrap();
    log.append(&[rec("k", "after")]).unwrap();
    log.seal();
    let got = read_all(&log, "shard-0000", Some(&Position::offset(all[299].0))).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].0 > all[299].0 && got[0].1 == "after");
    // From the beginning = from the oldest kept segment.
    let from_start = read_all(&log, "shard-0000", None).await;
    assert_eq!(from_start.last().unwrap().1, "after");
    assert!(from_start.len() < 300);
}

#[tokio::test]
async fn a_reader_follows_the_log_into_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with_options(dir.path(), 1, small(false)).unwrap();
    let mut r = log.open("shard-0000", None).await.unwrap();
    let mut batch = RecordBatch::new();
    let payload = "z".repeat(1000);
    let mut seen = 0;
    for i in 0..200 {
        let p = format!("{i:04}{payload}");
        log.append(&[rec("k", &p)]).unwrap();
        r.next_batch(&mut batch, 10).await.unwrap();
        for (_, p) in batch.iter() {
            assert!(p.starts_with(format!("{seen:04}").as_bytes()));
            seen += 1;
        }
    }
    while seen < 200 {
        r.next_batch(&mut batch, 10).await.unwrap();
        seen += batch.len();
    }
    assert_eq!(seen, 200);
    assert!(log.segment_counts()[0] > 2);
}

#[tokio::test]
async fn a_reader_waits_for_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    let mut r = log.open("shard-0000", None).await.unwrap();
    let mut batch = RecordBatch::new();
    assert_eq!(r.next_batch(&mut batch, 10).await.unwrap(), ReadStatus::Open);
    assert!(batch.is_empty());
    log.append(&[rec("k", "x")]).unwrap();
    r.next_batch(&mut batch, 10).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(r.lag().bytes, Some(0));
}
