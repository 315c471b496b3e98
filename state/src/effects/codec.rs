//! The outbox's binary encoding of effects (docs/state.md, "Outbox rows").
//!
//! An outbox row is a sequence of effects. Each is written as [`BINARY`], the payload's length as
//! a LEB128 varint, then the payload: a kind byte and the fields in declaration order — integers
//! as (zigzag) varints, strings as a varint length and UTF-8 bytes, a decimal as one byte (scale,
//! sign in the top bit) and its unsigned mantissa as a varint, a currency as its three letters.
//! A typical effect takes ~70 bytes against ~190 as JSON, and decodes without a parser.
//!
//! Rows written before this encoding hold one JSON object per line; [`RowEffects`] reads both
//! (a JSON line starts with `{`, never with [`BINARY`]), so stored rows stay readable and no
//! migration is needed.

use rust_decimal::Decimal;

use super::{
    CountDiscrepancy, Effect, EffectKind, JournalKind, JournalLine, LowStockAlert, OversellAlert, OversellCause,
    ReorderRequest,
};
use crate::money::Currency;

/// The first byte of a binary effect in an outbox row.
pub const BINARY: u8 = 0x01;

const OVERSELL: u8 = 1;
const LOW_STOCK: u8 = 2;
const REORDER: u8 = 3;
const JOURNAL: u8 = 4;
const DISCREPANCY: u8 = 5;

/// The payload's first byte for a kind.
fn kind_code(kind: EffectKind) -> u8 {
    match kind {
        EffectKind::Oversell => OVERSELL,
        EffectKind::LowStock => LOW_STOCK,
        EffectKind::Reorder => REORDER,
        EffectKind::Journal => JOURNAL,
        EffectKind::Discrepancy => DISCREPANCY,
    }
}

/// The kind a payload's first byte names ([`kind_code`] backwards).
fn code_kind(code: u8) -> Option<EffectKind> {
    match code {
        OVERSELL => Some(EffectKind::Oversell),
        LOW_STOCK => Some(EffectKind::LowStock),
        REORDER => Some(EffectKind::Reorder),
        JOURNAL => Some(EffectKind::Journal),
        DISCREPANCY => Some(EffectKind::Discrepancy),
        _ => None,
    }
}

/// `v` as a LEB128 varint: the bytes and how many of them are used.
fn varint(mut v: u128) -> ([u8; 19], usize) {
    let mut buf = [0u8; 19];
    let mut n = 0;
    while v >= 0x80 {
        buf[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    buf[n] = v as u8;
    (buf, n + 1)
}

/// Appends `effect` to an outbox row: [`BINARY`], the payload length, the payload.
pub fn push_effect(row: &mut Vec<u8>, effect: &Effect) {
    row.push(BINARY);
    // One byte is reserved for the length (payloads under 128 bytes, nearly all); a longer
    // payload moves right by the extra bytes its length takes.
    let at = row.len();
    row.push(0);
    encode_payload(row, effect);
    // The first byte of the length goes in the reserved slot, the rest (if any) after it.
    let (len, n) = varint((row.len() - at - 1) as u128);
    row[at] = len[0];
    if n > 1 {
        row.splice(at + 1..at + 1, len[1..n].iter().copied());
    }
}

/// Kind, id and SKU (every effect has them, in that order), then the kind's own fields.
fn encode_payload(out: &mut Vec<u8>, effect: &Effect) {
    out.push(kind_code(effect.kind()));
    put_str(out, effect.id());
    put_str(out, effect.sku());
    match effect {
        Effect::Oversell(a) => {
            match &a.order_id {
                Some(order) => {
                    out.push(1);
                    put_str(out, order);
                }
                None => out.push(0),
            }
            put_i64(out, a.requested);
            put_i64(out, a.available_before);
            put_i64(out, a.shortfall);
            out.push(match a.cause {
                OversellCause::Order => 0,
                OversellCause::Count => 1,
            });
            put_i64(out, a.ts);
        }
        Effect::LowStock(a) => {
            for v in [a.available, a.reorder_point, a.ts] {
                put_i64(out, v);
            }
        }
        Effect::Reorder(r) => {
            put_i64(out, r.available);
            put_i64(out, r.reorder_point);
            put_u64(out, r.units_ordered_24h);
            put_i64(out, r.ts);
        }
        Effect::Journal(j) => {
            out.push(match j.kind {
                JournalKind::Cogs => 0,
                JournalKind::InventoryReceipt => 1,
            });
            put_i64(out, j.qty);
            put_decimal(out, j.unit_cost);
            put_decimal(out, j.amount);
            out.extend_from_slice(j.currency.as_str().as_bytes());
            put_i64(out, j.ts);
        }
        Effect::Discrepancy(d) => {
            for v in [d.expected, d.counted, d.discrepancy, d.ts] {
                put_i64(out, v);
            }
        }
    }
}

/// Decodes one payload (what follows the length); the whole slice must be used.
pub fn decode_payload(bytes: &[u8]) -> Result<Effect, String> {
    let mut r = Reader(bytes);
    let (kind, id, sku) = (r.byte()?, r.string()?, r.string()?);
    let effect = match kind {
        OVERSELL => Effect::Oversell(OversellAlert {
            alert_id: id,
            sku,
            order_id: match r.byte()? {
                0 => None,
                1 => Some(r.string()?),
                other => return Err(format!("order_id flag {other}")),
            },
            requested: r.i64()?,
            available_before: r.i64()?,
            shortfall: r.i64()?,
            cause: match r.byte()? {
                0 => OversellCause::Order,
                1 => OversellCause::Count,
                other => return Err(format!("oversell cause {other}")),
            },
            ts: r.i64()?,
        }),
        LOW_STOCK => Effect::LowStock(LowStockAlert {
            alert_id: id,
            sku,
            available: r.i64()?,
            reorder_point: r.i64()?,
            ts: r.i64()?,
        }),
        REORDER => Effect::Reorder(ReorderRequest {
            request_id: id,
            sku,
            available: r.i64()?,
            reorder_point: r.i64()?,
            units_ordered_24h: r.u64()?,
            ts: r.i64()?,
        }),
        JOURNAL => Effect::Journal(JournalLine {
            entry_id: id,
            sku,
            kind: match r.byte()? {
                0 => JournalKind::Cogs,
                1 => JournalKind::InventoryReceipt,
                other => return Err(format!("journal kind {other}")),
            },
            qty: r.i64()?,
            unit_cost: r.decimal()?,
            amount: r.decimal()?,
            currency: {
                let code = r.take(3)?;
                std::str::from_utf8(code).ok().and_then(Currency::parse).ok_or_else(|| format!("currency {code:?}"))?
            },
            ts: r.i64()?,
        }),
        DISCREPANCY => Effect::Discrepancy(CountDiscrepancy {
            id,
            sku,
            expected: r.i64()?,
            counted: r.i64()?,
            discrepancy: r.i64()?,
            ts: r.i64()?,
        }),
        other => return Err(format!("unknown effect kind {other}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the effect", r.0.len()));
    }
    Ok(effect)
}

/// One effect of a row, not yet decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEffect<'a> {
    /// A binary payload (after [`BINARY`] and the length).
    Binary(&'a [u8]),
    /// A JSON line (rows written before the binary encoding).
    Json(&'a [u8]),
}

impl RawEffect<'_> {
    /// Its kind, read without decoding it (`None` for a JSON line: decode it to know).
    pub fn kind(self) -> Option<EffectKind> {
        match self {
            RawEffect::Binary([code, ..]) => code_kind(*code),
            RawEffect::Binary([]) | RawEffect::Json(_) => None,
        }
    }

    /// Decodes it.
    pub fn decode(self) -> Result<Effect, String> {
        match self {
            RawEffect::Binary(payload) => decode_payload(payload),
            RawEffect::Json(line) => Effect::from_json(line).map_err(|e| e.to_string()),
        }
    }
}

/// The effects of an outbox row, in order (binary or JSON lines, or a mix).
#[derive(Debug, Clone)]
pub struct RowEffects<'a>(&'a [u8]);

impl<'a> RowEffects<'a> {
    /// Iterates over `row`.
    pub fn new(row: &'a [u8]) -> Self {
        RowEffects(row)
    }
}

impl<'a> Iterator for RowEffects<'a> {
    type Item = Result<RawEffect<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.0.iter().position(|&b| b != b'\n')?;
        let rest = &self.0[start..];
        if rest[0] == BINARY {
            let mut r = Reader(&rest[1..]);
            let framed = r.u64().and_then(|len| {
                let len = usize::try_from(len).map_err(|_| format!("effect of {len} bytes"))?;
                r.take(len)
            });
            match framed {
                Ok(payload) => {
                    self.0 = r.0;
                    Some(Ok(RawEffect::Binary(payload)))
                }
                Err(e) => {
                    self.0 = &[];
                    Some(Err(format!("a truncated effect: {e}")))
                }
            }
        } else {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            self.0 = &rest[end..];
            Some(Ok(RawEffect::Json(&rest[..end])))
        }
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    put_u128(out, u128::from(v));
}

fn put_u128(out: &mut Vec<u8>, v: u128) {
    let (bytes, n) = varint(v);
    out.extend_from_slice(&bytes[..n]);
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Scale (0–28) and sign in one byte, then the mantissa's magnitude (≤ 96 bits). The sign is
/// kept apart so that a negative zero comes back as it went in.
fn put_decimal(out: &mut Vec<u8>, d: Decimal) {
    out.push(d.scale() as u8 | if d.is_sign_negative() { 0x80 } else { 0 });
    put_u128(out, d.mantissa().unsigned_abs());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{n} bytes wanted, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u128(&mut self, bits: u32) -> Result<u128, String> {
        let mut v: u128 = 0;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            let chunk = u128::from(b & 0x7f);
            if shift >= bits || (shift > 0 && chunk >> (bits - shift) != 0) {
                return Err(format!("a varint wider than {bits} bits"));
            }
            v |= chunk << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.u128(64).map(|v| v as u64)
    }

    fn i64(&mut self) -> Result<i64, String> {
        let z = self.u64()?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let len = usize::try_from(len).map_err(|_| format!("a string of {len} bytes"))?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
    }

    fn decimal(&mut self) -> Result<Decimal, String> {
        let flags = self.byte()?;
        let magnitude = self.u128(96)?;
        let mut d = Decimal::try_from_i128_with_scale(magnitude as i128, u32::from(flags & 0x7f))
            .map_err(|e| format!("a decimal: {e}"))?;
        d.set_sign_negative(flags & 0x80 != 0);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::effects::tests::one_of_each;

    fn row_of(effects: &[Effect]) -> Vec<u8> {
        let mut row = Vec::new();
        for e in effects {
            push_effect(&mut row, e);
        }
        row
    }

    fn read(row: &[u8]) -> Result<Vec<Effect>, String> {
        RowEffects::new(row).map(|raw| raw?.decode()).collect()
    }

    #[test]
    fn every_kind_round_trips_and_is_smaller_than_json() {
        let effects = one_of_each();
        let row = row_of(&effects);
        assert_eq!(read(&row).unwrap(), effects);
        let kinds: Vec<Option<EffectKind>> = RowEffects::new(&row).map(|raw| raw.unwrap().kind()).collect();
        assert_eq!(kinds, effects.iter().map(|e| Some(e.kind())).collect::<Vec<_>>(), "kinds read without decoding");
        assert!(RawEffect::Binary(&[]).kind().is_none() && RawEffect::Binary(&[9]).kind().is_none());
        let json: usize = effects.iter().map(|e| serde_json::to_vec(e).unwrap().len() + 1).sum();
        assert!(row.len() * 2 < json, "binary {} bytes, JSON {json}", row.len());
    }

    #[test]
    fn rows_written_as_json_lines_still_read_and_mix_with_binary_effects() {
        let effects = one_of_each();
        let mut row = Vec::new();
        for e in &effects[..2] {
            row.extend_from_slice(&serde_json::to_vec(e).unwrap());
            row.push(b'\n');
        }
        for e in &effects[2..] {
            push_effect(&mut row, e);
        }
        assert_eq!(read(&row).unwrap(), effects);
        assert_eq!(RowEffects::new(&row).count(), effects.len());
    }

    #[test]
    fn a_long_payload_takes_a_longer_length_prefix() {
        // Two- and three-byte lengths.
        for (len, prefix) in [(300, 2), (20_000, 3)] {
            let mut long = one_of_each().remove(1);
            if let Effect::LowStock(a) = &mut long {
                a.sku = "S".repeat(len);
            }
            let row = row_of(&[long.clone(), one_of_each().remove(0)]);
            let mut want_len = Vec::new();
            put_u64(&mut want_len, (row.len() - 1 - prefix - row_of(&one_of_each()[..1]).len()) as u64);
            assert_eq!(want_len.len(), prefix);
            assert_eq!(&row[1..1 + prefix], &want_len[..]);
            assert_eq!(read(&row).unwrap(), vec![long, one_of_each().remove(0)]);
        }
    }

    #[test]
    fn damaged_rows_are_errors_not_other_effects() {
        let row = row_of(&one_of_each());
        // Every cut inside the first effect is either a truncated frame or a payload that does
        // not decode to exactly one effect.
        let first_len = usize::from(row[1]) + 2;
        for cut in 1..first_len {
            assert!(read(&row[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = row.clone();
        bad_kind[2] = 9;
        assert!(read(&bad_kind).unwrap_err().contains("unknown effect kind 9"));
        let mut overlong = vec![BINARY];
        overlong.extend_from_slice(&[0xff; 11]);
        assert!(read(&overlong).is_err());
    }

    fn decimal() -> impl Strategy<Value = Decimal> {
        (any::<i128>(), 0u32..=28, any::<bool>()).prop_map(|(m, scale, neg)| {
            let mut d = Decimal::from_i128_with_scale(m % (1i128 << 96), scale);
            d.set_sign_negative(neg);
            d
        })
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![".{0,12}", ".{100,200}"]
    }

    fn effect() -> impl Strategy<Value = Effect> {
        prop_oneof![
            (text(), text(), proptest::option::of(text()), any::<[i64; 4]>(), any::<bool>()).prop_map(
                |(alert_id, sku, order_id, n, count)| Effect::Oversell(OversellAlert {
                    alert_id,
                    sku,
                    order_id,
                    requested: n[0],
                    available_before: n[1],
                    shortfall: n[2],
                    cause: if count { OversellCause::Count } else { OversellCause::Order },
                    ts: n[3],
                })
            ),
            (text(), text(), any::<[i64; 3]>()).prop_map(|(alert_id, sku, n)| Effect::LowStock(LowStockAlert {
                alert_id,
                sku,
                available: n[0],
                reorder_point: n[1],
                ts: n[2],
            })),
            (text(), text(), any::<[i64; 3]>(), any::<u64>()).prop_map(|(request_id, sku, n, units)| {
                Effect::Reorder(ReorderRequest {
                    request_id,
                    sku,
                    available: n[0],
                    reorder_point: n[1],
                    units_ordered_24h: units,
                    ts: n[2],
                })
            }),
            (text(), text(), any::<bool>(), any::<[i64; 2]>(), decimal(), decimal(), "[A-Z]{3}").prop_map(
                |(entry_id, sku, receipt, n, unit_cost, amount, currency)| Effect::Journal(JournalLine {
                    entry_id,
                    sku,
                    kind: if receipt { JournalKind::InventoryReceipt } else { JournalKind::Cogs },
                    qty: n[0],
                    unit_cost,
                    amount,
                    currency: Currency::parse(&currency).unwrap_or(Currency::USD),
                    ts: n[1],
                })
            ),
            (text(), text(), any::<[i64; 4]>()).prop_map(|(id, sku, n)| Effect::Discrepancy(CountDiscrepancy {
                id,
                sku,
                expected: n[0],
                counted: n[1],
                discrepancy: n[2],
                ts: n[3],
            })),
        ]
    }

    proptest! {
        #[test]
        fn any_effects_round_trip(effects in proptest::collection::vec(effect(), 0..20)) {
            let row = row_of(&effects);
            let back = read(&row).unwrap();
            prop_assert_eq!(&back, &effects);
            // Decimals keep their scale and sign (what the JSON string shows downstream).
            for (a, b) in back.iter().zip(&effects) {
                prop_assert_eq!(serde_json::to_string(a).unwrap(), serde_json::to_string(b).unwrap());
            }
        }
    }
}
