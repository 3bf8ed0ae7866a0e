//! A reader over one TOML table that hands out typed keys and reports the keys nobody asked for.
//!
//! Every problem goes into one [`Problems`] list with its key path, so a config file is walked
//! to the end however broken it is, and `upstreamd check` can report everything in one run.

use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use super::load::ConfigError;

/// Every problem found so far, each with its key path.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    /// Records a problem at `path` (empty for the whole file).
    pub(super) fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Whether nothing was recorded.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems in the order they were found.
    pub(super) fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

/// One TOML table at a key path, such as `upstream[1].health`.
///
/// Each getter marks its key as known, whether the key is present or not; [`Section::finish`]
/// then reports every key of the table that no getter asked for, with a did-you-mean hint.
pub(super) struct Section<'a> {
    table: Option<&'a toml::Table>,
    path: String,
    asked: Vec<&'static str>,
    /// The table itself had the wrong type (already reported): do not report its keys missing.
    broken: bool,
}

impl<'a> Section<'a> {
    /// The whole file.
    pub(super) fn root(table: &'a toml::Table) -> Self {
        Self {
            table: Some(table),
            path: String::new(),
            asked: Vec::new(),
            broken: false,
        }
    }

    /// A table found inside an array, such as an inline `{ address = … }` at `servers[1]`.
    pub(super) fn nested(table: &'a toml::Table, path: String) -> Self {
        Self::new(Some(table), path, false)
    }

    fn new(table: Option<&'a toml::Table>, path: String, broken: bool) -> Self {
        Self {
            table,
            path,
            asked: Vec::new(),
            broken,
        }
    }

    /// This table's own path (empty for the whole file).
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` in this table: `upstream[0].health` + `rise`.
    pub(super) fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Whether `key` is present (without marking it as known).
    pub(super) fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    /// The raw value of `key`, marking it as known.
    pub(super) fn value(&mut self, key: &'static str) -> Option<&'a Value> {
        self.asked.push(key);
        self.table.and_then(|t| t.get(key))
    }

    /// `key` converted by `convert`; a conversion error is recorded at the key's path.
    pub(super) fn get<T>(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.value(key)?;
        match convert(value) {
            Ok(v) => Some(v),
            Err(message) => {
                problems.add(&self.key_path(key), message);
                None
            }
        }
    }

    /// Like [`Section::get`], and a missing key is a problem too.
    pub(super) fn require<T>(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        self.expect(key, problems);
        self.get(key, problems, convert)
    }

    /// Like [`Section::get`], with `default` when the key is absent (`None` still means invalid).
    pub(super) fn get_or<T>(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
        default: T,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        if self.has(key) {
            self.get(key, problems, convert)
        } else {
            self.asked.push(key);
            Some(default)
        }
    }

    /// Records a missing required key; true when the key is present.
    pub(super) fn expect(&self, key: &str, problems: &mut Problems) -> bool {
        let present = self.has(key);
        if !present && !self.broken {
            problems.add(&self.key_path(key), "required key is missing");
        }
        present
    }

    /// The elements of the array at `key`, each with its path (`servers[1]`); `None` when
    /// the key is absent or not an array (recorded).
    pub(super) fn items(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Option<Vec<(String, &'a Value)>> {
        let path = self.key_path(key);
        let array = self.get(key, problems, |v| match v {
            Value::Array(a) => Ok(a),
            other => Err(format!("expected an array, found {}", describe(other))),
        })?;
        Some(
            array
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v))
                .collect(),
        )
    }

    /// An array whose elements are converted by `convert`, each bad element recorded at its own
    /// path; `None` when anything is wrong.
    pub(super) fn list<T>(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
        convert: impl Fn(&'a Value) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let items = self.items(key, problems)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (path, v) in items {
            match convert(v) {
                Ok(s) => out.push(s),
                Err(message) => {
                    problems.add(&path, message);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// The sub-table at `key`; an empty one when absent, and a broken one when not a table.
    pub(super) fn section(&mut self, key: &'static str, problems: &mut Problems) -> Section<'a> {
        let path = self.key_path(key);
        match self.value(key) {
            None => Section::new(None, path, self.broken),
            Some(Value::Table(t)) => Section::new(Some(t), path, false),
            Some(other) => {
                problems.add(
                    &path,
                    format!("expected a table, found {}", describe(other)),
                );
                Section::new(None, path, true)
            }
        }
    }

    /// The array of tables at `key` (`[[upstream]]`); `None` when absent or not an array.
    /// Elements that are not tables are recorded and left out.
    pub(super) fn sections(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Option<Vec<Section<'a>>> {
        let path = self.key_path(key);
        let array = self.get(key, problems, |v| match v {
            Value::Array(a) => Ok(a),
            other => Err(format!(
                "expected an array of tables (`[[{}]]` sections), found {}",
                header(&path),
                describe(other)
            )),
        })?;
        let mut out = Vec::with_capacity(array.len());
        for (i, v) in array.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            match v {
                Value::Table(t) => out.push(Section::new(Some(t), item_path, false)),
                other => problems.add(
                    &item_path,
                    format!("expected a table, found {}", describe(other)),
                ),
            }
        }
        Some(out)
    }

    /// Reports every key that no getter asked for.
    pub(super) fn finish(self, problems: &mut Problems) {
        self.finish_with(problems, |_| None);
    }

    /// Like [`Section::finish`]; `hint` may explain an unknown key better than a spelling
    /// suggestion can (a key of another source kind, say).
    pub(super) fn finish_with(
        self,
        problems: &mut Problems,
        hint: impl Fn(&str) -> Option<String>,
    ) {
        let Some(table) = self.table else { return };
        for key in table.keys() {
            if self.asked.contains(&key.as_str()) {
                continue;
            }
            let extra = hint(key)
                .or_else(|| did_you_mean(key, &self.asked).map(|k| format!("did you mean `{k}`?")));
            // A quoted TOML key may hold a line break; keep one problem on one line.
            let shown = if key.chars().any(char::is_control) {
                format!("{key:?}")
            } else {
                key.clone()
            };
            let message = match extra {
                Some(extra) => format!("unknown key `{shown}` ({extra})"),
                None => format!("unknown key `{shown}`"),
            };
            problems.add(&self.path, message);
        }
    }
}

/// `parent.key`, or `key` at the top.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The TOML header of an array-of-tables path: `upstream[0].source` → `upstream.source`.
fn header(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// The closest of `known` to `key`, if it is close enough to be a likely typo.
fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_ascii_lowercase();
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// A short description of a value for "expected …, found …" messages.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a (long) string".to_owned(),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the float {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(_) => "a date-time".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

// Converters for `Section::get` and `Section::require`: a value in, a typed value or a message out.

/// A string.
pub(super) fn string(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a string, found {}", describe(other))),
    }
}

/// A string that is not empty.
pub(super) fn non_empty(v: &Value) -> Result<String, String> {
    let s = string(v)?;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(s)
}

/// A file system path (a non-empty string).
pub(super) fn path(v: &Value) -> Result<PathBuf, String> {
    let s = non_empty(v)?;
    if s.contains('\0') {
        return Err("a path cannot contain a NUL character".to_owned());
    }
    Ok(PathBuf::from(s))
}

/// A boolean.
pub(super) fn boolean(v: &Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(*b),
        other => Err(format!("expected true or false, found {}", describe(other))),
    }
}

/// A whole number from `min` to `max`.
pub(super) fn u32_in(min: u32, max: u32) -> impl Fn(&Value) -> Result<u32, String> {
    move |v| {
        let range = || format!("must be a whole number from {min} to {max}");
        match v {
            Value::Integer(i) => u32::try_from(*i)
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{} (found {i})", range())),
            other => Err(format!("{}, found {}", range(), describe(other))),
        }
    }
}

/// A number (whole or not) from `min` to `max`.
pub(super) fn f64_in(min: f64, max: f64) -> impl Fn(&Value) -> Result<f64, String> {
    move |v| {
        let n = match v {
            Value::Float(f) => *f,
            // Whole numbers are exact in f64 far beyond any sane range checked here.
            Value::Integer(i) => *i as f64,
            other => {
                return Err(format!(
                    "must be a number from {min} to {max}, found {}",
                    describe(other)
                ))
            }
        };
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("must be a number from {min} to {max} (found {n})"))
        }
    }
}

/// A duration string with a unit: `"250ms"`, `"2s"`, `"1m"`.
pub(super) fn duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::String(s) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration such as \"250ms\", \"2s\" or \"1m\": {e}")),
        Value::Integer(i) => Err(format!(
            "a bare number has no unit: write the duration as a string such as \"{i}s\" or \"{i}ms\" (e.g. \"2s\")"
        )),
        Value::Float(f) => Err(format!(
            "a bare number has no unit: write the duration as a string such as \"{}ms\" (e.g. \"2s\")",
            (f * 1000.0).round()
        )),
        other => Err(format!("expected a duration string such as \"2s\", found {}", describe(other))),
    }
}

/// A duration of at least `min`.
pub(super) fn duration_at_least(min: Duration) -> impl Fn(&Value) -> Result<Duration, String> {
    move |v| {
        let d = duration(v)?;
        if d < min {
            return Err(format!(
                "must be at least {} (found {})",
                humantime::format_duration(min),
                humantime::format_duration(d)
            ));
        }
        Ok(d)
    }
}

/// One of a fixed set of words, with a did-you-mean hint.
pub(super) fn choice<T: Copy>(
    options: &'static [(&'static str, T)],
) -> impl Fn(&Value) -> Result<T, String> {
    move |v| {
        let s = string(v)?;
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == s) {
            return Ok(*t);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let hint = did_you_mean(&s, &names)
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        Err(format!("{s:?} is not one of {}{hint}", names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).expect("test TOML is valid")
    }

    #[test]
    fn unknown_keys_are_reported_with_the_closest_known_key() {
        let t = table("interval = \"2s\"\nintervall = \"3s\"\nzzz = 1\n");
        let mut problems = Problems::default();
        let mut s = Section::root(&t);
        assert!(s.get("interval", &mut problems, duration).is_some());
        s.value("timeout");
        s.finish(&mut problems);
        let messages: Vec<String> = problems.into_vec().into_iter().map(|e| e.message).collect();
        assert_eq!(
            messages,
            [
                "unknown key `intervall` (did you mean `interval`?)",
                "unknown key `zzz`"
            ]
        );
    }

    #[test]
    fn a_misspelling_far_from_every_known_key_gets_no_hint() {
        assert_eq!(did_you_mean("colour", &["interval", "timeout"]), None);
        assert_eq!(
            did_you_mean("Timeout", &["interval", "timeout"]),
            Some("timeout")
        );
    }

    #[test]
    fn array_of_tables_headers_drop_the_indexes() {
        assert_eq!(header("upstream[0].source"), "upstream.source");
        assert_eq!(header("upstream"), "upstream");
    }

    #[test]
    fn a_missing_key_under_a_broken_table_is_not_reported_twice() {
        let t = table("nginx = 3\n");
        let mut problems = Problems::default();
        let mut root = Section::root(&t);
        let mut nginx = root.section("nginx", &mut problems);
        assert!(nginx.require("output", &mut problems, path).is_none());
        let errors = problems.into_vec();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "nginx");
    }

    #[test]
    fn bare_numbers_are_refused_as_durations_with_an_example() {
        let message = duration(&Value::Integer(2)).unwrap_err();
        assert!(message.contains("\"2s\""), "{message}");
    }
}
