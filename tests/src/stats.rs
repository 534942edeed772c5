//! Reading `lb stats --json` without depending on its exact layout: the tests ask for numeric
//! fields by name and filter them by where they sit (under a key mentioning `backend`, `vip`,
//! …), so a reshuffle of the JSON does not break them, while a counter that is wrong does.
use serde_json::Value;

/// One numeric leaf of the JSON document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Keys and array indices from the root, joined with `/` (e.g. `backends/2/new_flows`).
    pub path: String,
    /// String values of the enclosing objects (`"addr": "10.0.0.11"`, `"reason": "drop_mtu"`),
    /// which label the entry the number belongs to.
    pub labels: Vec<String>,
    /// The field name (last key).
    pub key: String,
    /// Its value.
    pub value: u64,
}

/// Every non-negative integer leaf of `doc`, with its path and labels.
pub fn leaves(doc: &Value) -> Vec<Leaf> {
    let mut out = Vec::new();
    walk(doc, String::new(), Vec::new(), "", &mut out);
    out
}

fn walk(v: &Value, path: String, labels: Vec<String>, key: &str, out: &mut Vec<Leaf>) {
    match v {
        Value::Object(map) => {
            let mut labels = labels;
            labels.extend(map.values().filter_map(Value::as_str).map(str::to_owned));
            for (k, child) in map {
                walk(child, format!("{path}/{k}"), labels.clone(), k, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, format!("{path}/{i}"), labels.clone(), key, out);
            }
        }
        Value::Number(n) => {
            if let Some(value) = n.as_u64() {
                out.push(Leaf {
                    path,
                    labels,
                    key: key.to_owned(),
                    value,
                });
            }
        }
        _ => {}
    }
}

/// Sum of the leaves named `key` whose path contains `section` (case-insensitive substring of
/// the keys, e.g. `backend` matches `backends/0/new_flows`).
pub fn sum(doc: &Value, key: &str, section: &str) -> u64 {
    let section = section.to_ascii_lowercase();
    leaves(doc)
        .into_iter()
        .filter(|l| l.key == key && l.path.to_ascii_lowercase().contains(&section))
        .map(|l| l.value)
        .sum()
}

/// Sum of the leaves named `key` in entries labelled exactly `label` (e.g. the backend whose
/// `addr` is `10.0.0.11`), within `section`.
pub fn sum_for(doc: &Value, key: &str, section: &str, label: &str) -> u64 {
    let section = section.to_ascii_lowercase();
    leaves(doc)
        .into_iter()
        .filter(|l| l.key == key && l.path.to_ascii_lowercase().contains(&section))
        .filter(|l| l.labels.iter().any(|x| x == label))
        .map(|l| l.value)
        .sum()
}

/// Every non-zero counter that counts a drop: a leaf whose own name, or a label of whose
/// entry, starts with `drop` (`drop_no_backend: 3` or `{"reason": "drop_mtu", "packets": 3}`).
pub fn nonzero_drops(doc: &Value) -> Vec<Leaf> {
    leaves(doc)
        .into_iter()
        .filter(|l| l.value != 0)
        .filter(|l| l.key.starts_with("drop") || l.labels.iter().any(|x| x.starts_with("drop")))
        .collect()
}

/// One backend entry of the maps as `lb stats --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// Its address.
    pub addr: String,
    /// Its Maglev weight.
    pub weight: u64,
    /// Named by ring slots: takes new flows (`BACKEND_F_IN_RING`).
    pub in_ring: bool,
    /// Keeps forwarding the flows pinned to it (`BACKEND_F_ACTIVE`).
    pub active: bool,
    /// Flows it was given.
    pub new_flows: u64,
}

/// Every object of the document that carries the `in_ring` and `active` flags, wherever it
/// sits: the backend entries.
pub fn backends(doc: &Value) -> Vec<BackendEntry> {
    let mut out = Vec::new();
    collect_backends(doc, &mut out);
    out
}

fn collect_backends(v: &Value, out: &mut Vec<BackendEntry>) {
    match v {
        Value::Object(map) => {
            if let (Some(in_ring), Some(active)) = (
                map.get("in_ring").and_then(Value::as_bool),
                map.get("active").and_then(Value::as_bool),
            ) {
                out.push(BackendEntry {
                    addr: map
                        .get("addr")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    weight: map.get("weight").and_then(Value::as_u64).unwrap_or(0),
                    in_ring,
                    active,
                    new_flows: map.get("new_flows").and_then(Value::as_u64).unwrap_or(0),
                });
            }
            map.values().for_each(|c| collect_backends(c, out));
        }
        Value::Array(items) => items.iter().for_each(|c| collect_backends(c, out)),
        _ => {}
    }
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
        assert_eq!(sum_for(&doc, "new_flows", "backends", "10.0.0.12"), 4);
        assert_eq!(sum_for(&doc, "new_flows", "backends", "10.0.0.1"), 0);
        assert_eq!(sum(&doc, "packets", "backends"), 10);
        assert_eq!(sum(&doc, "new_flows", "vips"), 7);
    }

    #[test]
    fn finds_backend_entries_by_their_flags() {
        let doc = json!({"vips": [{"vip": "10.100.0.1:80/tcp", "backends": [
            {"addr": "10.0.0.11", "weight": 1, "in_ring": true, "active": true, "new_flows": 4},
            {"addr": "10.0.0.12", "weight": 3, "in_ring": false, "active": true, "new_flows": 0}
        ]}]});
        let b = backends(&doc);
        assert_eq!(b.len(), 2);
        assert!(b[0].in_ring && b[0].active && b[0].new_flows == 4);
        assert!(!b[1].in_ring && b[1].active && b[1].weight == 3);
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
