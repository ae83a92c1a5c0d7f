//! Timestamps: microseconds since the Unix epoch, shown as RFC 3339 UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Microseconds since the Unix epoch, read from the system clock.
pub fn now_micros() -> u64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    u64::try_from(nanos / 1_000).unwrap_or(0)
}

/// Formats `micros` as RFC 3339 UTC, for example `2026-02-08T15:00:00.123456Z`.
pub fn format_micros(micros: u64) -> String {
    let nanos = i128::from(micros) * 1_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_rfc3339_utc() {
        assert_eq!(format_micros(1_770_562_800_000_000), "2026-02-08T15:00:00Z");
        assert_eq!(
            format_micros(1_770_562_800_123_456),
            "2026-02-08T15:00:00.123456Z"
        );
    }
}
