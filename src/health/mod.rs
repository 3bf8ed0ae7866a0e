//! Health (temporary until the health module lands).
/// Probe verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not probed yet.
    Unknown,
    /// Healthy.
    Up,
    /// Unhealthy.
    Down,
}
