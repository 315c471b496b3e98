//! Money: ISO 4217 currency codes, minor units and rounding (SPEC §2 "Accounting").
//!
//! Amounts are `rust_decimal::Decimal`, never floats. A booked line is rounded to its currency's
//! minor unit with banker's rounding (half to even).

use std::fmt;

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
    fn rounds_half_to_even_at_the_minor_unit() {
        let d = |s| Decimal::from_str(s).unwrap();
        assert_eq!(Currency::USD.round(d("2.345")), d("2.34"));
        assert_eq!(Currency::USD.round(d("2.355")), d("2.36"));
        assert_eq!(Currency::parse("JPY").unwrap().round(d("2.5")), d("2"));
        assert_eq!(Currency::parse("KWD").unwrap().round(d("1.23450")), d("1.234"));
    }
}
