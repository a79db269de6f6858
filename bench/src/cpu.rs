//! CPU time spent during a phase, per message: this process's (the raw consumer or Weir, which
//! both run in it) and the whole machine's (the broker and PostgreSQL too, when they run here,
//! as with `tests/services`).
//!
//! On a machine the broker, the database and the host share, a phase's rate swings by ±15 %
//! between runs, and the CPU time a message costs moves too (the machine's speed varies with
//! what else its host runs): it says where the time went and what the cores allow, and two
//! builds compare only over alternating runs. Read from Linux's `/proc`; elsewhere the figures
//! are absent.
//!
//! Owns the reading of `/proc/self/stat` and `/proc/stat`; knows nothing of the phases.

use std::time::Instant;

use serde::Serialize;

/// CPU seconds used so far: by this process (user + system) and by the whole machine (every
/// core's time not idle and not waiting for I/O).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    process: Option<f64>,
    machine: Option<f64>,
}

impl CpuSample {
    /// The counters now.
    pub fn now() -> Self {
        let ticks = clock_ticks();
        Self {
            process: ticks.and_then(|t| process_ticks().map(|p| p / t)),
            machine: ticks.and_then(|t| machine_busy_ticks().map(|m| m / t)),
        }
    }

    /// What `messages` messages cost between `self` and `later`.
    pub fn per_message(&self, later: &Self, messages: u64) -> CpuFigures {
        let per = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if messages > 0 && b >= a => Some((b - a) * 1e6 / messages as f64),
            _ => None,
        };
        CpuFigures {
            process_us: per(self.process, later.process),
            machine_us: per(self.machine, later.machine),
        }
    }
}

/// An instant of a phase and the CPU counters then: where its clock starts or stops.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// When.
    pub at: Instant,
    /// The counters then.
    pub cpu: CpuSample,
}

impl Mark {
    /// Now.
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            cpu: CpuSample::now(),
        }
    }
}

/// CPU microseconds per message of one phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuFigures {
    /// This process's: the raw consumer, or Weir (intake, runtime, pipeline, store client).
    pub process_us: Option<f64>,
    /// The machine's: this process, the broker, PostgreSQL and anything else running.
    pub machine_us: Option<f64>,
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc`'s CPU times. It is 100 on every Linux this
/// runs on; asked of `getconf` once, so that no `libc` binding is needed for it.
fn clock_ticks() -> Option<f64> {
    static TICKS: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()?;
        let ticks: f64 = std::str::from_utf8(&out.stdout).ok()?.trim().parse().ok()?;
        (ticks > 0.0).then_some(ticks)
    })
}

/// utime + stime of this process, in clock ticks (`/proc/self/stat`, fields 14 and 15).
fn process_ticks() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Every core's busy time, in clock ticks, from the first line of `/proc/stat`: user, nice,
/// system, irq and softirq. Idle, iowait and steal (time the hypervisor gave to another
/// machine) are not this machine's work; guest time is already counted in user.
fn machine_busy_ticks() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<f64> = fields
        .take(7)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq] = values[..] else {
        return None;
    };
    Some(user + nice + system + irq + softirq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_between_two_samples_is_counted() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let before = CpuSample::now();
        // Spin until this process has used 200 ms of CPU by its own clock, however long a busy
        // machine makes that take: the figure must then say so.
        let mut x = 0u64;
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let spent = before.per_message(&CpuSample::now(), 1);
            if spent.process_us.is_some_and(|us| us >= 200_000.0) {
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "{spent:?} after 60 s of spinning"
            );
        }
        let figures = before.per_message(&CpuSample::now(), 1);
        let process = figures.process_us.expect("read /proc/self/stat");
        assert!((200_000.0..60_000_000.0).contains(&process), "{process} µs");
        let machine = figures.machine_us.expect("read /proc/stat");
        assert!(machine >= process * 0.9, "{machine} µs < {process} µs");
    }

    #[test]
    fn no_messages_means_no_figure() {
        let sample = CpuSample::now();
        let figures = sample.per_message(&sample, 0);
        assert!(figures.process_us.is_none() && figures.machine_us.is_none());
    }
}
