//! Which scenarios a command works on: `--filter REGEX` on the scenario
//! name, then `--shard I/N` to split the rest over N CI jobs.
//!
//! Sharding is by name: the filtered scenarios sorted by name (then path)
//! go round-robin to shards 1..N, so every job of a CI matrix that is given
//! the same files computes the same split, each scenario lands in exactly
//! one shard, and shard sizes differ by at most one.

use std::fmt;
use std::str::FromStr;

use regex::Regex;
use thiserror::Error;

use crate::scenario::LoadedScenario;

/// `--shard I/N`: the I-th (1-based) of N shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("`{0}` is not I/N (e.g. 2/4)")]
    Format(String),
    #[error("shard {index}/{count}: I must be between 1 and N")]
    Range { index: u32, count: u32 },
}

impl Shard {
    pub fn new(index: u32, count: u32) -> Result<Shard, ShardError> {
        if count == 0 || index == 0 || index > count {
            return Err(ShardError::Range { index, count });
        }
        Ok(Shard { index, count })
    }

    pub fn index(self) -> u32 {
        self.index
    }

    pub fn count(self) -> u32 {
        self.count
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(text: &str) -> Result<Shard, ShardError> {
        let (index, count) = text.split_once('/').ok_or_else(|| ShardError::Format(text.into()))?;
        let number = |part: &str| {
            part.trim().parse::<u32>().map_err(|_| ShardError::Format(text.to_owned()))
        };
        Shard::new(number(index)?, number(count)?)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[derive(Debug, Error)]
pub enum SelectionError {
    #[error("--filter `{filter}` matches none of the {total} scenario(s) given")]
    NothingMatches { filter: String, total: usize },
}

/// The scenarios `filter` and `shard` keep, in the order given. An empty
/// shard is no error (a matrix can have more jobs than scenarios); a filter
/// that matches nothing is (a typo would otherwise pass silently).
pub fn select(
    scenarios: Vec<LoadedScenario>,
    filter: Option<&Regex>,
    shard: Option<Shard>,
) -> Result<Vec<LoadedScenario>, SelectionError> {
    let total = scenarios.len();
    let matching: Vec<LoadedScenario> = scenarios
        .into_iter()
        .filter(|scenario| filter.is_none_or(|filter| filter.is_match(&scenario.name)))
        .collect();
    if let Some(filter) = filter {
        if matching.is_empty() && total > 0 {
            return Err(SelectionError::NothingMatches { filter: filter.to_string(), total });
        }
    }
    let Some(shard) = shard else { return Ok(matching) };
    let mut by_name: Vec<usize> = (0..matching.len()).collect();
    by_name.sort_by(|&a, &b| {
        (&matching[a].name, &matching[a].path).cmp(&(&matching[b].name, &matching[b].path))
    });
    let mut mine = vec![false; matching.len()];
    for (rank, &at) in by_name.iter().enumerate() {
        mine[at] = rank as u64 % u64::from(shard.count) == u64::from(shard.index - 1);
    }
    Ok(matching
        .into_iter()
        .zip(mine)
        .filter_map(|(scenario, mine)| mine.then_some(scenario))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scenarios(names: &[&str]) -> Vec<LoadedScenario> {
        let text = "description = \"x\"\n[vm]\nkernel = \"default\"\n\
                    [[step]]\nexec = { label = \"a\", argv = [\"true\"] }\n";
        let scenario = crate::scenario::parse(text).expect("minimal scenario");
        names
            .iter()
            .map(|name| LoadedScenario {
                name: (*name).to_owned(),
                path: PathBuf::from(format!("scenarios/{name}.toml")),
                dir: PathBuf::from("scenarios"),
                scenario: scenario.clone(),
            })
            .collect()
    }

    fn names(selected: &[LoadedScenario]) -> Vec<&str> {
        selected.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn shards_parse_and_out_of_range_ones_are_refused() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("1/1".parse::<Shard>().map(|s| s.to_string()), Ok("1/1".to_owned()));
        assert_eq!("0/4".parse::<Shard>(), Err(ShardError::Range { index: 0, count: 4 }));
        assert_eq!("5/4".parse::<Shard>(), Err(ShardError::Range { index: 5, count: 4 }));
        assert_eq!("1/0".parse::<Shard>(), Err(ShardError::Range { index: 1, count: 0 }));
        assert_eq!("2".parse::<Shard>(), Err(ShardError::Format("2".into())));
        assert_eq!("a/4".parse::<Shard>(), Err(ShardError::Format("a/4".into())));
    }

    /// Every scenario in exactly one shard, for every N up to more shards
    /// than scenarios, whatever order the files were given in.
    #[test]
    fn the_shards_partition_the_scenarios() {
        let all = ["loops", "budget", "control", "errors", "two-cpus", "budget-off", "x"];
        let mut reversed = all;
        reversed.reverse();
        for count in 1..=9 {
            let mut seen: Vec<String> = Vec::new();
            for index in 1..=count {
                let shard = Shard::new(index, count).expect("valid");
                let kept = select(scenarios(&all), None, Some(shard)).expect("no filter");
                // Same split whatever the order on the command line.
                let kept_reversed = select(scenarios(&reversed), None, Some(shard)).expect("ok");
                let mut a = names(&kept);
                let mut b = names(&kept_reversed);
                a.sort();
                b.sort();
                assert_eq!(a, b, "shard {shard}");
                // Balanced: sizes differ by at most one.
                let size = kept.len();
                assert!(
                    size == all.len() / count as usize
                        || size == all.len().div_ceil(count as usize)
                );
                seen.extend(kept.into_iter().map(|s| s.name));
            }
            let mut expected: Vec<String> = all.iter().map(|s| (*s).to_owned()).collect();
            expected.sort();
            seen.sort();
            assert_eq!(seen, expected, "{count} shards");
        }
    }

    #[test]
    fn the_filter_matches_names_and_keeps_the_given_order() {
        let all = scenarios(&["loops", "budget", "loops-subprog", "control"]);
        let filter = Regex::new("^loops").expect("regex");
        let kept = select(all.clone(), Some(&filter), None).expect("matches");
        assert_eq!(names(&kept), ["loops", "loops-subprog"]);
        let shard = Shard::new(2, 2).expect("valid");
        assert_eq!(
            names(&select(all.clone(), Some(&filter), Some(shard)).expect("ok")),
            ["loops-subprog"]
        );
        let none = Regex::new("^nope$").expect("regex");
        let error = select(all, Some(&none), None).expect_err("nothing matches");
        assert_eq!(error.to_string(), "--filter `^nope$` matches none of the 4 scenario(s) given");
    }
}
