//! Spaces' request budgets, computed the same way everywhere.
//!
//! Per object: at most `puts_per_window` PUTs in any sliding window (5 per 300 s on Spaces).
//! Each PUT is recorded before it is sent; a safety margin covers the time between recording
//! and the request reaching the store. Per bucket: writes and operations per second, taken from
//! 100 ms windows in the database so every worker shares one budget (see
//! `Database::take_bucket_budget`), at 90% of the configured rate so that any sliding second
//! stays under it (longer windows when the rates are too small for 100 ms ones).

use crate::config::StorageSettings;

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

/// The bucket budget, per fixed window of `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketBudget {
    /// Length of one budget window (100 ms for Spaces' default rates; longer for small rates).
    pub window_ms: i64,
    /// Writes per window; 0 means no limit.
    pub writes_per_window: i64,
    /// Operations of any kind per window; 0 means no limit.
    pub ops_per_window: i64,
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
    /// Window lengths tried, shortest (smoothest) first.
    const WINDOWS_MS: [i64; 6] = [100, 200, 250, 500, 1000, 2000];

    pub fn from_settings(settings: &StorageSettings) -> Self {
        Self::for_rates(
            i64::from(settings.writes_per_sec),
            i64::from(settings.ops_per_sec),
        )
    }

    /// Chooses the window that lets the most requests through while any sliding second, which
    /// overlaps at most `ceil(1000 / window) + 1` windows, stays within 90% of both rates (the
    /// rest absorbs requests that reach the store a little after their window).
    pub fn for_rates(writes_per_sec: i64, ops_per_sec: i64) -> Self {
        let capacity = |rate: i64, window_ms: i64| -> i64 {
            if rate == 0 {
                return 0;
            }
            let overlapping = (1000 + window_ms - 1) / window_ms + 1;
            (rate * 9 / 10).max(1) / overlapping
        };
        let mut best = Self {
            window_ms: 1000,
            writes_per_window: writes_per_sec.min(1),
            ops_per_window: ops_per_sec.min(1),
        };
        let mut best_rate = 0;
        for window_ms in Self::WINDOWS_MS {
            let (writes, ops) = (
                capacity(writes_per_sec, window_ms),
                capacity(ops_per_sec, window_ms),
            );
            let fits = (writes_per_sec == 0 || writes >= 1) && (ops_per_sec == 0 || ops >= 1);
            let limiting = [(writes_per_sec, writes), (ops_per_sec, ops)]
                .iter()
                .filter(|(rate, _)| *rate > 0)
                .map(|(_, per_window)| per_window * 1000 / window_ms)
                .min()
                .unwrap_or(i64::MAX);
            if fits && limiting > best_rate {
                best_rate = limiting;
                best = Self {
                    window_ms,
                    writes_per_window: writes,
                    ops_per_window: ops,
                };
            }
        }
        best
    }

    /// Start (ms) of the window that holds `now`.
    pub fn window_start(&self, now: i64) -> i64 {
        now - now.rem_euclid(self.window_ms)
    }

    /// Start (ms) of the window after the one that holds `now`.
    pub fn next_window(&self, now: i64) -> i64 {
        self.window_start(now) + self.window_ms
    }

    pub fn is_unlimited(&self) -> bool {
        self.writes_per_window == 0 && self.ops_per_window == 0
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
    fn bucket_windows_stay_under_the_rate() {
        let settings = crate::config::Settings::from_map(&Default::default())
            .expect("defaults")
            .storage;
        let budget = BucketBudget::from_settings(&settings);
        // Any sliding second overlaps at most 11 windows of 100 ms.
        assert!(budget.writes_per_window * 11 <= 150);
        assert!(budget.ops_per_window * 11 <= 240);
    }
}
