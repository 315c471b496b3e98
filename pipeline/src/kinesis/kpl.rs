//! Records aggregated by the Kinesis Producer Library: magic `F3 89 9A C2`, a protobuf
//! `AggregatedRecord`, and the MD5 of that protobuf. Each user record inside gets the Kinesis
//! record's sequence number and its index as sub-sequence number (as the KCL numbers them), so a
//! checkpoint can fall between the user records of one Kinesis record.
//!
//! ```text
//! message AggregatedRecord { repeated string partition_key_table = 1;
//!                            repeated string explicit_hash_key_table = 2;
//!                            repeated Record records = 3; }
//! message Record { required uint64 partition_key_index = 1; optional uint64 explicit_hash_key_index = 2;
//!                  required bytes data = 3; repeated Tag tags = 4; }
//! ```
//! A record with the magic but a wrong digest or bad protobuf is not aggregated (the KCL's rule):
//! it is handed on whole, and the engine dead-letters it if it is not an event.

use md5::{Digest, Md5};

/// The four bytes every aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_BYTES: usize = 16;

/// Calls `each(sub, data)` for the user records of `record`; returns false (calling nothing)
/// when the record is not a valid aggregate.
pub fn for_each_user_record<'a>(record: &'a [u8], mut each: impl FnMut(u64, &'a [u8])) -> bool {
    let Some(body) = record.strip_prefix(&MAGIC) else { return false };
    if body.len() < DIGEST_BYTES {
        return false;
    }
    let (proto, digest) = body.split_at(body.len() - DIGEST_BYTES);
    if Md5::digest(proto).as_slice() != digest {
        return false;
    }
    let mut datas = Vec::new();
    let ok = parse_fields(proto, |field, value| {
        if let (3, Value::Bytes(inner)) = (field, value) {
            let mut data = None;
            let ok = parse_fields(inner, |f, v| {
                if let (3, Value::Bytes(d)) = (f, v) {
                    data = Some(d);
                }
                true
            });
            match data {
                Some(d) if ok => datas.push(d),
                _ => return false,
            }
        }
        true
    });
    if !ok {
        return false;
    }
    for (i, d) in datas.into_iter().enumerate() {
        each(i as u64, d);
    }
    true
}

/// Builds an aggregated record (what the KPL writes), for producers and tests.
pub fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut keys: Vec<&str> = Vec::new();
    let mut proto = Vec::new();
    for (key, _) in records {
        if !keys.contains(key) {
            keys.push(key);
        }
    }
    for key in &keys {
        put_bytes(&mut proto, 1, key.as_bytes());
    }
    for (key, data) in records {
        let mut inner = Vec::with_capacity(data.len() + 8);
        let index = keys.iter().position(|k| k == key).unwrap_or(0) as u64;
        put_varint(&mut inner, 1 << 3);
        put_varint(&mut inner, index);
        put_bytes(&mut inner, 3, data);
        put_bytes(&mut proto, 3, &inner);
    }
    let mut out = Vec::with_capacity(4 + proto.len() + DIGEST_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&proto);
    out.extend_from_slice(&Md5::digest(&proto));
    out
}

enum Value<'a> {
    Varint,
    Bytes(&'a [u8]),
}

/// Walks the fields of a protobuf message; false on malformed input or when `f` says stop.
fn parse_fields<'a>(mut buf: &'a [u8], mut f: impl FnMut(u64, Value<'a>) -> bool) -> bool {
    while !buf.is_empty() {
        let Some(tag) = varint(&mut buf) else { return false };
        let value = match tag & 7 {
            0 => {
                if varint(&mut buf).is_none() {
                    return false;
                }
                Value::Varint
            }
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else { return false };
                if len > buf.len() {
                    return false;
                }
                let (v, rest) = buf.split_at(len);
                buf = rest;
                Value::Bytes(v)
            }
            1 if buf.len() >= 8 => {
                buf = &buf[8..];
                Value::Varint
            }
            5 if buf.len() >= 4 => {
                buf = &buf[4..];
                Value::Varint
            }
            _ => return false,
        };
        if !f(tag >> 3, value) {
            return false;
        }
    }
    true
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(v);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_records(record: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
        let mut v = Vec::new();
        for_each_user_record(record, |sub, d| v.push((sub, d.to_vec()))).then_some(v)
    }

    #[test]
    fn aggregates_round_trip_with_sub_sequence_numbers() {
        let big = vec![b'x'; 300]; // a multi-byte length varint
        let recs: [(&str, &[u8]); 3] = [("A", b"{\"a\":1}"), ("B", &big), ("A", b"")];
        let agg = aggregate(&recs);
        assert_eq!(agg[..4], MAGIC);
        let got = user_records(&agg).unwrap();
        assert_eq!(got.len(), 3);
        for (i, (sub, data)) in got.iter().enumerate() {
            assert_eq!(*sub, i as u64);
            assert_eq!(data.as_slice(), recs[i].1);
        }
    }

    #[test]
    fn damaged_or_plain_records_are_not_aggregates() {
        assert!(user_records(b"{\"id\":\"x\"}").is_none());
        let mut agg = aggregate(&[("A", b"data")]);
        let n = agg.len();
        agg[n - 1] ^= 1; // digest mismatch
        assert!(user_records(&agg).is_none());
        let mut agg = aggregate(&[("A", b"data")]);
        agg[5] = 0x7F; // the key's length now runs past the end; digest fixed up
        let proto_end = agg.len() - DIGEST_BYTES;
        let digest = Md5::digest(&agg[4..proto_end]);
        agg[proto_end..].copy_from_slice(&digest);
        assert!(user_records(&agg).is_none());
        assert!(user_records(&MAGIC).is_none());
    }
}
