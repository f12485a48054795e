//! Bandwidth rates: `RATE` on the command line is bytes per second with an
//! optional binary suffix (`800K`, `20M`, `1G`; `0` means no limit).

/// Parses a `RATE`. Accepts `K`/`M`/`G`/`T` (optionally followed by `i`, `B`
/// or `iB`, any case) as powers of 1024.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid rate {s:?}: expected a number such as 800K, 20M or 1G"));
    }
    let mult: u64 = match suffix.to_ascii_lowercase().trim_end_matches("/s").trim_end_matches('b').trim_end_matches('i')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("invalid rate {s:?}: unknown suffix {suffix:?} (use K, M or G)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("invalid rate {s:?}: {num:?} is not a number"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("invalid rate {s:?}: too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats a rate for people: `20.0 MiB/s`, or `none` for 0.
pub fn format_rate(bps: u64) -> String {
    if bps == 0 {
        "none".to_string()
    } else {
        format!("{}/s", crate::human_bytes(bps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("1500").unwrap(), 1500);
        assert_eq!(parse_rate("800K").unwrap(), 800 * 1024);
        assert_eq!(parse_rate("20M").unwrap(), 20 << 20);
        assert_eq!(parse_rate("20MiB").unwrap(), 20 << 20);
        assert_eq!(parse_rate("1g").unwrap(), 1 << 30);
        assert_eq!(parse_rate("1.5M").unwrap(), 3 << 19);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10X").is_err());
        assert!(parse_rate("").is_err());
    }
}
