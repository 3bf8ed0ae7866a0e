//! Registry entries a source left out: which (bounded, for `/status` and the page), how many,
//! and how many are new since the source's previous answer (for the counter).
//!
//! Pure: the sources feed every entry they left out, with a reason, on each answer.

use std::collections::BTreeSet;

use serde::Serialize;

/// At most this many skipped entries are listed per source; the rest are only counted.
pub const MAX_LISTED: usize = 20;
/// Names and reasons are cut to this many characters when listed.
pub const MAX_TEXT: usize = 200;

/// One entry left out: its registry name and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SkippedEntry {
    /// The registry's name for it, with control characters and quotes escaped: an etcd key,
    /// or `service ID <id> on node <node>` for Consul. Registry data: escape it for HTML.
    pub name: String,
    /// Why it was left out, as a sentence fragment.
    pub reason: String,
}

impl SkippedEntry {
    /// An entry named `name`, left out because of `reason`.
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// The entries a snapshot left out: the total and the first [`MAX_LISTED`] by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// How many entries were left out (invalid, or a second entry for an address).
    pub total: usize,
    /// The first [`MAX_LISTED`] of them, sorted by name, names and reasons cut to
    /// [`MAX_TEXT`] characters.
    pub listed: Vec<SkippedEntry>,
}

impl Skipped {
    /// Nothing left out.
    pub fn none() -> Self {
        Self::default()
    }
}

/// Remembers which names the previous answer left out, so that an entry that stays invalid
/// is counted once, and one replaced by another invalid entry is counted too.
#[derive(Debug, Default, Clone)]
pub struct SkipTracker {
    previous: BTreeSet<String>,
}

impl SkipTracker {
    /// Takes every entry an answer left out. Returns the bounded [`Skipped`] and how many of
    /// the entries (by name) the previous answer did not leave out.
    pub fn observe(&mut self, entries: impl IntoIterator<Item = SkippedEntry>) -> (Skipped, usize) {
        let mut all: Vec<SkippedEntry> = entries.into_iter().collect();
        all.sort();
        all.dedup_by(|a, b| a.name == b.name);
        let names: BTreeSet<String> = all.iter().map(|e| e.name.clone()).collect();
        let new = names.difference(&self.previous).count();
        self.previous = names;
        let total = all.len();
        let listed = all
            .into_iter()
            .take(MAX_LISTED)
            .map(|e| SkippedEntry::new(cut(&e.name), cut(&e.reason)))
            .collect();
        (Skipped { total, listed }, new)
    }
}

/// `s` cut to [`MAX_TEXT`] characters, with `…` when cut.
fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str) -> SkippedEntry {
        SkippedEntry::new(name, "bad weight")
    }

    #[test]
    fn an_entry_that_stays_invalid_is_new_only_once() {
        let mut t = SkipTracker::default();
        let bad: Vec<SkippedEntry> = (0..15).map(|i| e(&format!("/k/{i:02}"))).collect();
        let counts: Vec<usize> = (0..3).map(|_| t.observe(bad.clone()).1).collect();
        assert_eq!(counts, [15, 0, 0], "15 bad entries over 3 answers count 15");
    }

    #[test]
    fn an_entry_replaced_by_another_invalid_one_is_counted() {
        let mut t = SkipTracker::default();
        assert_eq!(t.observe([e("/k/a")]).1, 1);
        let (skipped, new) = t.observe([e("/k/b")]);
        assert_eq!(
            (skipped.total, new),
            (1, 1),
            "same count, a different entry"
        );
        assert_eq!(t.observe([]).1, 0);
        assert_eq!(t.observe([e("/k/b")]).1, 1, "gone and back is new again");
    }

    #[test]
    fn at_most_twenty_are_listed_sorted_by_name_with_the_total() {
        let mut t = SkipTracker::default();
        let (skipped, new) = t.observe((0..30).rev().map(|i| e(&format!("/k/{i:02}"))));
        assert_eq!((skipped.total, new), (30, 30));
        assert_eq!(skipped.listed.len(), MAX_LISTED);
        assert_eq!(skipped.listed[0].name, "/k/00");
        assert_eq!(skipped.listed[19].name, "/k/19");
    }

    #[test]
    fn long_names_and_reasons_are_cut() {
        let mut t = SkipTracker::default();
        let long = "x".repeat(5000);
        let (skipped, _) = t.observe([SkippedEntry::new(long.clone(), long)]);
        let listed = &skipped.listed[0];
        assert_eq!(listed.name.chars().count(), MAX_TEXT + 1);
        assert!(listed.reason.ends_with('…'));
    }
}
