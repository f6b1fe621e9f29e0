//! Monitor mode: look, do not touch. Streams are discovered as usual, but no group is
//! created, nothing is read through the group, acknowledged or written; every
//! `monitor_interval` each stream's figures are refreshed and judged.

use super::StreamSync;
use crate::gucs::Settings;
use crate::redis::StreamInfo;
use crate::shmem;
use crate::worker::Log;

/// Checks in a row a figure must rise before monitor mode calls it a trend.
const RISING_CHECKS: u32 = 3;

/// What monitor mode remembers of a stream between checks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Trend {
    pending: Option<i64>,
    lag: Option<i64>,
    pending_rising: u32,
    lag_rising: u32,
    /// The kinds of trouble in force ("" when healthy): logged when they change, not each
    /// check.
    pub kinds: String,
}

impl Trend {
    /// Takes in one check's figures and returns the kinds of trouble they show and the
    /// warning text ("" = none): pending entries rising check after check, lag rising check
    /// after check, or a consumer sitting on pending entries for longer than `stall_ms`.
    pub fn judge(&mut self, info: &StreamInfo, stall_ms: i64) -> (String, String) {
        let rising = |before: Option<i64>, now: i64, count: u32| match before {
            Some(b) if now > b => count + 1,
            _ => 0,
        };
        self.pending_rising = rising(self.pending, info.pending, self.pending_rising);
        self.pending = Some(info.pending);
        match info.lag {
            Some(lag) => {
                self.lag_rising = rising(self.lag, lag, self.lag_rising);
                self.lag = Some(lag);
            }
            None => {
                self.lag_rising = 0;
                self.lag = None;
            }
        }
        let mut kinds = Vec::new();
        let mut found = Vec::new();
        if self.pending_rising >= RISING_CHECKS {
            kinds.push("pending".to_owned());
            found.push(format!(
                "pending entries rising for {} checks in a row (now {})",
                self.pending_rising, info.pending
            ));
        }
        if self.lag_rising >= RISING_CHECKS {
            kinds.push("lag".to_owned());
            found.push(format!(
                "lag rising for {} checks in a row (now {} entries not yet delivered)",
                self.lag_rising,
                info.lag.unwrap_or(0)
            ));
        }
        if let Some((name, idle, pending)) = &info.stalled_consumer {
            if *idle >= stall_ms {
                kinds.push(format!("stalled {name}"));
                found.push(format!(
                    "consumer \"{name}\" idle for {} s with {pending} pending entries",
                    idle / 1000
                ));
            }
        }
        (kinds.join(","), found.join("; "))
    }
}

impl StreamSync {
    /// Takes in a health check of monitor mode: each stream's figures (length, first and last
    /// IDs, groups, consumers, pending, lag) are judged, a change of verdict is logged
    /// (WARNING when trouble starts, LOG when it clears) and shown in
    /// `redis_sync_streams().health`.
    pub(super) fn apply_monitored(
        &mut self,
        infos: Vec<(u8, Vec<u8>, Option<StreamInfo>)>,
        s: &Settings,
        log: &Log,
    ) {
        let stall_ms = (s.monitor_interval * 3).max(s.claim_min_idle).as_millis() as i64;
        let mut slots = Vec::new();
        for (db, key, found) in infos {
            // A stream gone since discovery: the next discovery drops it.
            let (Some(found), Some(&i)) = (found, self.index.get(&(db, key))) else { continue };
            let t = &mut self.streams[i];
            let (kinds, verdict) = t.trend.judge(&found, stall_ms);
            log.debug(&format!(
                "stream {}: length {}, entries {}..{}, {} group(s), {} consumer(s) in \"{}\", {} pending, lag {}",
                t.stream_key,
                found.length,
                found.first_entry_id.as_deref().unwrap_or("-"),
                found.last_entry_id.as_deref().unwrap_or("-"),
                found.groups,
                found.consumers,
                s.consumer_group,
                found.pending,
                found.lag.map_or("unknown".to_owned(), |l| l.to_string()),
            ));
            if kinds != t.trend.kinds {
                if kinds.is_empty() {
                    log.info(&format!("stream {}: healthy again", t.stream_key));
                } else {
                    log.warning(&format!("stream {}: {verdict}", t.stream_key));
                }
                t.trend.kinds = kinds;
            }
            slots.push((i, found, verdict));
        }
        shmem::update_streams(|tbl| {
            for (i, found, warning) in &slots {
                if let Some(slot) = tbl.slots[self.slots.clone()].get_mut(*i) {
                    slot.set_info(found);
                    slot.health.set(warning);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_calls_a_trend_after_three_rising_checks() {
        let mut t = Trend::default();
        let check = |t: &mut Trend, pending: i64, lag: Option<i64>| {
            t.judge(&StreamInfo { pending, lag, ..Default::default() }, 60_000)
        };
        assert_eq!(check(&mut t, 5, Some(1)).1, "");
        assert_eq!(check(&mut t, 6, Some(2)).1, "");
        assert_eq!(check(&mut t, 7, Some(3)).1, "");
        assert_eq!(
            check(&mut t, 8, Some(4)),
            (
                "pending,lag".to_owned(),
                "pending entries rising for 3 checks in a row (now 8); lag rising for 3 checks in a row (now 4 entries not yet delivered)".to_owned()
            )
        );
        // The kinds stay the same while the figures move: one warning, not one per check.
        assert_eq!(check(&mut t, 9, Some(5)).0, "pending,lag");
        // A flat check ends the trend.
        assert_eq!(check(&mut t, 9, Some(5)), (String::new(), String::new()));
        let stalled =
            StreamInfo { stalled_consumer: Some(("old".into(), 90_000, 3)), ..Default::default() };
        assert_eq!(
            t.judge(&stalled, 60_000),
            (
                "stalled old".to_owned(),
                "consumer \"old\" idle for 90 s with 3 pending entries".to_owned()
            )
        );
        assert_eq!(t.judge(&stalled, 120_000).0, "");
    }
}
