//! Values read out of a Prometheus `/metrics` page (the text format: `name{labels} value`).

/// The value of the sample written exactly `series` (`name` or `name{label="value",...}`, as
/// the page spells it), if the page has it.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

/// The sum of every sample of metric `name`, whatever its labels (0 when there is none).
pub fn total(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split_once('{').map_or(series, |(metric, _)| metric);
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// GETs a `/metrics` page.
pub async fn scrape(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("a metrics page")
}

/// The upper bound of the histogram bucket that holds the `q` quantile of what histogram
/// `name` recorded since `before` (an earlier scrape of the same page); `None` when nothing
/// was recorded or it lies beyond the last finite bound.
#[allow(dead_code)] // Only the reliability target's benchmarks read histograms.
pub fn histogram_quantile(before: &str, now: &str, name: &str, q: f64) -> Option<f64> {
    // Summed over every page in `page` (several workers' pages, one after the other).
    let buckets = |page: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut sums: Vec<(f64, f64)> = Vec::new();
        for line in page.lines() {
            let Some((bound, value)) = line
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once("\"} "))
                .and_then(|(b, v)| Some((b.parse::<f64>().ok()?, v.parse::<f64>().ok()?)))
            else {
                continue;
            };
            match sums.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, sum)) => *sum += value,
                None => sums.push((bound, value)),
            }
        }
        sums
    };
    let (earlier, later) = (buckets(before), buckets(now));
    let count = |bound: f64, list: &[(f64, f64)]| {
        list.iter()
            .find(|(b, _)| *b == bound)
            .map_or(0.0, |(_, v)| *v)
    };
    let total = later
        .last()
        .map_or(0.0, |(bound, v)| v - count(*bound, &earlier));
    if total <= 0.0 {
        return None;
    }
    later
        .iter()
        .find(|(bound, cumulative)| cumulative - count(*bound, &earlier) >= q * total)
        .map(|(bound, _)| *bound)
        .filter(|bound| bound.is_finite())
}
