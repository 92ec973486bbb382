//! Spaces' request budgets, computed the same way everywhere.
//!
//! Per object: at most `puts_per_window` PUTs in any sliding window (5 per 300 s on Spaces).
//! Each PUT is recorded before it is sent; a safety margin covers the time between recording
//! and the request reaching the store. Per bucket: writes and operations per second, counted
//! in short windows in the database so every worker shares one budget (see
//! `Budgets::take_bucket_budget`). Each window's cap is 90% of the rate less what the windows
//! of the second and one window before it took, so the windows a sliding second touches, and
//! one more for requests that reach the store after their window, stay within 90% of the rate;
//! a window never takes more than twice its even share (no burst the size of a whole second).

use crate::config::StorageSettings;

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
    pub fn from_settings(settings: &StorageSettings) -> Self {
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

    pub fn from_settings(settings: &StorageSettings) -> Self {
        Self::for_rates(
            i64::from(settings.writes_per_sec),
            i64::from(settings.ops_per_sec),
        )
    }

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

    #[test]
    fn bucket_budgets_stay_under_the_rate_and_never_reach_zero() {
        let settings = crate::config::Settings::from_map(&Default::default())
            .expect("defaults")
            .storage;
        let budget = BucketBudget::from_settings(&settings);
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
