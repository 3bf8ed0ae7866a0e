//! The label sets of every metric family, and the closed sets of label values.
//!
//! A family takes one label-set type, so a misspelled label or value does not compile. Label
//! values are bounded: upstream and source names, states and results — never an address.
//!
//! ```
//! use upstreamd::metrics::labels::{ProbeLabels, ProbeResult};
//! use upstreamd::model::UpstreamName;
//! let upstream = UpstreamName::new("kotaemon").unwrap();
//! let labels = ProbeLabels { upstream, result: ProbeResult::Timeout };
//! ```
//!
//! A value outside the set, or a misspelt label, does not compile:
//!
//! ```compile_fail,E0308
//! use upstreamd::metrics::labels::{ProbeLabels, ProbeResult};
//! use upstreamd::model::UpstreamName;
//! let upstream = UpstreamName::new("kotaemon").unwrap();
//! let labels = ProbeLabels { upstream, result: "timeout" };
//! ```
//!
//! ```compile_fail,E0560
//! use upstreamd::metrics::labels::{ProbeLabels, ProbeResult};
//! use upstreamd::model::UpstreamName;
//! let upstream = UpstreamName::new("kotaemon").unwrap();
//! let labels = ProbeLabels { upstream, reslut: ProbeResult::Timeout };
//! ```

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::health::{Health, ProbeOutcome};
use crate::model::UpstreamName;
use crate::nginx::{ApplyError, NginxError, Step};

/// A closed set of label values: the enum, `ALL` (exported at 0 from the start), the word
/// each value is written as, and its encoding.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $word:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the README's order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The word in the exposition and the README.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_values! {
    /// `result` of `upstreamd_reloads_total`.
    ReloadResult {
        /// nginx confirmed a new worker generation.
        Ok => "ok",
        /// `nginx -t` refused the file.
        TestFailed => "test_failed",
        /// The reload command (or signal) failed.
        SignalFailed => "signal_failed",
        /// No new worker generation within `confirm_timeout`.
        Unconfirmed => "unconfirmed",
        /// The file could not be written; the old one stayed.
        WriteFailed => "write_failed",
    }
}

label_values! {
    /// `result` of `upstreamd_renders_total`.
    RenderResult {
        /// The rendered bytes differ from what nginx runs.
        Changed => "changed",
        /// The rendered bytes are what nginx runs.
        Unchanged => "unchanged",
        /// The template failed.
        Error => "error",
    }
}

label_values! {
    /// `result` of `upstreamd_probes_total`.
    ProbeResult {
        /// The probe passed.
        Ok => "ok",
        /// A status or body the probe does not accept.
        BadStatus => "bad_status",
        /// No verdict within the probe timeout.
        Timeout => "timeout",
        /// Connection or protocol error.
        Error => "error",
    }
}

label_values! {
    /// `result` of `upstreamd_error_log_lines_total`.
    ErrorLogResult {
        /// The line named an endpoint or upstream we probe: a probe was brought forward.
        Probe => "probe",
        /// The line named nothing we probe.
        NotOurs => "not_ours",
        /// The line was skipped as too long.
        TooLong => "too_long",
    }
}

label_values! {
    /// `result` of `upstreamd_lua_pushes_total`.
    LuaPushResult {
        /// Every current worker reported the pushed generation.
        Confirmed => "confirmed",
        /// nginx refused the push (a bad secret, a stale generation, an invalid list).
        Rejected => "rejected",
        /// nginx took the push but its workers did not report it in time.
        Unconfirmed => "unconfirmed",
        /// The push did not reach nginx, or its files could not be written.
        Failed => "failed",
    }
}

impl From<&ProbeOutcome> for ProbeResult {
    fn from(outcome: &ProbeOutcome) -> Self {
        match outcome {
            ProbeOutcome::Ok => ProbeResult::Ok,
            ProbeOutcome::BadStatus(_) | ProbeOutcome::BodyMismatch => ProbeResult::BadStatus,
            ProbeOutcome::Timeout => ProbeResult::Timeout,
            ProbeOutcome::Error(_) => ProbeResult::Error,
        }
    }
}

impl From<&ApplyError> for ReloadResult {
    fn from(error: &ApplyError) -> Self {
        match error {
            ApplyError::Write { .. } => ReloadResult::WriteFailed,
            ApplyError::Failed {
                step: Step::Test, ..
            } => ReloadResult::TestFailed,
            ApplyError::Failed {
                error: NginxError::Unconfirmed { .. },
                ..
            } => ReloadResult::Unconfirmed,
            ApplyError::Failed {
                step: Step::Reload, ..
            } => ReloadResult::SignalFailed,
        }
    }
}

impl EncodeLabelValue for Health {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for UpstreamName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// `upstreamd_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: &'static str,
}

/// Families labelled by `upstream` alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream.
    pub upstream: UpstreamName,
}

/// `upstreamd_endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointStateLabels {
    /// The upstream.
    pub upstream: UpstreamName,
    /// The endpoints' health.
    pub state: Health,
}

/// `upstreamd_health_transitions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The upstream.
    pub upstream: UpstreamName,
    /// The health the endpoint changed to.
    pub to: Health,
}

/// `upstreamd_probes_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProbeLabels {
    /// The upstream.
    pub upstream: UpstreamName,
    /// What the probe found.
    pub result: ProbeResult,
}

/// The per-source families (`upstreamd_source_*`, `upstreamd_registry_entries_skipped*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// The upstream.
    pub upstream: UpstreamName,
    /// The source's label: its kind, with `#N` when an upstream has several of one kind.
    pub source: String,
}

/// `upstreamd_reloads_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// How the attempt ended.
    pub result: ReloadResult,
}

/// `upstreamd_renders_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RenderLabels {
    /// What the render found.
    pub result: RenderResult,
}

/// `upstreamd_error_log_lines_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLogLabels {
    /// What became of the line.
    pub result: ErrorLogResult,
}

/// `upstreamd_lua_pushes_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LuaPushLabels {
    /// How the push ended.
    pub result: LuaPushResult,
}
