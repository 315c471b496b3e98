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

/// The integers the exact arithmetic runs in: `i128` first (the common case: it is several times
/// faster), `I256` when an intermediate value does not fit. Both compute the same integers with
/// the same truncating division, so a result computed in `i128` is the one `I256` would give;
/// any `None` in `i128` (an overflow, or a legitimate refusal) is computed again in `I256`, which
/// decides.
trait Exact: Copy + Ord {
    const ZERO: Self;
    const ONE: Self;
    fn of(v: i128) -> Self;
    fn narrow(self) -> Option<i128>;
    fn add(self, o: Self) -> Option<Self>;
    fn sub(self, o: Self) -> Option<Self>;
    fn mul(self, o: Self) -> Option<Self>;
    fn div(self, o: Self) -> Option<Self>;
    fn rem(self, o: Self) -> Option<Self>;
    fn abs(self) -> Option<Self>;
    fn negative(self) -> bool;
    fn pow10(n: u32) -> Option<Self>;
}

macro_rules! exact {
    ($t:ty, $zero:expr, $one:expr, $narrow:expr) => {
        impl Exact for $t {
            const ZERO: Self = $zero;
            const ONE: Self = $one;
            fn of(v: i128) -> Self {
                <$t>::from(v)
            }
            fn narrow(self) -> Option<i128> {
                $narrow(self)
            }
            fn add(self, o: Self) -> Option<Self> {
                self.checked_add(o)
            }
            fn sub(self, o: Self) -> Option<Self> {
                self.checked_sub(o)
            }
            fn mul(self, o: Self) -> Option<Self> {
                self.checked_mul(o)
            }
            fn div(self, o: Self) -> Option<Self> {
                self.checked_div(o)
            }
            fn rem(self, o: Self) -> Option<Self> {
                self.checked_rem(o)
            }
            fn abs(self) -> Option<Self> {
                self.checked_abs()
            }
            fn negative(self) -> bool {
                self.is_negative()
            }
            fn pow10(n: u32) -> Option<Self> {
                <$t>::from(10i128).checked_pow(n)
            }
        }
    };
}

exact!(i128, 0, 1, Some);
exact!(I256, I256::ZERO, I256::ONE, |v: I256| i128::try_from(v).ok());

/// `num / den` rounded half to even (`den > 0`).
fn div_half_even<T: Exact>(num: T, den: T) -> Option<T> {
    let q = num.div(den)?;
    let r = num.rem(den)?;
    let two = T::of(2);
    let twice = r.abs()?.mul(two)?;
    let away = match twice.cmp(&den) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => q.rem(two)? != T::ZERO,
        std::cmp::Ordering::Less => false,
    };
    if !away {
        return Some(q);
    }
    if num.negative() { q.sub(T::ONE) } else { q.add(T::ONE) }
}

/// `value / 10^scale` as a decimal when `|value| < limit · 10^scale`.
fn bounded<T: Exact>(value: T, scale: u32, limit: i128) -> Option<Decimal> {
    let max = T::of(limit).mul(T::pow10(scale)?)?;
    if value.abs()? >= max {
        return None;
    }
    Decimal::try_from_i128_with_scale(value.narrow()?, scale).ok()
}

/// `qty × unit`, computed exactly and rounded half to even to the currency's minor unit; `None`
/// when the result is not below [`AMOUNT_LIMIT`].
pub fn line_amount(unit: Decimal, qty: i64, currency: Currency) -> Option<Decimal> {
    line_amount_in::<i128>(unit, qty, currency).or_else(|| line_amount_in::<I256>(unit, qty, currency))
}

fn line_amount_in<T: Exact>(unit: Decimal, qty: i64, currency: Currency) -> Option<Decimal> {
    let (m, s) = (T::of(unit.mantissa()), unit.scale());
    let exact = m.mul(T::of(i128::from(qty)))?;
    let minor = currency.minor_units();
    let rounded = if s <= minor {
        exact.mul(T::pow10(minor.checked_sub(s)?)?)?
    } else {
        div_half_even(exact, T::pow10(s.checked_sub(minor)?)?)?
    };
    bounded(rounded, minor, AMOUNT_LIMIT)
}

/// The moving average after receiving `qty` units at `cost` onto `on_hand ≥ 0` units at `avg`:
/// `(on_hand·avg + qty·cost) / (on_hand + qty)`, computed exactly, rounded half to even to
/// [`AVG_COST_DP`] places and normalised (`4.10` is `4.1`); `None` when it is not below
/// [`AVG_COST_LIMIT`] or the quantities are not positive.
pub fn average_cost(on_hand: i64, avg: Decimal, qty: i64, cost: Decimal) -> Option<Decimal> {
    average_cost_in::<i128>(on_hand, avg, qty, cost).or_else(|| average_cost_in::<I256>(on_hand, avg, qty, cost))
}

fn average_cost_in<T: Exact>(on_hand: i64, avg: Decimal, qty: i64, cost: Decimal) -> Option<Decimal> {
    if on_hand < 0 || qty < 1 {
        return None;
    }
    let (ma, sa) = (T::of(avg.mantissa()), avg.scale());
    let (mc, sc) = (T::of(cost.mantissa()), cost.scale());
    let s = sa.max(sc);
    let (on_hand, qty) = (T::of(i128::from(on_hand)), T::of(i128::from(qty)));
    let units = on_hand.add(qty)?;
    let held = on_hand.mul(ma)?.mul(T::pow10(s.checked_sub(sa)?)?)?;
    let added = qty.mul(mc)?.mul(T::pow10(s.checked_sub(sc)?)?)?;
    let num = held.add(added)?;
    // value = num / (units · 10^s); at AVG_COST_DP places: num · 10^dp / (units · 10^s).
    let rounded = if s >= AVG_COST_DP {
        div_half_even(num, units.mul(T::pow10(s.checked_sub(AVG_COST_DP)?)?)?)?
    } else {
        div_half_even(num.mul(T::pow10(AVG_COST_DP.checked_sub(s)?)?)?, units)?
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

    /// A mantissa of up to 96 bits at any scale (what a `Decimal` holds): small ones often, so
    /// the `i128` path is taken, and 28-digit ones that overflow it.
    fn decimal() -> impl proptest::strategy::Strategy<Value = Decimal> {
        use proptest::prelude::*;
        let mantissa = prop_oneof![-1_000_000i128..1_000_000, -(1i128 << 96) + 1..(1i128 << 96)];
        (mantissa, 0u32..=28).prop_map(|(m, s)| Decimal::from_i128_with_scale(m, s))
    }

    fn quantity() -> impl proptest::strategy::Strategy<Value = i64> {
        use proptest::prelude::*;
        prop_oneof![-1_000i64..100_000, any::<i64>()]
    }

    proptest::proptest! {
        /// The `i128` arithmetic gives what the 256-bit arithmetic gives, overflow or not.
        #[test]
        fn narrow_and_wide_arithmetic_agree(
            unit in decimal(), avg in decimal(), qty in quantity(), on_hand in quantity(),
            currency in proptest::sample::select(vec!["USD", "JPY", "KWD", "CLF"]),
        ) {
            let currency = Currency::parse(currency).unwrap();
            proptest::prop_assert_eq!(line_amount(unit, qty, currency), line_amount_in::<I256>(unit, qty, currency));
            proptest::prop_assert_eq!(
                average_cost(on_hand, avg, qty, unit),
                average_cost_in::<I256>(on_hand, avg, qty, unit)
            );
        }
    }

    #[test]
    fn everyday_amounts_are_computed_in_i128() {
        let d = |s| Decimal::from_str(s).unwrap();
        assert_eq!(line_amount_in::<i128>(d("19.995"), 3, Currency::USD), Some(d("59.98")));
        assert_eq!(average_cost_in::<i128>(120, d("4.1"), 30, d("4.35")), Some(d("4.15")));
        // 28 digits times a large quantity needs 256 bits: the narrow path declines, the wide decides.
        let third = d("0.3333333333333333333333333333");
        let many = 1_000_000_000_000;
        assert_eq!(average_cost_in::<i128>(many, third, many, third), None);
        assert_eq!(average_cost(many, third, many, third), Some(d("0.3333333333")));
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
