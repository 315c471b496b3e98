//! Money: ISO 4217 currency codes, minor units and rounding (SPEC §2 "Accounting").
//!
//! Amounts are `rust_decimal::Decimal`, never floats. A booked line is rounded to its currency's
//! minor unit with banker's rounding (half to even); the moving average cost is rounded half to
//! even to [`AVG_COST_DP`] places (SPEC v2). Both are computed **exactly** first — in 256-bit
//! integers, since a 28-digit decimal product or quotient would round once before the rounding
//! that counts (`3 × 8.041666…667` is `24.1250…001`, not the tie `24.125`) — so every
//! implementation of the rules books the same cents.
//!
//! Limits (documented in docs/state.md): an average cost is below [`AVG_COST_LIMIT`] and a booked
//! amount below [`AMOUNT_LIMIT`]; a record that would exceed them cannot be applied and is
//! dead-lettered. Within them every value fits a `Decimal` exactly.

#![deny(clippy::arithmetic_side_effects)]

use std::fmt;

use ethnum::I256;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 alphabetic currency code, stored inline as three ASCII upper-case letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    /// US dollar, the default currency of the demo stream.
    pub const USD: Currency = Currency(*b"USD");

    /// Parses a three-letter upper-case code; `None` for anything else.
    pub fn parse(code: &str) -> Option<Currency> {
        let b = code.as_bytes();
        (b.len() == 3 && b.iter().all(u8::is_ascii_uppercase)).then(|| Currency([b[0], b[1], b[2]]))
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        // The constructor only admits ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }

    /// Digits after the decimal point in this currency's minor unit (ISO 4217 table; 2 if unlisted).
    pub fn minor_units(&self) -> u32 {
        match &self.0 {
            b"BIF" | b"CLP" | b"DJF" | b"GNF" | b"ISK" | b"JPY" | b"KMF" | b"KRW" | b"PYG" | b"RWF" | b"UGX"
            | b"UYI" | b"VND" | b"VUV" | b"XAF" | b"XOF" | b"XPF" => 0,
            b"BHD" | b"IQD" | b"JOD" | b"KWD" | b"LYD" | b"OMR" | b"TND" => 3,
            b"CLF" | b"UYW" => 4,
            _ => 2,
        }
    }

    /// Rounds `amount` to this currency's minor unit, half to even.
    pub fn round(&self, amount: Decimal) -> Decimal {
        amount.round_dp_with_strategy(self.minor_units(), RoundingStrategy::MidpointNearestEven)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::parse(&s).ok_or_else(|| serde::de::Error::custom("expected an ISO 4217 code"))
    }
}

/// Decimal places the moving average cost is rounded to (half to even).
pub const AVG_COST_DP: u32 = 10;
/// An average cost must be below 10¹⁸ (in any currency).
pub const AVG_COST_LIMIT: i128 = 1_000_000_000_000_000_000;
/// A booked amount (a journal line, cumulative COGS) must be below 10²⁰.
pub const AMOUNT_LIMIT: i128 = 100_000_000_000_000_000_000;

fn pow10(n: u32) -> Option<I256> {
    I256::from(10i128).checked_pow(n)
}

/// `num / den` rounded half to even (`den > 0`).
fn div_half_even(num: I256, den: I256) -> Option<I256> {
    let q = num.checked_div(den)?;
    let r = num.checked_rem(den)?;
    let twice = r.checked_abs()?.checked_mul(I256::from(2i128))?;
    let away = match twice.cmp(&den) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => q.checked_rem(I256::from(2i128))? != I256::ZERO,
        std::cmp::Ordering::Less => false,
    };
    if !away {
        return Some(q);
    }
    if num.is_negative() { q.checked_sub(I256::ONE) } else { q.checked_add(I256::ONE) }
}

/// `value / 10^scale` as a decimal when `|value| < limit · 10^scale`.
fn bounded(value: I256, scale: u32, limit: i128) -> Option<Decimal> {
    let max = I256::from(limit).checked_mul(pow10(scale)?)?;
    if value.checked_abs()? >= max {
        return None;
    }
    Decimal::try_from_i128_with_scale(i128::try_from(value).ok()?, scale).ok()
}

fn parts(d: Decimal) -> (I256, u32) {
    (I256::from(d.mantissa()), d.scale())
}

/// `qty × unit`, computed exactly and rounded half to even to the currency's minor unit; `None`
/// when the result is not below [`AMOUNT_LIMIT`].
pub fn line_amount(unit: Decimal, qty: i64, currency: Currency) -> Option<Decimal> {
    let (m, s) = parts(unit);
    let exact = m.checked_mul(I256::from(i128::from(qty)))?;
    let minor = currency.minor_units();
    let rounded = if s <= minor {
        exact.checked_mul(pow10(minor.checked_sub(s)?)?)?
    } else {
        div_half_even(exact, pow10(s.checked_sub(minor)?)?)?
    };
    bounded(rounded, minor, AMOUNT_LIMIT)
}

/// The moving average after receiving `qty` units at `cost` onto `on_hand ≥ 0` units at `avg`:
/// `(on_hand·avg + qty·cost) / (on_hand + qty)`, computed exactly, rounded half to even to
/// [`AVG_COST_DP`] places and normalised (`4.10` is `4.1`); `None` when it is not below
/// [`AVG_COST_LIMIT`] or the quantities are not positive.
pub fn average_cost(on_hand: i64, avg: Decimal, qty: i64, cost: Decimal) -> Option<Decimal> {
    if on_hand < 0 || qty < 1 {
        return None;
    }
    let (ma, sa) = parts(avg);
    let (mc, sc) = parts(cost);
    let s = sa.max(sc);
    let units = I256::from(i128::from(on_hand)).checked_add(I256::from(i128::from(qty)))?;
    let held = I256::from(i128::from(on_hand)).checked_mul(ma)?.checked_mul(pow10(s.checked_sub(sa)?)?)?;
    let added = I256::from(i128::from(qty)).checked_mul(mc)?.checked_mul(pow10(s.checked_sub(sc)?)?)?;
    let num = held.checked_add(added)?;
    // value = num / (units · 10^s); at AVG_COST_DP places: num · 10^dp / (units · 10^s).
    let rounded = if s >= AVG_COST_DP {
        div_half_even(num, units.checked_mul(pow10(s.checked_sub(AVG_COST_DP)?)?)?)?
    } else {
        div_half_even(num.checked_mul(pow10(AVG_COST_DP.checked_sub(s)?)?)?, units)?
    };
    bounded(rounded, AVG_COST_DP, AVG_COST_LIMIT).map(|d| d.normalize())
}

/// `unit` rounded half to even to [`AVG_COST_DP`] places and normalised; `None` when not below
/// [`AVG_COST_LIMIT`] (the average cost of a first receipt).
pub fn round_cost(unit: Decimal) -> Option<Decimal> {
    average_cost(0, Decimal::ZERO, 1, unit)
}

/// `a + b`, capped at [`AMOUNT_LIMIT`] (cumulative COGS saturates there).
pub fn add_capped(a: Decimal, b: Decimal) -> Decimal {
    let cap = Decimal::from_i128_with_scale(AMOUNT_LIMIT, 0);
    a.checked_add(b).map_or(cap, |s| s.min(cap))
}

/// An amount in a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// The amount, unrounded.
    pub amount: Decimal,
    /// Its currency.
    pub currency: Currency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn parses_only_three_upper_case_letters() {
        assert_eq!(Currency::parse("EUR").map(|c| c.to_string()), Some("EUR".into()));
        for bad in ["eur", "EU", "EURO", "E1R", ""] {
            assert!(Currency::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn exact_ties_round_half_to_even() {
        let d = |s| Decimal::from_str(s).unwrap();
        // (2·8 + 1·8.125)/3 = 8.041666…: SPEC v2 keeps 8.0416666667, and 3 × that is
        // 24.1250000001, 24.13 — the same in every implementation, whatever its precision.
        assert_eq!(line_amount(d("8.0416666666666666666666666667"), 3, Currency::USD), Some(d("24.13")));
        assert_eq!(line_amount(d("8.0416666667"), 3, Currency::USD), Some(d("24.13")));
        assert_eq!(line_amount(d("8.0416666665"), 3, Currency::USD), Some(d("24.12")));
        // The exact product 24.125 is a tie: half to even gives 24.12, not 24.13.
        assert_eq!(line_amount(d("4.8250"), 5, Currency::USD), Some(d("24.12")));
        assert_eq!(line_amount(d("4.8350"), 5, Currency::USD), Some(d("24.18")));
        // Averages: exact, then 10 places half to even, normalised.
        assert_eq!(average_cost(2, d("1"), 1, d("2")), Some(d("1.3333333333")));
        assert_eq!(average_cost(0, d("0"), 3, d("4.10")).map(|a| a.to_string()), Some("4.1".into()));
        // 0.00000000005 is a tie at 10 places: to even (0), and 0.00000000015 up to 0.0000000002.
        assert_eq!(round_cost(d("0.00000000005")), Some(d("0")));
        assert_eq!(round_cost(d("0.00000000015")), Some(d("0.0000000002")));
        // 28-digit operands stay exact.
        let third = d("0.3333333333333333333333333333");
        assert_eq!(average_cost(1_000_000_000, third, 1_000_000_000, third), Some(d("0.3333333333")));
        // Limits: an average of 10^18 or an amount of 10^20 is refused.
        assert_eq!(round_cost(d("999999999999999999.99999999994")), Some(d("999999999999999999.9999999999")));
        assert_eq!(round_cost(d("1000000000000000000")), None);
        assert_eq!(line_amount(d("100000000000"), 1_000_000_000, Currency::USD), None);
        assert_eq!(line_amount(d("99999999999.99"), 1_000_000_000, Currency::USD), Some(d("99999999999990000000")));
        assert_eq!(average_cost(-1, d("1"), 1, d("1")), None);
        let cap = Decimal::from_i128_with_scale(AMOUNT_LIMIT, 0);
        assert_eq!(add_capped(cap, d("0.01")), cap);
        assert_eq!(add_capped(d("1.10"), d("2.25")), d("3.35"));
    }

    #[test]
    fn rounds_half_to_even_at_the_minor_unit() {
        let d = |s| Decimal::from_str(s).unwrap();
        assert_eq!(Currency::USD.round(d("2.345")), d("2.34"));
        assert_eq!(Currency::USD.round(d("2.355")), d("2.36"));
        assert_eq!(Currency::parse("JPY").unwrap().round(d("2.5")), d("2"));
        assert_eq!(Currency::parse("KWD").unwrap().round(d("1.23450")), d("1.234"));
    }
}
