//! The store's request budgets, decided in one place ([`StoreBudgets::for_store`]) and computed
//! the same way everywhere.
//!
//! Which store has which (DigitalOcean's limits page, last edited 13 January 2026, read
//! 2026-12-04): Spaces limits each bucket to 500 operations and 300 writes a second for buckets
//! created before late 2020 to late 2022 (by region; newer buckets allow more), an account to
//! 1,500 requests a second per IP address, and each object to 10 concurrent PUT or COPY requests,
//! with no window per object any more (until 2025: 240 and 150 a second, 5 PUTs per object in
//! any 5 minutes). fbsync writes one object at a time per conversation (a claim) and per Page
//! (`page_data.json`), far below the 10. A local directory has no budgets at all; other
//! S3-compatible stores get the bucket rates as configured and no per-object window unless one
//! is set.
//!
//! Per object (only when SPACES_OBJECT_PUTS_PER_5MIN is set): at most `puts_per_window` PUTs in
//! any sliding window. Each PUT is recorded before it is sent; a safety margin covers the time
//! between recording and the request reaching the store. Per bucket: writes and operations per
//! second, counted
//! in short windows in the database so every worker shares one budget (see
//! `Budgets::take_bucket_budget`). Each window's cap is 90% of the rate less what the windows
//! of the second and one window before it took, so the windows a sliding second touches, and
//! one more for requests that reach the store after their window, stay within 90% of the rate;
//! a window never takes more than twice its even share (no burst the size of a whole second).

use crate::config::{StorageSettings, StoreLocation};

/// The budgets in force for one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreBudgets {
    /// The bucket's rates: ceilings, below which the rate in force adapts to SlowDown answers
    /// ([`RateShare`]).
    pub bucket: BucketBudget,
    /// Each object's PUT window (none but where SPACES_OBJECT_PUTS_PER_5MIN sets one).
    pub object: PutBudget,
}

impl StoreBudgets {
    /// The one place that decides: no budgets for the local directory; for an S3-compatible
    /// store, the bucket's configured rates (operations held below the per-IP limit too, which
    /// one bucket's workers on one host can reach only through a raised SPACES_OPS_PER_SEC) and
    /// the per-object window when one is set.
    pub fn for_store(location: &StoreLocation, settings: &StorageSettings) -> Self {
        match location {
            StoreLocation::Local(_) => Self::none(),
            StoreLocation::S3(_) => {
                let per_ip = i64::from(settings.requests_per_sec_per_ip);
                let ops = match (i64::from(settings.ops_per_sec), per_ip) {
                    (ops, 0) => ops,
                    (0, per_ip) => per_ip,
                    (ops, per_ip) => ops.min(per_ip),
                };
                Self {
                    bucket: BucketBudget::for_rates(i64::from(settings.writes_per_sec), ops),
                    object: PutBudget::from_settings(settings),
                }
            }
        }
    }

    /// No budget of any kind (a local directory).
    pub fn none() -> Self {
        Self {
            bucket: BucketBudget::for_rates(0, 0),
            object: PutBudget {
                puts_per_window: 0,
                window_ms: 0,
                margin_ms: 0,
            },
        }
    }

    /// The budgets in words, for `fbsync check` and the worker's start line.
    pub fn describe(&self) -> String {
        let rate = |per_second: i64, configured: &str| {
            if per_second == 0 {
                format!("{configured} unlimited")
            } else {
                format!("{configured} {per_second}/s")
            }
        };
        let bucket = if self.bucket.is_unlimited() {
            "bucket: no request budget".to_string()
        } else {
            format!(
                "bucket: {}, {} (90% of the configured ceilings, in {} ms windows; lowered for a while after a SlowDown)",
                rate(self.bucket.writes_per_second, "writes"),
                rate(self.bucket.ops_per_second, "operations"),
                self.bucket.window_ms
            )
        };
        let object = match self.object.puts_per_window {
            0 => "per object: no PUT window".to_string(),
            puts => format!(
                "per object: {puts} PUTs per {} s",
                self.object.window_ms / 1000
            ),
        };
        format!("{bucket}; {object}")
    }
}

/// The share of the bucket's ceilings in force: halved when the store answers SlowDown (at most
/// once per [`RateShare::DECREASE_SPACING_MS`], since requests already sent at the old rate
/// answer SlowDown too), then climbing back by [`RateShare::CLIMB_PER_SECOND`] of the ceiling
/// a second. A bucket whose real limit is below the configured one (a shared account, a busy
/// region) converges on it instead of being retried into. Kept in the database, so every
/// worker follows one rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateShare {
    /// The share (in millionths of the ceiling) the last decrease set.
    pub lowered_to_ppm: i64,
    /// When that decrease was (ms since the epoch); the share climbs from there.
    pub lowered_at_ms: i64,
}

impl RateShare {
    /// The ceilings in full: no SlowDown yet.
    pub const FULL: RateShare = RateShare {
        lowered_to_ppm: 1_000_000,
        lowered_at_ms: 0,
    };
    /// A decrease keeps this share of the rate in force (multiplicative decrease).
    const DECREASE_TO: f64 = 0.5;
    /// Share of the ceiling regained each second without a decrease (additive increase): from
    /// half the ceiling back to all of it in 50 s.
    pub const CLIMB_PER_SECOND: f64 = 0.01;
    /// The least share: the bucket is never stopped altogether.
    const LEAST: f64 = 0.01;
    /// Decreases are at least this far apart: the answers to requests sent before the last
    /// one arrive within it.
    pub const DECREASE_SPACING_MS: i64 = 1_000;

    /// The share of the ceilings in force at `now`.
    pub fn at(&self, now: i64) -> f64 {
        let climbed = Self::CLIMB_PER_SECOND * (now - self.lowered_at_ms).max(0) as f64 / 1000.0;
        (self.lowered_to_ppm as f64 / 1e6 + climbed).min(1.0)
    }

    /// The share after a SlowDown answered at `now`; `None` when the last decrease is too
    /// recent to count another.
    pub fn after_slow_down(&self, now: i64) -> Option<RateShare> {
        if now - self.lowered_at_ms < Self::DECREASE_SPACING_MS {
            return None;
        }
        let lowered = (self.at(now) * Self::DECREASE_TO).max(Self::LEAST);
        Some(RateShare {
            lowered_to_ppm: (lowered * 1e6).round() as i64,
            lowered_at_ms: now,
        })
    }
}

/// What a request costs from the bucket's budget: Spaces limits writes (PUT, COPY, POST and
/// LIST; fbsync counts a DELETE as one too) apart from operations of any kind (every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requests {
    /// Requests of the write class.
    pub writes: i64,
    /// Requests of any kind.
    pub ops: i64,
}

impl Requests {
    /// One GET.
    pub const GET: Requests = Requests { writes: 0, ops: 1 };
    /// One PUT.
    pub const PUT: Requests = Requests { writes: 1, ops: 1 };
    /// One LIST (a write on Spaces).
    pub const LIST: Requests = Requests { writes: 1, ops: 1 };
    /// One DELETE.
    pub const DELETE: Requests = Requests { writes: 1, ops: 1 };
    /// A GET and the PUT that usually follows it in the same window (a flush that reads).
    pub const GET_THEN_PUT: Requests = Requests { writes: 1, ops: 2 };
}

/// The per-object PUT budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutBudget {
    /// PUTs allowed per window; 0 means no limit.
    pub puts_per_window: u32,
    /// The window, in ms (300,000 on Spaces).
    pub window_ms: i64,
    /// Extra wait beyond the window, for requests still in flight when recorded.
    pub margin_ms: i64,
}

/// The bucket budget: per second, counted in windows of `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketBudget {
    /// Length of one budget window: a request is counted in the window it is sent in.
    pub window_ms: i64,
    /// Writes allowed in any run of windows one sliding second touches; 0 means no limit.
    pub writes_per_second: i64,
    /// Operations of any kind allowed likewise; 0 means no limit.
    pub ops_per_second: i64,
}

impl PutBudget {
    fn from_settings(settings: &StorageSettings) -> Self {
        let window_ms = i64::from(settings.object_put_window_secs) * 1000;
        // The margin covers a request recorded now but reaching the store later (a slow
        // connection, a busy machine): a hundredth of the window, between 1 and 3 s.
        Self {
            puts_per_window: settings.object_puts_per_5min,
            window_ms,
            margin_ms: (window_ms / 100).clamp(1_000, 3_000),
        }
    }

    /// When the next PUT may be sent, given the recorded PUT times (any order).
    pub fn next_put_at(&self, recent: &[i64], now: i64) -> i64 {
        let limit = self.puts_per_window as usize;
        if limit == 0 || recent.len() < limit {
            return now;
        }
        let mut sorted = recent.to_vec();
        sorted.sort_unstable();
        // The PUT that must leave the window before another may enter it.
        let blocking = sorted[sorted.len() - limit];
        (blocking + self.window_ms + self.margin_ms).max(now)
    }
}

impl BucketBudget {
    /// Window lengths tried, shortest first: the shortest in which a flush that reads (a GET
    /// and the PUT after it, taken together) fits in its even share. Short windows cost little
    /// of the rate (a sliding second touches one more window than fits in it, and one more is
    /// kept for late requests); at small rates longer ones keep a GET and its PUT in one window.
    const WINDOWS_MS: [i64; 5] = [50, 100, 250, 500, 1000];

    /// The budget for Spaces' rates: 90% of each (at least one request), so that requests
    /// reaching the store a little after their window stay within the rate.
    pub fn for_rates(writes_per_sec: i64, ops_per_sec: i64) -> Self {
        let budget = |rate: i64| if rate == 0 { 0 } else { (rate * 9 / 10).max(1) };
        let (writes_per_second, ops_per_second) = (budget(writes_per_sec), budget(ops_per_sec));
        let fits =
            |per_second: i64, window_ms: i64| per_second == 0 || per_second * window_ms >= 2000;
        let window_ms = Self::WINDOWS_MS
            .into_iter()
            .find(|&w| fits(writes_per_second, w) && fits(ops_per_second, w))
            .unwrap_or(1000);
        Self {
            window_ms,
            writes_per_second,
            ops_per_second,
        }
    }

    /// Start (ms) of the window that holds `now`.
    pub fn window_start(&self, now: i64) -> i64 {
        now - now.rem_euclid(self.window_ms)
    }

    /// Start (ms) of the window after the one that holds `now`.
    pub fn next_window(&self, now: i64) -> i64 {
        self.window_start(now) + self.window_ms
    }

    /// Start of the earliest window whose requests may arrive in a sliding second that also
    /// holds requests of `window`: those a second can touch, and one more for requests that
    /// reach the store after their window ends. The windows from there up to `window` hold at
    /// most the per-second budget.
    pub fn second_before(&self, window: i64) -> i64 {
        window - 1000 - self.window_ms
    }

    /// The most one window may take of a per-second budget: twice its even share, and never
    /// less than a GET with the PUT after it.
    pub fn most_in_one_window(&self, per_second: i64) -> i64 {
        ((2 * per_second * self.window_ms + 999) / 1000).max(2)
    }

    /// Requests per second the budget sustains when it is used to the full: a second's budget
    /// over the windows of [`Self::second_before`] (two more than fit in a second).
    pub fn sustained(&self, per_second: i64) -> f64 {
        let windows = (1000 / self.window_ms) as f64;
        per_second as f64 * windows / (windows + 2.0)
    }

    pub fn is_unlimited(&self) -> bool {
        self.writes_per_second == 0 && self.ops_per_second == 0
    }

    /// This budget at `share` of its rates (at least one request a second; unlimited stays
    /// unlimited), in the same windows.
    pub fn scaled(&self, share: f64) -> Self {
        let scale = |per_second: i64| {
            if per_second == 0 {
                0
            } else {
                ((per_second as f64 * share).round() as i64).clamp(1, per_second)
            }
        };
        Self {
            window_ms: self.window_ms,
            writes_per_second: scale(self.writes_per_second),
            ops_per_second: scale(self.ops_per_second),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_puts_then_wait_for_the_oldest_to_leave_the_window() {
        let budget = PutBudget {
            puts_per_window: 5,
            window_ms: 300_000,
            margin_ms: 3_000,
        };
        assert_eq!(budget.next_put_at(&[1, 2, 3, 4], 10), 10);
        assert_eq!(budget.next_put_at(&[5, 1, 2, 3, 4], 10), 1 + 303_000);
        assert_eq!(
            budget.next_put_at(&[1, 2, 3, 4, 5, 400_000], 400_001),
            400_001
        );
    }

    #[test]
    fn zero_means_unlimited() {
        let budget = PutBudget {
            puts_per_window: 0,
            window_ms: 300_000,
            margin_ms: 0,
        };
        assert_eq!(budget.next_put_at(&[1, 2, 3, 4, 5, 6], 7), 7);
    }

    fn settings(vars: &[(&str, &str)]) -> crate::config::Settings {
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::config::Settings::from_map(&vars).expect("settings")
    }

    fn budgets_of(vars: &[(&str, &str)]) -> StoreBudgets {
        let settings = settings(vars);
        let location = settings.store_location().expect("a store");
        StoreBudgets::for_store(&location, &settings.storage)
    }

    const SPACES: [(&str, &str); 4] = [
        ("SPACES_ENDPOINT", "https://nyc3.digitaloceanspaces.com"),
        ("SPACES_BUCKET", "b"),
        ("SPACES_API_KEY", "k"),
        ("SPACES_API_SECRET", "s"),
    ];

    #[test]
    fn the_local_directory_has_no_budgets_at_all() {
        let budgets = budgets_of(&[("SPACES_OBJECT_PUTS_PER_5MIN", "5")]);
        assert!(budgets.bucket.is_unlimited());
        assert_eq!(budgets.object.puts_per_window, 0);
        assert_eq!(
            budgets.describe(),
            "bucket: no request budget; per object: no PUT window"
        );
    }

    #[test]
    fn an_s3_store_gets_todays_spaces_rates_and_no_object_window_by_default() {
        let budgets = budgets_of(&SPACES);
        assert_eq!(
            (
                budgets.bucket.writes_per_second,
                budgets.bucket.ops_per_second
            ),
            (270, 450)
        );
        assert_eq!(budgets.object.puts_per_window, 0);
        // The old per-object window is still there for whoever sets it.
        let mut vars = SPACES.to_vec();
        vars.push(("SPACES_OBJECT_PUTS_PER_5MIN", "5"));
        assert_eq!(budgets_of(&vars).object.puts_per_window, 5);
        assert!(budgets_of(&vars).describe().contains("5 PUTs per 300 s"));
    }

    #[test]
    fn a_raised_operations_rate_stays_below_the_per_ip_limit() {
        let mut vars = SPACES.to_vec();
        vars.push(("SPACES_OPS_PER_SEC", "5000"));
        assert_eq!(budgets_of(&vars).bucket.ops_per_second, 1350);
        vars.push(("SPACES_REQUESTS_PER_SEC_PER_IP", "0"));
        assert_eq!(budgets_of(&vars).bucket.ops_per_second, 4500);
    }

    #[test]
    fn a_slow_down_halves_the_rate_once_a_second_and_it_climbs_back_to_the_ceiling() {
        let full = RateShare::FULL;
        assert_eq!(full.at(5_000), 1.0);
        let lowered = full.after_slow_down(10_000).expect("lowered");
        assert_eq!(lowered.lowered_to_ppm, 500_000);
        assert!(
            lowered.after_slow_down(10_500).is_none(),
            "answers to requests sent before the decrease count once"
        );
        let again = lowered.after_slow_down(11_000).expect("lowered again");
        // 0.5 + 0.01 climbed in the second, halved.
        assert_eq!(again.lowered_to_ppm, 255_000);
        assert!((again.at(21_000) - 0.355).abs() < 1e-9);
        assert_eq!(again.at(1_000_000), 1.0);
        let mut share = RateShare::FULL;
        for second in 1..100 {
            share = share
                .after_slow_down(second * 1000)
                .expect("a second apart");
        }
        assert!(share.at(100_000) >= 0.01, "never stopped altogether");
        let budget = BucketBudget::for_rates(300, 500);
        let scaled = budget.scaled(0.1);
        assert_eq!((scaled.writes_per_second, scaled.ops_per_second), (27, 45));
        assert_eq!(scaled.window_ms, budget.window_ms);
        assert_eq!(budget.scaled(0.0).writes_per_second, 1);
        assert!(BucketBudget::for_rates(0, 0).scaled(0.5).is_unlimited());
    }

    #[test]
    fn bucket_budgets_stay_under_the_rate_and_never_reach_zero() {
        let budget = BucketBudget::for_rates(150, 240);
        assert_eq!(
            (budget.writes_per_second, budget.ops_per_second),
            (135, 216)
        );
        assert_eq!(budget.window_ms, 50);
        assert_eq!(budget.most_in_one_window(135), 14);
        assert!(budget.sustained(135) > 122.0 && budget.sustained(135) < 135.0);
        // At small rates a window holds a GET and its PUT (2 operations) at the even rate.
        let scaled_down = BucketBudget::for_rates(10, 16);
        assert_eq!(scaled_down.window_ms, 250);
        let small = BucketBudget::for_rates(1, 0);
        assert_eq!((small.writes_per_second, small.ops_per_second), (1, 0));
        assert_eq!(small.window_ms, 1000);
        assert_eq!(small.most_in_one_window(1), 2);
    }
}
