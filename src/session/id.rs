//! Session id rule and generation.

use super::InvalidRequest;

/// Longest accepted session id, in characters (all ASCII, so also bytes).
pub const MAX_ID_LEN: usize = 128;

/// Checks the session id rule: 1 to 128 characters from `A-Z a-z 0-9 . _ : -`,
/// and not `.` or `..`, which URL clients rewrite as path segments and could
/// therefore never reach the session's routes.
pub fn validate(id: &str) -> Result<(), InvalidRequest> {
    if id.is_empty() {
        return Err(InvalidRequest::new("id must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(InvalidRequest::new(format!(
            "id is {} characters long; the maximum is {MAX_ID_LEN}",
            id.chars().count()
        )));
    }
    if let Some(bad) = id.chars().find(|c| !is_allowed(*c)) {
        return Err(InvalidRequest::new(format!(
            "id {:?} contains {:?}; allowed characters are A-Z a-z 0-9 . _ : -",
            shorten(id),
            bad
        )));
    }
    if id == "." || id == ".." {
        return Err(InvalidRequest::new(format!(
            "id {id:?} is reserved because URL clients treat it as a path segment"
        )));
    }
    Ok(())
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Cuts an id for an error message so a 10,000-character id does not fill the log.
fn shorten(id: &str) -> String {
    const SHOWN: usize = 64;
    if id.chars().count() <= SHOWN {
        id.to_string()
    } else {
        let head: String = id.chars().take(SHOWN).collect();
        format!("{head}...")
    }
}

/// Generates a new unique session id, `ses_` followed by a time-ordered UUID.
pub fn generate() -> String {
    format!("ses_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rule_accepts_allowed_characters() {
        for id in ["a", "ses_custom_123", "A.b:c-d_e", &"x".repeat(128)] {
            assert!(validate(id).is_ok(), "{id:?} should be accepted");
        }
    }

    #[test]
    fn id_rule_rejects_other_ids() {
        let long = "x".repeat(129);
        for id in [
            "",
            " ",
            "a/b",
            "with space",
            "ünï",
            "%2F",
            ".",
            "..",
            "ses\u{0}x",
            &long,
        ] {
            assert!(validate(id).is_err(), "{id:?} should be rejected");
        }
    }

    #[test]
    fn generated_ids_are_valid_and_unique() {
        let first = generate();
        let second = generate();
        assert!(first.starts_with("ses_"));
        assert!(validate(&first).is_ok());
        assert_ne!(first, second);
    }
}
