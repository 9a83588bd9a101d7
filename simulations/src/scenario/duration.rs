//! Durations in scenario files: `"500ms"`, `"90s"`, `"10m"`, `"1h30m"`, `"14d"`, or a bare number of
//! seconds. Simulated time is kept in whole microseconds.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Microseconds per unit.
pub const MICROS_PER_MS: u64 = 1_000;
pub const MICROS_PER_SEC: u64 = 1_000_000;
const UNITS: [(&str, u64); 6] = [
    ("ms", MICROS_PER_MS),
    ("s", MICROS_PER_SEC),
    ("m", 60 * MICROS_PER_SEC),
    ("h", 3_600 * MICROS_PER_SEC),
    ("d", 86_400 * MICROS_PER_SEC),
    ("us", 1),
];

/// A span of simulated time, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SimDuration(pub u64);

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a duration: {text:?} (use e.g. \"500ms\", \"90s\", \"10m\", \"1h30m\", \"14d\")")]
pub struct DurationError {
    pub text: String,
}

impl SimDuration {
    pub const ZERO: SimDuration = SimDuration(0);

    pub const fn from_secs(s: u64) -> Self {
        SimDuration(s * MICROS_PER_SEC)
    }

    pub const fn from_millis(ms: u64) -> Self {
        SimDuration(ms * MICROS_PER_MS)
    }

    /// The duration of a `std::time::Duration`, to the microsecond.
    pub fn from_std(d: std::time::Duration) -> Self {
        SimDuration(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / MICROS_PER_SEC as f64
    }

    /// Parses `"1h30m"`-style text; a bare number is seconds (fractions allowed).
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        let err = || DurationError { text: text.to_string() };
        let t = text.trim();
        if t.is_empty() {
            return Err(err());
        }
        if let Ok(secs) = t.parse::<f64>() {
            return secs_to_micros(secs).map(SimDuration).ok_or_else(err);
        }
        let mut total: u64 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
            if num_len == 0 {
                return Err(err());
            }
            let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let per = UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, p)| *p)
                .ok_or_else(err)?;
            let part = value * per as f64;
            if !part.is_finite() || part < 0.0 || part > u64::MAX as f64 / 2.0 {
                return Err(err());
            }
            total = total.checked_add(part.round() as u64).ok_or_else(err)?;
        }
        Ok(SimDuration(total))
    }
}

fn secs_to_micros(secs: f64) -> Option<u64> {
    let us = secs * MICROS_PER_SEC as f64;
    (us.is_finite() && us >= 0.0 && us < u64::MAX as f64 / 2.0).then(|| us.round() as u64)
}

impl fmt::Display for SimDuration {
    /// The shortest exact form: `"1h30m"`, `"250ms"`, `"0s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, per) in [
            ("d", UNITS[4].1),
            ("h", UNITS[3].1),
            ("m", UNITS[2].1),
            ("s", UNITS[1].1),
        ] {
            if rest >= per {
                write!(f, "{}{unit}", rest / per)?;
                rest %= per;
            }
        }
        if rest >= MICROS_PER_MS {
            write!(f, "{}ms", rest / MICROS_PER_MS)?;
            rest %= MICROS_PER_MS;
        }
        if rest > 0 {
            write!(f, "{rest}us")?;
        }
        Ok(())
    }
}

impl Serialize for SimDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SimDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SimDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"90s\", \"10m\", \"1h30m\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SimDuration, E> {
                SimDuration::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SimDuration, E> {
                v.checked_mul(MICROS_PER_SEC)
                    .map(SimDuration)
                    .ok_or_else(|| E::custom("duration too long"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SimDuration, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                self.visit_u64(v)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SimDuration, E> {
                secs_to_micros(v)
                    .map(SimDuration)
                    .ok_or_else(|| E::custom("not a valid number of seconds"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_units_and_combinations() {
        assert_eq!(SimDuration::parse("500ms"), Ok(SimDuration(500_000)));
        assert_eq!(SimDuration::parse("1h30m"), Ok(SimDuration::from_secs(5_400)));
        assert_eq!(SimDuration::parse("14d"), Ok(SimDuration::from_secs(14 * 86_400)));
        assert_eq!(SimDuration::parse("2.5"), Ok(SimDuration(2_500_000)));
        assert!(SimDuration::parse("10 parsecs").is_err());
        assert!(SimDuration::parse("").is_err());
        assert!(SimDuration::parse("m").is_err());
    }

    #[test]
    fn durations_print_in_the_form_they_parse() {
        for text in ["1h30m", "250ms", "0s", "1d2h3m4s5ms"] {
            let d = SimDuration::parse(text).unwrap();
            assert_eq!(d.to_string(), text);
        }
    }
}
