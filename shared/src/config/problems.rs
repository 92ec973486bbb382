//! The one accumulator of configuration problems: every check adds what it finds, and the
//! caller refuses with all of them at once rather than stopping at the first.

/// Configuration problems found so far, one human-readable line each.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// The value of a check, or `None` with its problems kept. `None` only ever comes with a
    /// problem, so a caller that finds one missing refuses with [`Problems::into_lines`].
    pub fn take<T>(&mut self, checked: Result<T, Vec<String>>) -> Option<T> {
        match checked {
            Ok(value) => Some(value),
            Err(problems) => {
                self.0.extend(problems);
                None
            }
        }
    }

    /// The value of `value`, or `None` with the line that says it is missing and why.
    pub fn required<T: Clone>(&mut self, value: &Option<T>, name: &str, why: &str) -> Option<T> {
        self.take(
            value
                .clone()
                .ok_or_else(|| vec![format!("{name} is not set: {why}")]),
        )
    }

    /// Adds one problem.
    pub fn push(&mut self, line: String) {
        self.0.push(line);
    }

    /// Whether nothing was found wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every problem found, in the order found.
    pub fn into_lines(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_kept_in_order_and_a_value_passes_through() {
        let mut problems = Problems::default();
        assert_eq!(problems.take::<u8>(Ok(1)), Some(1));
        assert!(problems.is_empty());
        assert_eq!(problems.take::<u8>(Err(vec!["first".into()])), None);
        assert_eq!(problems.required::<u8>(&None, "X", "it is needed"), None);
        assert_eq!(problems.required(&Some(2), "Y", "unused"), Some(2));
        assert_eq!(
            problems.into_lines(),
            vec![
                "first".to_string(),
                "X is not set: it is needed".to_string()
            ]
        );
    }
}
