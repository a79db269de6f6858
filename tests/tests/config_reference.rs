//! The configuration reference in `docs/operators.md` against the configuration structs: every
//! key `weir.toml` accepts is in the table, and every key the table names is accepted.
//!
//! The keys are discovered from the structs themselves, not from a list kept by hand: a probe
//! key in each section makes serde's `deny_unknown_fields` name every key the section has, and
//! sections whose default value is a table are walked the same way. Maps of free-form keys
//! (`kafka.client_overrides`) are leaves.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;

use weir::config::WeirConfig;
use weir_acceptance::repo_root;

const PROBE: &str = "weir_reference_probe";

/// The keys serde names for the table at `path` (empty: the top level), if it refuses unknown
/// keys.
fn keys_at(path: &[String]) -> Option<Vec<String>> {
    let text = if path.is_empty() {
        format!("{PROBE} = 1\n")
    } else {
        format!("[{}]\n{PROBE} = 1\n", path.join("."))
    };
    let error = toml::from_str::<WeirConfig>(&text).err()?.to_string();
    let (_, expected) = error.split_once(&format!("unknown field `{PROBE}`"))?;
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// Every key of the configuration, dotted.
fn config_keys() -> BTreeSet<String> {
    let defaults = toml::Value::try_from(WeirConfig::default()).unwrap();
    let mut keys = BTreeSet::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let names = keys_at(&path).unwrap_or_else(|| panic!("no key list for {path:?}"));
        for name in names {
            let mut child = path.clone();
            child.push(name);
            let default = child
                .iter()
                .try_fold(&defaults, |value, key| value.get(key.as_str()));
            let is_table = matches!(default, Some(toml::Value::Table(_)));
            if is_table && keys_at(&child).is_some() {
                pending.push(child);
            } else {
                keys.insert(child.join("."));
            }
        }
    }
    keys
}

/// The keys the reference table of `docs/operators.md` names: the first column of the first
/// table under "## Configuration", where `` `section.a` / `b` `` names `section.a` and `section.b`.
fn documented_keys() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo_root().join("docs/operators.md")).unwrap();
    let section = doc
        .split("\n## Configuration")
        .nth(1)
        .expect("a Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    // The first table of the section (the subsections document bindings' policies).
    let table = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'));
    let mut keys = BTreeSet::new();
    for line in table {
        let Some(first) = line.strip_prefix("| `") else {
            continue;
        };
        let cell = format!("`{}", first.split(" |").next().unwrap());
        let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
        let Some(head) = names.first() else { continue };
        let Some((prefix, _)) = head.rsplit_once('.') else {
            continue;
        };
        for name in names {
            if name.contains('.') {
                keys.insert(name.to_owned());
            } else {
                keys.insert(format!("{prefix}.{name}"));
            }
        }
    }
    keys
}

#[test]
fn every_configuration_key_is_documented_and_every_documented_key_exists() {
    let config = config_keys();
    let documented = documented_keys();
    assert!(config.len() > 20, "found only {config:?}");
    // The discovery itself: known keys are found, nested tables are walked.
    for known in [
        "store.url",
        "runtime.deadline_ms",
        "kafka.client_overrides",
        "log.level",
    ] {
        assert!(config.contains(known), "{known} not discovered: {config:?}");
    }
    let undocumented: Vec<_> = config.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&config).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/operators.md's configuration table is out of step with the configuration:\n  \
         keys missing from the table: {undocumented:?}\n  keys in the table that weir.toml refuses: {unknown:?}"
    );
    println!("{} configuration keys, all documented", config.len());
}
