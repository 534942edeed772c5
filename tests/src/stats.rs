//! Reading `lb stats --json` without depending on its exact layout: the tests ask for numeric
//! fields by name and filter them by where they sit (under a key mentioning `backend`, `vip`,
//! …), so a reshuffle of the JSON does not break them, while a counter that is wrong does.
use serde_json::Value;

/// One numeric leaf of the JSON document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Keys and array indices from the root, joined with `/` (e.g. `backends/2/new_flows`),
    /// plus the string values of the enclosing objects (`name`, `addr`, `reason`, …), so a
    /// filter on `10.0.0.11` or `drop_no_backend` finds the entry they label.
    pub path: String,
    /// The field name (last key).
    pub key: String,
    /// Its value.
    pub value: u64,
}

/// Every non-negative integer leaf of `doc`, with its path.
pub fn leaves(doc: &Value) -> Vec<Leaf> {
    let mut out = Vec::new();
    walk(doc, String::new(), "", &mut out);
    out
}

fn walk(v: &Value, path: String, key: &str, out: &mut Vec<Leaf>) {
    match v {
        Value::Object(map) => {
            // String members label the object: append them to the path of its numbers.
            let labels: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            let here = if labels.is_empty() {
                path
            } else {
                format!("{path}[{}]", labels.join(","))
            };
            for (k, child) in map {
                walk(child, format!("{here}/{k}"), k, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, format!("{path}/{i}"), key, out);
            }
        }
        Value::Number(n) => {
            if let Some(value) = n.as_u64() {
                out.push(Leaf {
                    path,
                    key: key.to_owned(),
                    value,
                });
            }
        }
        _ => {}
    }
}

/// Sum of the leaves named `key` whose path contains `within` (case-insensitive).
pub fn sum(doc: &Value, key: &str, within: &str) -> u64 {
    let within = within.to_ascii_lowercase();
    leaves(doc)
        .into_iter()
        .filter(|l| l.key == key && l.path.to_ascii_lowercase().contains(&within))
        .map(|l| l.value)
        .sum()
}

/// The leaves named `key` whose path contains `within`.
pub fn find(doc: &Value, key: &str, within: &str) -> Vec<Leaf> {
    let within = within.to_ascii_lowercase();
    leaves(doc)
        .into_iter()
        .filter(|l| l.key == key && l.path.to_ascii_lowercase().contains(&within))
        .collect()
}

/// Every non-zero counter that counts a drop: a leaf whose own name, or the label of whose
/// entry, starts with `drop` (`drop_no_backend: 3` or `{"reason": "drop_mtu", "packets": 3}`).
pub fn nonzero_drops(doc: &Value) -> Vec<Leaf> {
    leaves(doc)
        .into_iter()
        .filter(|l| l.value != 0)
        .filter(|l| {
            l.key.starts_with("drop")
                || l.path
                    .split(['[', ']', ',', '/'])
                    .any(|part| part.starts_with("drop"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sums_fields_under_a_section_only() {
        let doc = json!({
            "vips": [{"name": "web", "new_flows": 7}],
            "backends": [
                {"addr": "10.0.0.11", "new_flows": 3, "packets": 9},
                {"addr": "10.0.0.12", "new_flows": 4, "packets": 1}
            ]
        });
        assert_eq!(sum(&doc, "new_flows", "backends"), 7);
        assert_eq!(sum(&doc, "new_flows", "10.0.0.12"), 4);
        assert_eq!(sum(&doc, "packets", "backends"), 10);
        assert_eq!(sum(&doc, "new_flows", "vips"), 7);
    }

    #[test]
    fn finds_drops_by_key_or_by_label() {
        let doc = json!({
            "reasons": {"tx": 10, "drop_mtu": 0, "drop_no_backend": 2},
            "list": [{"reason": "drop_fragment", "packets": 5}, {"reason": "tx", "packets": 1}]
        });
        let mut drops: Vec<u64> = nonzero_drops(&doc).iter().map(|l| l.value).collect();
        drops.sort_unstable();
        assert_eq!(drops, vec![2, 5]);
    }
}
