//! The README's metrics table is the contract: a running daemon exports exactly the metrics it
//! lists, with exactly the labels it lists, and every label value it lists at 0 from the start.

use std::collections::{BTreeMap, BTreeSet};

use crate::util::*;

/// Label name → the values the README lists for it (empty when it lists none).
type Labels = BTreeMap<String, BTreeSet<String>>;

/// The rows of the metrics table under "## Monitoring": metric name → its labels.
fn readme_table() -> BTreeMap<String, Labels> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let monitoring = readme
        .split("\n## Monitoring\n")
        .nth(1)
        .expect("a ## Monitoring section");
    let table = monitoring
        .split("| metric | labels | meaning |\n")
        .nth(1)
        .expect("the metrics table");
    let mut rows = BTreeMap::new();
    for row in table.lines().skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        rows.insert(name, readme_labels(cells[2]));
    }
    rows
}

/// "`upstream`, `result` (ok, bad_status)" → {upstream: {}, result: {ok, bad_status}}.
fn readme_labels(cell: &str) -> Labels {
    let mut labels = Labels::new();
    let mut rest = cell;
    while let Some(start) = rest.find('`') {
        let after = &rest[start + 1..];
        let end = after.find('`').expect("closing backtick");
        let name = after[..end].to_owned();
        rest = &after[end + 1..];
        let values = match rest.trim_start().strip_prefix('(') {
            Some(list) => {
                let close = list.find(')').expect("closing parenthesis");
                let values = list[..close].split(',').map(|v| v.trim().to_owned());
                rest = &list[close + 1..];
                values.collect()
            }
            None => BTreeSet::new(),
        };
        labels.insert(name, values);
    }
    labels
}

/// The families of a `/metrics` scrape: name (as in `# TYPE`) → label name → values seen.
fn scraped(text: &str) -> BTreeMap<String, Labels> {
    let mut families: BTreeMap<String, Labels> = BTreeMap::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let name = decl.split(' ').next().unwrap().to_owned();
            families.entry(name).or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').expect("`series value`").0;
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let family = families
            .keys()
            .rev()
            .find(|f| {
                name == f.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .unwrap_or_else(|| panic!("{line:?} follows no # TYPE of its family"))
            .clone();
        let family = families.get_mut(&family).unwrap();
        let labels = labels.strip_suffix('}').expect("closing brace");
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
            if key != "le" {
                let value = value.trim_end_matches('"').to_owned();
                family.entry(key.to_owned()).or_default().insert(value);
            }
        }
    }
    families
}

#[test]
fn the_metrics_a_daemon_exports_are_the_readme_table_with_its_labels() {
    let readme = readme_table();
    assert!(readme.len() > 10, "the table parsed to {readme:?}");
    // Ready means the first reload succeeded, so the last-success timestamp is set too.
    let s = AdminStack::start(&["alpha"], |c| c);
    let text = admin_metrics(&s.admin);
    let exported = scraped(&text);

    let names = |m: &BTreeMap<String, Labels>| m.keys().cloned().collect::<BTreeSet<_>>();
    let (documented, found) = (names(&readme), names(&exported));
    assert_eq!(
        found.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "exported but not in the README's metrics table"
    );
    assert_eq!(
        documented.difference(&found).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the README's metrics table but not exported:\n{text}"
    );
    for (name, labels) in &readme {
        let seen = &exported[name];
        let keys = |l: &Labels| l.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(seen), keys(labels), "label names of {name}");
        for (label, values) in labels.iter().filter(|(_, v)| !v.is_empty()) {
            assert_eq!(
                &seen[label], values,
                "values of {name}{{{label}}}: the README lists each, and each is exported from the start"
            );
        }
    }
}
