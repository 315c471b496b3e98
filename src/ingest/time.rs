//! RFC 3339 timestamps (`2026-11-27T08:15:02.284Z`, `…+01:00`) to Unix epoch milliseconds.
//!
//! The form is checked here, strictly (RFC 3339's profile of ISO 8601: seconds required, the offset
//! `Z` or `±HH:MM`, any number of fraction digits); the calendar — month lengths, leap years, days to
//! the epoch — is `jiff`'s, the workspace's one date-and-time crate.

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (a space for `T` and a lower-case `z` too)
/// into Unix epoch milliseconds; `None` for anything else, including out-of-range fields.
pub fn parse_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = &b[r];
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let d = |k: usize| i64::from(digits[k] - b'0');
            let (h, m) = (d(0) * 10 + d(1), d(2) * 10 + d(3));
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' { h * 60 + m } else { -(h * 60 + m) }
        }
        _ => return None,
    };
    let civil = jiff::civil::DateTime::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
        i8::try_from(hour).ok()?,
        i8::try_from(minute).ok()?,
        // A leap second counts as the last second of its minute.
        i8::try_from(second.min(59)).ok()?,
        0,
    )
    .ok()?;
    let offset = jiff::tz::Offset::from_seconds(i32::try_from(offset_minutes * 60).ok()?).ok()?;
    let at = offset.to_timestamp(civil).ok()?;
    Some(at.as_millisecond() + millis)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn parses_utc_offsets_and_fractions() {
        assert_eq!(parse_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_millis("2020-07-13T19:42:04.284Z"), Some(1_594_669_324_284));
        assert_eq!(parse_millis("2020-07-13T19:42:04.2849999Z"), Some(1_594_669_324_284));
        assert_eq!(parse_millis("2020-07-13T19:42:04.2Z"), Some(1_594_669_324_200));
        assert_eq!(parse_millis("2020-07-13T21:42:04.284+02:00"), Some(1_594_669_324_284));
        assert_eq!(parse_millis("2020-07-13T14:12:04.284-05:30"), Some(1_594_669_324_284));
        assert_eq!(parse_millis("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        assert_eq!(parse_millis("1969-12-31T23:59:59Z"), Some(-1_000));
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in [
            "",
            "2020-07-13",
            "2020-07-13T19:42:04",
            "2020-13-13T19:42:04Z",
            "2023-02-29T00:00:00Z",
            "2020-07-13T24:00:00Z",
            "2020-07-13T19:42:04.Z",
            "2020-07-13T19:42:04+0200",
            "2020-07-13T19:42:04Zjunk",
            "２020-07-13T19:42:04Z",
        ] {
            assert_eq!(parse_millis(bad), None, "{bad}");
        }
    }
}
