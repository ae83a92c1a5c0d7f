//! Canonical JSON for comparing events as JSON values.
//!
//! Two events are the same when their fields are equal as JSON values, so key
//! order must not matter. serde_json's map is ordered by key unless a
//! dependency turns on its `preserve_order` feature. This writer sorts keys
//! itself, so the fingerprint stays the same either way.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 of the canonical JSON form of a value.
pub type Fingerprint = [u8; 32];

/// Hashes `values` in order, each in canonical form.
pub fn fingerprint(values: &[&Value]) -> Fingerprint {
    let mut text = String::new();
    for value in values {
        write_canonical(value, &mut text);
        text.push('\n');
    }
    Sha256::digest(text.as_bytes()).into()
}

/// Appends the canonical form of `value`: objects with sorted keys, no spaces.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (position, key) in keys.into_iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fingerprint_ignores_key_order() {
        let first = json!({"a": 1, "b": {"x": [1, 2], "y": null}});
        let second: Value = serde_json::from_str(r#"{"b":{"y":null,"x":[1,2]},"a":1}"#).unwrap();
        assert_eq!(fingerprint(&[&first]), fingerprint(&[&second]));
    }

    #[test]
    fn fingerprint_sees_value_changes() {
        let first = json!({"a": 1});
        let second = json!({"a": 2});
        let float = json!({"a": 1.0});
        assert_ne!(fingerprint(&[&first]), fingerprint(&[&second]));
        assert_ne!(fingerprint(&[&first]), fingerprint(&[&float]));
    }

    #[test]
    fn fingerprint_separates_fields() {
        let ab = [&json!("ab"), &json!("c")];
        let a_bc = [&json!("a"), &json!("bc")];
        assert_ne!(fingerprint(&ab), fingerprint(&a_bc));
    }
}
