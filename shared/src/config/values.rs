//! Values parsed from variables (cron schedules, spans of time) and the reader that parses
//! them, collecting every problem instead of stopping at the first.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use chrono::Timelike;
use secrecy::SecretString;

use super::problems::Problems;
use super::variables::{VARIABLES, Variable};

/// A validated cron schedule (five fields, or six with seconds first; `@daily` and the other
/// nicknames), evaluated in UTC.
#[derive(Debug, Clone)]
pub struct PollSchedule {
    /// The text as configured, for messages.
    pub text: String,
    /// The parsed pattern.
    cron: croner::Cron,
}

impl PollSchedule {
    /// The start of the period `now` falls in: the last time the schedule fired, `now`
    /// included.
    pub fn period_start(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        // Whole seconds: every scheduler must name a period alike, whenever it looks.
        let now = now.with_nanosecond(0)?;
        self.cron
            .find_previous_occurrence(&now, true)
            .ok()?
            .with_nanosecond(0)
    }

    /// The next time the schedule fires after `now`.
    pub fn next_start(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let now = now.with_nanosecond(0)?;
        self.cron
            .find_next_occurrence(&now, false)
            .ok()?
            .with_nanosecond(0)
    }
}

impl FromStr for PollSchedule {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| {
                // croner counts the fields it could parse (5 to 7, with years): say what this
                // setting takes instead.
                let e = e.to_string();
                if e.contains("field") {
                    "a schedule is 5 fields (minute hour day-of-month month day-of-week), 6 with \
                     seconds first, or @hourly, @daily, @weekly, @monthly or @yearly"
                        .to_string()
                } else {
                    e
                }
            })?;
        // A pattern that never fires (30 February) parses, but has no period.
        cron.find_next_occurrence(&chrono::Utc::now(), false)
            .map_err(|_| "it never fires".to_string())?;
        Ok(Self {
            text: text.to_string(),
            cron,
        })
    }
}

/// A span of time: `30s`, `10m`, `2h`, `1d`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (number, unit) = text.split_at(
            text.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len()),
        );
        let refused = || format!("{text:?} is not a duration like 30s, 10m, 2h or 1d");
        let value: u64 = number.parse().map_err(|_| refused())?;
        let seconds = match unit {
            "" | "s" => value,
            "m" => value * 60,
            "h" => value * 3600,
            "d" => value * 86_400,
            _ => return Err(refused()),
        };
        Ok(Span(Duration::from_secs(seconds)))
    }
}

/// SPACES_CONDITIONAL_WRITES: whether writes carry `If-Match` / `If-None-Match`, and what a
/// store that ignores them means. DigitalOcean documents no support for them on PUT, so they are
/// verified by a probe (`storage::write_conditions`), never assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConditionalWrites {
    /// Sent and probed: a store that ignores them is reported, and workers run on their claims
    /// alone (every flush reads before it writes).
    #[default]
    Auto,
    /// Sent and probed: a worker refuses to start when the store ignores them, or when the
    /// probe gets no answer.
    Required,
    /// Not sent: for a store that rejects requests carrying them.
    Off,
}

impl FromStr for ConditionalWrites {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            // `true` and `false` are the spellings of fbsync before the probe.
            "auto" | "true" => Ok(Self::Auto),
            "required" => Ok(Self::Required),
            "off" | "false" => Ok(Self::Off),
            _ => Err(format!("{text:?} is not one of auto, required, off")),
        }
    }
}

/// Reads variables and collects every parse problem instead of stopping at the first; every
/// name it reads is one of [`VARIABLES`], whose defaults it applies.
pub(super) struct VarReader<'a> {
    /// The variables as given.
    pub(super) vars: &'a HashMap<String, String>,
    /// What was found wrong so far.
    pub(super) problems: Problems,
    /// Every name read, so a test can hold the code and [`VARIABLES`] to each other.
    pub(super) read: Vec<&'static str>,
}

impl VarReader<'_> {
    /// The variable's entry in [`VARIABLES`].
    pub(super) fn declared(&mut self, name: &'static str) -> Option<&'static Variable> {
        self.read.push(name);
        let declared = VARIABLES.iter().find(|v| v.name == name);
        if declared.is_none() {
            self.problems
                .push(format!("{name} is read but not declared (a bug in fbsync)"));
        }
        declared
    }

    /// A non-empty value, trimmed; the default is not applied.
    pub(super) fn optional(&mut self, name: &'static str) -> Option<String> {
        self.declared(name);
        self.vars
            .get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn secret(&mut self, name: &'static str) -> Option<SecretString> {
        self.optional(name).map(SecretString::from)
    }

    /// The value, or the declared default (empty when there is none).
    pub(super) fn text(&mut self, name: &'static str) -> String {
        let default = self
            .declared(name)
            .and_then(|v| v.default)
            .unwrap_or_default();
        self.optional(name).unwrap_or_else(|| default.to_string())
    }

    pub(super) fn optional_parsed<T: FromStr>(&mut self, name: &'static str) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.optional(name)?;
        match raw.parse() {
            Ok(value) => Some(value),
            Err(e) => {
                self.problems
                    .push(format!("{name}={raw:?} is not a valid value: {e}"));
                None
            }
        }
    }

    /// The value parsed, or the declared default parsed.
    pub(super) fn parsed<T: FromStr + Placeholder>(&mut self, name: &'static str) -> T
    where
        T::Err: fmt::Display,
    {
        if let Some(value) = self.optional_parsed(name) {
            return value;
        }
        let default = self
            .declared(name)
            .and_then(|v| v.default)
            .unwrap_or_default();
        default.parse().unwrap_or_else(|_| {
            self.problems.push(format!(
                "{name}: its default {default:?} does not parse (a bug in fbsync)"
            ));
            T::placeholder()
        })
    }
}

/// A value to carry on parsing with once a problem is reported: the settings are refused
/// anyway, so it is never used.
pub(super) trait Placeholder {
    fn placeholder() -> Self;
}

macro_rules! placeholder_default {
    ($($t:ty),*) => {$(
        impl Placeholder for $t {
            fn placeholder() -> Self {
                <$t>::default()
            }
        }
    )*};
}

placeholder_default!(u16, u32, u64, usize, bool, Span, ConditionalWrites);

impl Placeholder for PollSchedule {
    fn placeholder() -> Self {
        "@daily".parse().expect("@daily is a schedule")
    }
}

impl Placeholder for SocketAddr {
    fn placeholder() -> Self {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}
