//! A single-pass reader for the canonical event as the ingest writes it: one flat JSON object of
//! strings without escapes and integers. It reads what serde would read, in one pass over the
//! bytes and without serde's per-field machinery, and **declines** (returns `None`) whatever it
//! is not certain about — an escape, a float, a nested value, a duplicate field, a missing
//! required field, bytes after the object — so serde reads those and reports their errors. It
//! never accepts a document serde rejects or reads a field differently:
//! `tests::the_scan_reads_what_serde_reads` compares the two on generated documents, broken ones
//! included.

use std::borrow::Cow;

use super::{EventKind, RawEvent, Stamp};

/// The event of `bytes`, or `None` to leave the document to serde.
pub(super) fn scan(bytes: &[u8]) -> Option<RawEvent<'_>> {
    // Validated once, whole: serde rejects invalid UTF-8 anywhere in a document, and one pass
    // over ~150 bytes (ASCII a word at a time) costs less than a validation per field.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut s = Scanner { t: text, i: 0 };
    let mut seen = 0u16;
    let (mut id, mut kind, mut sku, mut ts) = (None, None, None, None);
    let mut ev = RawEvent {
        id: Cow::Borrowed(""),
        kind: EventKind::OrderPlaced,
        sku: Cow::Borrowed(""),
        ts: 0,
        qty: None,
        shipped_total: None,
        order_id: None,
        delta: None,
        on_hand: None,
        unit_price: None,
        unit_cost: None,
        currency: None,
        ingested_at: None,
    };
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek()? == b'}' {
        return None; // no fields: serde names the missing one
    }
    loop {
        let key = s.string()?.as_bytes();
        s.ws();
        s.eat(b':')?;
        s.ws();
        let bit = match key {
            b"id" => {
                id = Some(s.string()?);
                1
            }
            b"type" => {
                kind = Some(kind_of(s.string()?.as_bytes())?);
                2
            }
            b"sku" => {
                sku = Some(s.string()?);
                4
            }
            b"ts" => {
                ts = Some(s.int()?);
                8
            }
            b"qty" => {
                ev.qty = s.opt(Scanner::int)?;
                16
            }
            b"shipped_total" => {
                ev.shipped_total = s.opt(Scanner::int)?;
                32
            }
            b"order_id" => {
                ev.order_id = s.opt(Scanner::string)?.map(Cow::Borrowed);
                64
            }
            b"delta" => {
                ev.delta = s.opt(Scanner::int)?;
                128
            }
            b"on_hand" => {
                ev.on_hand = s.opt(Scanner::int)?;
                256
            }
            b"unit_price" => {
                ev.unit_price = s.opt(Scanner::string)?.map(Cow::Borrowed);
                512
            }
            b"unit_cost" => {
                ev.unit_cost = s.opt(Scanner::string)?.map(Cow::Borrowed);
                1024
            }
            b"currency" => {
                ev.currency = s.opt(Scanner::string)?.map(Cow::Borrowed);
                2048
            }
            b"ingested_at" => {
                ev.ingested_at = s.opt(Scanner::int)?.map(|v| Stamp(Some(v)));
                4096
            }
            _ => {
                s.scalar()?;
                0
            }
        };
        if seen & bit != 0 {
            return None; // a duplicate field: serde's error
        }
        seen |= bit;
        s.ws();
        match s.next()? {
            b',' => s.ws(),
            b'}' => break,
            _ => return None,
        }
    }
    s.ws();
    if s.i != bytes.len() {
        return None;
    }
    ev.id = Cow::Borrowed(id?);
    ev.kind = kind?;
    ev.sku = Cow::Borrowed(sku?);
    ev.ts = ts?;
    Some(ev)
}

fn kind_of(name: &[u8]) -> Option<EventKind> {
    Some(match name {
        b"order_placed" => EventKind::OrderPlaced,
        b"order_cancelled" => EventKind::OrderCancelled,
        b"order_shipped" => EventKind::OrderShipped,
        b"stock_received" => EventKind::StockReceived,
        b"stock_adjusted" => EventKind::StockAdjusted,
        b"stock_counted" => EventKind::StockCounted,
        _ => return None,
    })
}

struct Scanner<'a> {
    /// The document, valid UTF-8.
    t: &'a str,
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.t.as_bytes().get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// A string of valid UTF-8 without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => {}
            }
        }
        // `i` is past the closing quote. Both ends sit next to an ASCII quote, so on character
        // boundaries of the validated text (`get` checks that, and the range, without rescanning).
        self.t.get(start..self.i.saturating_sub(1))
    }

    /// An integer in `i64`: `0|-?[1-9][0-9]*` not followed by a fraction or an exponent (serde
    /// reads `-0` as a float).
    fn int(&mut self) -> Option<i64> {
        let negative = self.peek()? == b'-';
        if negative {
            self.i += 1;
        }
        let first = self.next()?;
        if !first.is_ascii_digit() || (negative && first == b'0') {
            return None;
        }
        let mut v = i64::from(first - b'0');
        if first != b'0' {
            while let Some(c @ b'0'..=b'9') = self.peek() {
                self.i += 1;
                v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
            }
        }
        if let Some(b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
            return None;
        }
        Some(if negative { -v } else { v })
    }

    /// Consumes `word` if the input continues with it.
    fn literal(&mut self, word: &[u8]) -> bool {
        let found = self.t.as_bytes().get(self.i..).is_some_and(|rest| rest.starts_with(word));
        if found {
            self.i += word.len();
        }
        found
    }

    /// `null`, or what `read` reads.
    fn opt<T>(&mut self, read: fn(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.literal(b"null") {
            return Some(None);
        }
        read(self).map(Some)
    }

    /// The value of a field the event does not have: a string, an integer, `true`, `false` or
    /// `null` (anything else is left to serde).
    fn scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'-' | b'0'..=b'9' => self.int().map(drop),
            _ => [&b"true"[..], b"false", b"null"].into_iter().any(|w| self.literal(w)).then_some(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Event, RawEvent, decode, decode_serde};
    use super::scan;
    use proptest::prelude::*;
    use std::borrow::Cow;

    /// Field names: the event's, one it does not have, and near misses.
    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "id",
            "type",
            "sku",
            "ts",
            "qty",
            "shipped_total",
            "order_id",
            "delta",
            "on_hand",
            "unit_price",
            "unit_cost",
            "currency",
            "ingested_at",
            "source",
            "kind",
            "Id",
            "t\\u0073",
            "é",
        ])
        .prop_map(str::to_owned)
    }

    /// Values as JSON text: what the ingest writes, and what it never does.
    fn value() -> impl Strategy<Value = String> {
        let fixed = prop::sample::select(vec![
            "\"order_placed\"",
            "\"order_cancelled\"",
            "\"order_shipped\"",
            "\"stock_received\"",
            "\"stock_adjusted\"",
            "\"stock_counted\"",
            "\"bogus\"",
            "\"SKU-1\"",
            "\"A-1\"",
            "\"19.99\"",
            "\"USD\"",
            "\"usd\"",
            "\"\"",
            "\"é\"",
            "\"a\\\"b\"",
            "\"a\\u0041\"",
            "\"tab\there\"",
            "\"\u{1}\"",
            "1795737600000",
            "0",
            "-0",
            "01",
            "-",
            "3",
            "-5",
            "1.5",
            "1e3",
            "2E2",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "null",
            "nul",
            "true",
            "false",
            "{}",
            "{\"a\":1}",
            "[1,2]",
            "[]",
        ])
        .prop_map(str::to_owned);
        prop_oneof![4 => fixed, 1 => any::<i64>().prop_map(|v| v.to_string())]
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n", "\t ", "\r\n"])
    }

    /// A value that suits the field most of the time, any value otherwise.
    fn value_for(key: String) -> impl Strategy<Value = (String, String)> {
        let suitable: BoxedStrategy<String> = match key.as_str() {
            "qty" | "shipped_total" | "on_hand" | "delta" | "ingested_at" => {
                prop_oneof![(-3i64..2_000_000_000).prop_map(|v| v.to_string()), Just("null".to_owned())].boxed()
            }
            "ts" => prop_oneof![
                9 => (946_684_800_000i64..4_102_444_800_001).prop_map(|v| v.to_string()),
                1 => Just("null".to_owned())
            ]
            .boxed(),
            "unit_price" | "unit_cost" => {
                prop::sample::select(vec!["\"19.99\"", "\"0.5\"", "\"-1\"", "\"1.\"", "null"])
                    .prop_map(str::to_owned)
                    .boxed()
            }
            "currency" => prop::sample::select(vec!["\"USD\"", "\"JPY\"", "\"EURO\""]).prop_map(str::to_owned).boxed(),
            "order_id" => prop::sample::select(vec!["\"A-1\"", "\"\"", "null"]).prop_map(str::to_owned).boxed(),
            _ => value().boxed(),
        };
        (Just(key), prop_oneof![7 => suitable, 1 => value()])
    }

    /// The fields an event of a type has, one of them sometimes dropped.
    fn fields_of() -> impl Strategy<Value = Vec<(String, String)>> {
        let kinds = vec![
            ("order_placed", &["order_id", "qty", "unit_price", "currency"][..]),
            ("order_cancelled", &["order_id", "qty"][..]),
            ("order_shipped", &["order_id", "shipped_total"][..]),
            ("stock_received", &["qty", "unit_cost", "currency"][..]),
            ("stock_adjusted", &["delta"][..]),
            ("stock_counted", &["on_hand", "ingested_at"][..]),
            ("bogus", &["qty"][..]),
        ];
        (prop::sample::select(kinds), any::<prop::sample::Index>(), prop::bool::weighted(0.2)).prop_flat_map(
            |((kind, keys), drop, dropping)| {
                let mut keys: Vec<&str> = keys.to_vec();
                if dropping {
                    keys.remove(drop.index(keys.len()));
                }
                let own: Vec<_> = keys.into_iter().map(|k| value_for(k.to_owned()).boxed()).collect();
                let head = vec![
                    Just(("id".to_owned(), "\"e-1\"".to_owned())).boxed(),
                    Just(("type".to_owned(), format!("\"{kind}\""))).boxed(),
                    Just(("sku".to_owned(), "\"S-1\"".to_owned())).boxed(),
                    value_for("ts".to_owned()).boxed(),
                ];
                (head, own).prop_map(|(mut head, own)| {
                    head.extend(own);
                    head
                })
            },
        )
    }

    /// A document: an event's fields, a few others, in any order and with varying whitespace,
    /// then sometimes one byte changed, inserted or removed.
    pub(super) fn document() -> impl Strategy<Value = Vec<u8>> {
        let extra = prop::collection::vec(key().prop_flat_map(value_for), 0..2);
        let fields = (fields_of(), extra)
            .prop_map(|(mut f, extra)| {
                f.extend(extra);
                f
            })
            .prop_shuffle();
        (
            fields,
            prop::collection::vec((ws(), ws()), 16),
            ws(),
            prop::option::weighted(0.25, (any::<prop::sample::Index>(), any::<u8>(), 0..3u8)),
        )
            .prop_map(|(fields, spaces, w, mutation)| {
                let parts: Vec<String> = fields
                    .iter()
                    .zip(spaces.iter().cycle())
                    .map(|((k, v), (a, b))| format!("{a}\"{k}\"{b}:{a}{v}{b}"))
                    .collect();
                let mut doc = format!("{w}{{{}}}{w}", parts.join(",")).into_bytes();
                if let Some((at, byte, how)) = mutation {
                    let i = at.index(doc.len() + 1);
                    match how {
                        0 if i < doc.len() => doc[i] = byte,
                        1 => doc.insert(i, byte),
                        _ if i < doc.len() => {
                            doc.remove(i);
                        }
                        _ => {}
                    }
                }
                doc
            })
    }

    fn borrowed(e: &Event<'_>) -> bool {
        matches!((&e.id, &e.sku), (Cow::Borrowed(_), Cow::Borrowed(_)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Whatever the scan accepts, serde reads the same way: the same event or the same error.
        #[test]
        fn the_scan_reads_what_serde_reads(doc in document()) {
            prop_assert_eq!(decode(&doc), decode_serde(&doc));
            if let Some(raw) = scan(&doc) {
                // Field by field, before validation could hide a difference behind an error.
                let by_serde = serde_json::from_slice::<RawEvent<'_>>(&doc);
                prop_assert_eq!(by_serde.as_ref().ok(), Some(&raw), "{:?}", by_serde.as_ref().err());
                prop_assert!([&raw.id, &raw.sku].iter().all(|s| matches!(s, Cow::Borrowed(_))));
            }
        }
    }

    #[test]
    fn what_the_ingest_writes_is_scanned() {
        let docs = [
            r#"{"id":"cnt:open:0","type":"stock_counted","sku":"SKU-00000","ts":1795737600000,"on_hand":16085,"source":"fc-report"}"#,
            r#"{"id":"o-1","type":"order_placed","sku":"SKU-1","ts":1795737600000,"order_id":"A-1","qty":2,"unit_price":"19.99","currency":"USD","ingested_at":1795737600123}"#,
            r#"{ "id": "s-1", "type": "order_shipped", "sku": "SKU-1", "ts": 1795737600000, "order_id": "A-1", "shipped_total": 2, "qty": null }"#,
            r#"{"id":"r-1","type":"stock_received","sku":"ÉTÉ-1","ts":1795737600000,"qty":5,"unit_cost":"4.10","currency":"EUR","po":"PO-9","urgent":true,"note":null}"#,
            r#"{"id":"a-1","type":"stock_adjusted","sku":"SKU-1","ts":1795737600000,"delta":-3}"#,
        ];
        for doc in docs {
            assert!(scan(doc.as_bytes()).is_some(), "{doc}");
            let e = decode(doc.as_bytes()).unwrap();
            assert_eq!(Ok(e.clone()), decode_serde(doc.as_bytes()));
            assert!(borrowed(&e), "{doc}");
        }
        let declined = [
            r#"{"id":"a\"b","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1}"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1.0}"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1,"delta":2}"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1,"x":{}}"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","delta":1}"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1} x"#,
            r#"["a","stock_adjusted","S",1795737600000]"#,
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":-0}"#,
        ];
        for doc in declined {
            assert!(scan(doc.as_bytes()).is_none(), "{doc}");
        }
    }
}
