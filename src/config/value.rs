//! One value of the config, read from its `Scalar`: a duration, a size, a whole number or a
//! boolean, checked against the bounds of its key and reported at the value when wrong. One
//! parser each for durations and sizes serves every section (and `velocity testserver --delay`),
//! so `64k` or `1.5s` mean the same wherever they are written.

use std::time::Duration;

use super::schema::{Scalar, S};
use super::validate::Ctx;

/// Inclusive bounds of a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds<T> {
    pub min: T,
    pub max: T,
}

pub const SECOND: Duration = Duration::from_secs(1);
pub const MINUTE: Duration = Duration::from_secs(60);
pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(24 * 3600);
pub const MILLISECOND: Duration = Duration::from_millis(1);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Parse `250ms`, `2s`, `1.5s`, `1m`, `1h`. A bare number is refused: `timeout: 5` is too easy
/// to misread as milliseconds or seconds. Exact to the nanosecond (no floating point), so
/// `format_duration` of the result reads back equal.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!("invalid duration {text:?}: expected a number with a unit, such as 250ms, 2s or 1m"));
    }
    let unit_nanos: u128 = match unit {
        "ms" => 1_000_000,
        "s" => NANOS_PER_SECOND,
        "m" => 60 * NANOS_PER_SECOND,
        "h" => 3600 * NANOS_PER_SECOND,
        "" => return Err(format!("duration {text:?} is missing a unit (ms, s, m or h)")),
        _ => return Err(format!("invalid duration unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(format!("invalid duration {text:?}"));
    }
    let out_of_range = || format!("duration {text:?} is out of range");
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| out_of_range())? };
    // Digits past the 18th are far below a nanosecond even in hours: dropped, so that the
    // arithmetic below cannot overflow.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = match fraction.parse::<u128>() {
        Ok(digits) => digits * unit_nanos / 10u128.pow(fraction.len() as u32),
        Err(_) => 0,
    };
    let nanos = whole.checked_mul(unit_nanos).and_then(|n| n.checked_add(fraction_nanos)).ok_or_else(out_of_range)?;
    let secs = u64::try_from(nanos / NANOS_PER_SECOND).map_err(|_| out_of_range())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SECOND) as u32))
}

/// `24h`, `5m`, `2s`, `250ms`: the largest unit that writes `d` whole; seconds with a fraction
/// when finer than a millisecond. `parse_duration` reads it back equal.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (unit, size) in [("h", HOUR), ("m", MINUTE), ("s", SECOND), ("ms", MILLISECOND)] {
        if nanos.is_multiple_of(size.as_nanos()) {
            return format!("{}{unit}", nanos / size.as_nanos());
        }
    }
    let fraction = format!("{:09}", d.subsec_nanos());
    format!("{}.{}s", d.as_secs(), fraction.trim_end_matches('0'))
}

/// Parse a byte size: a whole number of bytes, or a whole number with `k`, `m` or `g` (powers
/// of 1024; `KiB`, `MiB`, `GiB`, `kb` and the like mean the same), such as `64k` or `10MiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected bytes, or a whole number with k, m or g, such as 65536, 64k or 64KiB"
        ));
    }
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        other => return Err(format!("invalid size unit {other:?} in {text:?}: use k, m or g (such as 64k)")),
    };
    let out_of_range = || format!("size {text:?} is out of range");
    number.parse::<u64>().map_err(|_| out_of_range())?.checked_mul(scale).ok_or_else(out_of_range)
}

/// `1g`, `16m`, `64k` when whole in that unit, else bytes; `parse_size` reads it back.
pub fn format_size(n: u64) -> String {
    for (unit, size) in [("g", GIB), ("m", MIB), ("k", KIB)] {
        if n != 0 && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

/// A duration within `bounds`. `interval: 2` is a number to YAML; the parser explains the
/// missing unit.
pub fn duration(ctx: &mut Ctx, key: &str, v: &S<Scalar>, bounds: Bounds<Duration>) -> Option<Duration> {
    let parsed = match &v.value {
        Scalar::Text(t) => parse_duration(t),
        Scalar::Int(n) => parse_duration(&n.to_string()),
        Scalar::Other(o) => Err(format!("expected a duration such as 250ms or 2s, got {o}")),
    };
    within(ctx, key, v, parsed, bounds, format_duration, "")
}

/// A byte size within `bounds`: a YAML number is bytes.
pub fn size(ctx: &mut Ctx, key: &str, v: &S<Scalar>, bounds: Bounds<u64>) -> Option<u64> {
    let parsed = match &v.value {
        Scalar::Int(n) => u64::try_from(*n).map_err(|_| format!("size {n} is negative")),
        Scalar::Text(t) => parse_size(t),
        Scalar::Other(o) => Err(format!("expected a size such as 65536 or 64k, got {o}")),
    };
    within(ctx, key, v, parsed, bounds, format_size, " bytes")
}

/// `parsed` when it is within `bounds`; otherwise the problem, at the value.
fn within<T: PartialOrd + Copy>(
    ctx: &mut Ctx,
    key: &str,
    v: &S<Scalar>,
    parsed: Result<T, String>,
    bounds: Bounds<T>,
    show: fn(T) -> String,
    unit: &str,
) -> Option<T> {
    match parsed {
        Ok(x) if bounds.min <= x && x <= bounds.max => Some(x),
        Ok(_) => {
            let (min, max) = (show(bounds.min), show(bounds.max));
            ctx.error(&v.referenced, format!("{key} must be from {min} to {max}{unit}, got {}", v.value));
            None
        }
        Err(e) => {
            ctx.error(&v.referenced, format!("{key}: {e}"));
            None
        }
    }
}

/// A whole number from `min` to `max`.
pub fn whole(ctx: &mut Ctx, key: &str, v: &S<Scalar>, min: i64, max: i64) -> Option<i64> {
    match v.value {
        Scalar::Int(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            ctx.error(&v.referenced, format!("{key} must be a whole number from {min} to {max}, got {}", v.value));
            None
        }
    }
}

/// A text value that passes `ok`, as written (trimming is the caller's choice); otherwise
/// "KEY must be HINT, got VALUE", at the value.
pub fn text(ctx: &mut Ctx, key: &str, v: &S<Scalar>, ok: fn(&str) -> bool, hint: &str) -> Option<String> {
    match &v.value {
        Scalar::Text(t) if ok(t) => Some(t.clone()),
        other => {
            ctx.error(&v.referenced, format!("{key} must be {hint}, got {other}"));
            None
        }
    }
}

pub fn boolean(ctx: &mut Ctx, key: &str, v: &S<Scalar>) -> Option<bool> {
    match &v.value {
        Scalar::Other(t) if t == "true" => Some(true),
        Scalar::Other(t) if t == "false" => Some(false),
        other => {
            ctx.error(&v.referenced, format!("{key} must be true or false, got {other}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10.5ms"), Ok(Duration::from_micros(10_500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse_duration("0.0000000019s"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn duration_errors() {
        assert!(parse_duration("5").unwrap_err().contains("missing a unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration(".s").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999999h").unwrap_err().contains("out of range"));
        assert!(parse_duration("9999999999999999999999999999999999999999999h").unwrap_err().contains("out of range"));
    }

    #[test]
    fn durations_format_and_read_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(86400), "24h"),
            (Duration::from_micros(1500), "0.0015s"),
            (Duration::from_nanos(10_500_001), "0.010500001s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64 kb"), Ok(65536));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1.5m").is_err());
        assert!(parse_size("k").unwrap_err().contains("invalid size"));
        assert!(parse_size("1t").unwrap_err().contains("unit"));
        assert!(parse_size("99999999999999g").unwrap_err().contains("out of range"));
        assert!(parse_size("99999999999999999999999").unwrap_err().contains("out of range"));
        for (n, text) in [(0, "0"), (10, "10"), (65536, "64k"), (1 << 20, "1m"), (1 << 40, "1024g"), (1536, "1536")] {
            assert_eq!(format_size(n), text);
            assert_eq!(parse_size(text), Ok(n));
        }
    }
}
