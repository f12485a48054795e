//! Bandwidth rates: `RATE` on the command line is bytes per second with an
//! optional suffix (`800K`, `20M`, `1G` binary; `20MB` decimal; `0` means
//! no limit).

/// Largest rate or size accepted: 1 PiB (a typo such as `99999999G`
/// is refused instead of meaning "no limit" by accident).
pub const MAX_RATE: u64 = 1 << 50;

/// Parses a `RATE`. `K`/`M`/`G`/`T` and `KiB`/`MiB`/`GiB`/`TiB` (any case)
/// are powers of 1024, as in curl's and aria2c's rate options; `KB`/`MB`/
/// `GB`/`TB` are powers of 1000, as the units say. A trailing `/s` is
/// allowed. At most [`MAX_RATE`].
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid rate {s:?}: expected a number such as 800K, 20M or 1G"));
    }
    let unit = suffix.to_ascii_lowercase();
    let unit = unit.trim_end_matches("/s");
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "invalid rate {s:?}: unknown unit {suffix:?} (use K, M, G or T; KB, MB... are decimal)"
            ))
        }
    };
    let v: f64 = num.parse().map_err(|_| format!("invalid rate {s:?}: {num:?} is not a number"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes > MAX_RATE as f64 {
        return Err(format!("invalid rate {s:?}: more than 1 PiB"));
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
        assert_eq!(parse_rate("20MB").unwrap(), 20_000_000, "MB is decimal");
        assert_eq!(parse_rate("2KB/s").unwrap(), 2000);
        assert_eq!(parse_rate("3Ti").unwrap(), 3 << 40);
        assert!(parse_rate("99999999G").unwrap_err().contains("1 PiB"));
        assert_eq!(parse_rate("1024T").unwrap(), MAX_RATE);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10X").is_err());
        assert!(parse_rate("").is_err());
    }
}
