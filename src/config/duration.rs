use std::time::Duration;

/// Parse `250ms`, `2s`, `1.5s`, `1m`, `1h`. A bare number is refused: `timeout: 5` is too easy
/// to misread as milliseconds or seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!("invalid duration {text:?}: expected a number with a unit, such as 250ms, 2s or 1m"));
    }
    let value: f64 = number.parse().map_err(|_| format!("invalid duration {text:?}"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" => return Err(format!("duration {text:?} is missing a unit (ms, s, m or h)")),
        _ => return Err(format!("invalid duration unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("duration {text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn errors() {
        assert!(parse_duration("5").unwrap_err().contains("missing a unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999999h").unwrap_err().contains("out of range"));
    }
}
