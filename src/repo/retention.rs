//! Retention: which backups of one VM a `--keep-*` policy keeps, and why.
//!
//! The semantics are Proxmox Backup Server's prune (its `mark_selections`),
//! applied to one VM's backups sorted newest first:
//!
//! 1. A protected backup (one a recovery session uses, see `repo::forget`)
//!    is kept and counts toward no rule.
//! 2. The rules run in order: last, hourly, daily, weekly, monthly, yearly.
//!    Each rule walks the backups not yet decided, newest first, and puts
//!    each in its period (the backup itself for `last`; the UTC hour, day,
//!    ISO week, month or year of its `created_unix`). The newest backup of
//!    a period is kept, until the rule has kept N periods; the older ones
//!    of a period it kept are removed ("superseded"). A period that already
//!    holds a backup kept by an earlier rule is skipped and does not use
//!    one of this rule's N: rules do not overlap. A backup an earlier rule
//!    removed as superseded is not looked at again, so each rule reaches
//!    only further back in time.
//! 3. Whatever no rule kept is removed.
//!
//! This differs from restic, whose rules count independently (keep-last 3
//! and keep-daily 3 with three backups today keep today's three and two
//! earlier days; PBS and recoverfs keep today's three and three earlier
//! days). Periods are UTC, not local time, so every host agrees.

use std::collections::HashSet;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// How many of each period to keep; 0 disables a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Policy {
    /// A policy that keeps nothing would remove every backup: refused.
    pub fn check(&self) -> Result<()> {
        if self.rules().iter().all(|(_, n)| *n == 0) {
            return Err(Error::invalid(
                "forget needs at least one --keep-* option above 0 (nothing would be kept)",
            ));
        }
        Ok(())
    }

    fn rules(&self) -> [(Rule, u32); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The backup's period under this rule, as a readable key.
    fn period(self, id: &str, unix: u64) -> String {
        let t =
            OffsetDateTime::from_unix_timestamp(unix as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let (y, m, d, h) = (t.year(), t.month() as u8, t.day(), t.hour());
        match self {
            Rule::Last => id.to_string(),
            Rule::Hourly => format!("{y:04}-{m:02}-{d:02}T{h:02}"),
            Rule::Daily => format!("{y:04}-{m:02}-{d:02}"),
            Rule::Weekly => {
                let (wy, w, _) = t.to_iso_week_date();
                format!("{wy:04}-W{w:02}")
            }
            Rule::Monthly => format!("{y:04}-{m:02}"),
            Rule::Yearly => format!("{y:04}"),
        }
    }
}

/// One backup as the policy sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub created_unix: u64,
    /// Why it may not be removed (a recovery session uses it), if so.
    pub protected: Option<String>,
}

/// The decision for one backup, with the reason a person can check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub created_unix: u64,
    pub keep: bool,
    pub reason: String,
}

/// Decides every backup; the result is newest first.
pub fn apply(policy: &Policy, backups: &[Candidate]) -> Vec<Decision> {
    let mut list: Vec<&Candidate> = backups.iter().collect();
    list.sort_by(|a, b| (b.created_unix, &b.id).cmp(&(a.created_unix, &a.id)));
    let mut marks: Vec<Option<(bool, String)>> = vec![None; list.len()];
    for (i, c) in list.iter().enumerate() {
        if let Some(why) = &c.protected {
            marks[i] = Some((true, format!("protected: {why}")));
        }
    }
    for (rule, keep) in policy.rules() {
        if keep > 0 {
            mark_rule(rule, keep, &list, &mut marks);
        }
    }
    list.iter()
        .zip(marks)
        .map(|(c, m)| {
            let (keep, reason) = m.unwrap_or((false, "kept by no rule".into()));
            Decision {
                id: c.id.clone(),
                created_unix: c.created_unix,
                keep,
                reason,
            }
        })
        .collect()
}

/// One rule over the undecided backups (PBS `mark_selections`).
fn mark_rule(rule: Rule, keep: u32, list: &[&Candidate], marks: &mut [Option<(bool, String)>]) {
    let period = |c: &Candidate| rule.period(&c.id, c.created_unix);
    // Periods an earlier rule (or protection) already holds a kept backup in.
    let covered: HashSet<String> = list
        .iter()
        .zip(marks.iter())
        .filter(|(_, m)| matches!(m, Some((true, _))))
        .map(|(c, _)| period(c))
        .collect();
    let mut kept: Vec<(String, String)> = vec![]; // (period, kept id)
    for (i, c) in list.iter().enumerate() {
        if marks[i].is_some() {
            continue;
        }
        let p = period(c);
        if covered.contains(&p) {
            continue;
        }
        if let Some((_, by)) = kept.iter().find(|(kp, _)| *kp == p) {
            marks[i] = Some((
                false,
                format!("superseded by {by} in {} period {p}", rule.name()),
            ));
            continue;
        }
        if kept.len() >= keep as usize {
            break;
        }
        let n = kept.len() + 1;
        marks[i] = Some((
            true,
            match rule {
                Rule::Last => format!("keep-last {n} of {keep}"),
                _ => format!("keep-{} {p} ({n} of {keep})", rule.name()),
            },
        ));
        kept.push((p, c.id.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;
    const DAY: u64 = 24 * H;
    /// 2026-11-02T00:00:00Z, a Monday.
    const T0: u64 = 1_793_577_600;

    fn c(id: &str, t: u64) -> Candidate {
        Candidate {
            id: id.into(),
            created_unix: t,
            protected: None,
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn rules_do_not_overlap_unlike_restic() {
        // Three backups a day for four days.
        let mut b = vec![];
        for day in 0..4 {
            for k in 0..3 {
                b.push(c(&format!("d{day}-{k}"), T0 + day * DAY + k * H));
            }
        }
        let p = Policy {
            last: 3,
            daily: 3,
            ..Default::default()
        };
        let d = apply(&p, &b);
        // Today's three by keep-last; keep-daily skips today (covered)
        // and keeps the newest of each of the three earlier days.
        assert_eq!(
            kept(&d),
            vec!["d3-2", "d3-1", "d3-0", "d2-2", "d1-2", "d0-2"]
        );
        let r = d.iter().find(|d| d.id == "d2-1").unwrap();
        assert!(!r.keep);
        assert!(r.reason.contains("superseded by d2-2 in daily"), "{r:?}");
    }

    #[test]
    fn protected_backups_are_kept_and_count_toward_no_rule() {
        let b = vec![c("a", T0), c("b", T0 + DAY), c("c", T0 + 2 * DAY)];
        let mut b2 = b.clone();
        b2[0].protected = Some("session".into());
        let p = Policy {
            last: 1,
            ..Default::default()
        };
        assert_eq!(kept(&apply(&p, &b)), vec!["c"]);
        let d = apply(&p, &b2);
        assert_eq!(kept(&d), vec!["c", "a"]);
        assert!(d[2].reason.starts_with("protected: session"), "{d:?}");
    }

    #[test]
    fn weekly_uses_iso_weeks_and_yearly_keeps_the_newest_of_each_year() {
        // Sunday 2026-11-01 is in ISO week 44, Monday 2026-11-02 in week 45.
        let b = vec![c("sun", T0 - DAY), c("mon", T0), c("old", T0 - 400 * DAY)];
        let p = Policy {
            weekly: 2,
            ..Default::default()
        };
        assert_eq!(kept(&apply(&p, &b)), vec!["mon", "sun"]);
        let p = Policy {
            yearly: 5,
            ..Default::default()
        };
        assert_eq!(kept(&apply(&p, &b)), vec!["mon", "old"]);
    }

    #[test]
    fn a_policy_keeping_nothing_is_refused() {
        assert!(Policy::default().check().is_err());
        assert!(Policy {
            monthly: 1,
            ..Default::default()
        }
        .check()
        .is_ok());
    }
}
